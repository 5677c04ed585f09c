"""The library needs only torch and numpy: with the training harness's packages (the ``train``
extra: matplotlib, scikit-learn, tqdm) impossible to import, ``import gradsieve``, the Simulator
and the DDP hook on a one-rank gloo group all work, and the harness is never imported."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys

    BLOCKED = ("matplotlib", "sklearn", "tqdm")

    class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # Found, but importing it fails as an absent package's import does.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked by the test)")

        def exec_module(self, module):
            raise ModuleNotFoundError(f"No module named {module.__name__!r} (blocked by the test)")

    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, Block())

    import tempfile
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import gradsieve

    for name in gradsieve.available_compressors():
        sim = gradsieve.Simulator(name, world_size=2)
        sim.step([torch.randn(1000), torch.randn(1000)])

    store = dist.FileStore(tempfile.mktemp(), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(50, 4)
    ddp = DDP(model)
    state = gradsieve.CompressionState("topk", density=1.0)
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    x = torch.randn(8, 50)
    for _ in range(3):
        model.zero_grad()
        ddp(x).square().sum().backward()
        expected = torch.autograd.grad(model(x).square().sum(), model.weight)[0]
        assert torch.equal(model.weight.grad, expected), "density 1 on one rank returns the gradient"
    assert state.stats()["compressed_steps"] == 2
    dist.destroy_process_group()
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
    assert not loaded, loaded
    assert "gradsieve.train" not in sys.modules
    print("library alone: ok")
""")


def test_library_works_without_the_harness_extra():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(ROOT, "python"),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "library alone: ok" in done.stdout
