"""N workers in one process, running exactly the compressor code the DDP hook runs.

The simulator packs each worker's payload, exchanges them through a
:class:`~gradsieve.exchange.LocalExchange` (which stacks them as ``all_gather_into_tensor`` would),
and decodes with the same code, so its averages equal the hook's bit for bit (on CPU, for the
sparse compressors). It is meant for studying algorithms (heterogeneous data, many workers) and for tests.

Example::

    >>> sim = gradsieve.Simulator("topk", world_size=8, density=0.01)
    >>> grads = [torch.randn(100_000) for _ in range(8)]
    >>> average = sim.step(grads)          # what every worker receives
    >>> sim.memory(0, "residual").shape    # worker 0's error-feedback residual
    torch.Size([100000])
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

from gradsieve.compressor import BucketLayout, Compressor
from gradsieve.exchange import LocalExchange
from gradsieve.memory import MemoryBank
from gradsieve.registry import get_compressor
from gradsieve.signals import CommShare, Loss, Metric, Signal


class Simulator:
    """Simulates ``world_size`` workers exchanging one flat gradient per step.

    Args:
        compressor: a registry name or a :class:`~gradsieve.compressor.Compressor`.
        world_size: number of simulated workers, >= 1.
        param_sizes: optional sizes of the parameters the flat gradient is made of (for
            ``scope="layer"`` and ``compress_1d``); by default one 2-D parameter.
        param_ndims: optional dimensions of those parameters (1 marks biases and norms).
        param_keys: optional stable identities of those parameters (default: their positions);
            the hook uses such keys so that its results do not depend on DDP's bucket order.
        **options: compressor options (``density``, ...), validated by the registry.
    """

    def __init__(
        self,
        compressor: Union[str, Compressor],
        world_size: int,
        param_sizes: Optional[Sequence[int]] = None,
        param_ndims: Optional[Sequence[int]] = None,
        param_keys: Optional[Sequence[int]] = None,
        **options,
    ) -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"Simulator: world_size must be an integer >= 1, got {world_size!r}")
        if isinstance(compressor, Compressor):
            if options:
                raise ValueError("Simulator: pass options to the compressor, not beside an instance")
            self.compressor = compressor
        else:
            self.compressor = get_compressor(compressor, **options)
        self.world_size = world_size
        self.param_sizes = tuple(param_sizes) if param_sizes else None
        self.param_ndims = tuple(param_ndims) if param_ndims else None
        self.param_keys = tuple(int(k) for k in param_keys) if param_keys else ()
        if self.param_keys and (len(set(self.param_keys)) != len(self.param_keys)
                                or len(self.param_keys) != len(self.param_sizes or ())):
            raise ValueError("Simulator: param_keys must be distinct, one per entry of param_sizes")
        self.exchange = LocalExchange(world_size)
        self.banks = [MemoryBank() for _ in range(world_size)]
        self.steps = 0
        self.wire_bytes = 0  # sent by all workers together
        self.skipped_steps = 0
        # The last step's compressor output per worker (payload, pending memory), for studies.
        self.last_compressed: List = []

    def layout(self, numel: int) -> BucketLayout:
        layout = BucketLayout.flat(numel, self.world_size, self.param_sizes)
        ndims = layout.param_ndims
        if self.param_ndims:
            if len(self.param_ndims) != len(layout.param_numels):
                raise ValueError("Simulator: param_ndims must have one entry per parameter")
            ndims = self.param_ndims
        return BucketLayout(numel, layout.param_numels, ndims, self.world_size, 0, self.param_keys)

    def step(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """One exchange. ``grads``: one flat gradient per worker (same size). Returns what every
        worker's optimizer receives (float32); NaN everywhere when any gradient was non-finite, in
        which case no worker's memory changes."""
        if len(grads) != self.world_size:
            raise ValueError(f"Simulator.step: expected {self.world_size} gradients, got {len(grads)}")
        flat = [g.detach().reshape(-1).float() for g in grads]
        numel = flat[0].numel()
        if any(g.numel() != numel for g in flat):
            raise ValueError(f"Simulator.step: gradients must all have {numel} entries, got {[g.numel() for g in flat]}")
        compressor = self.compressor
        if compressor.traits.dense:
            dtype = compressor.traits.allreduce_dtype or torch.float32
            total = [self.exchange.reduce(g.to(dtype)) for g in flat][0].wait()
            self.wire_bytes += self.world_size * total.numel() * total.element_size()
            self.steps += 1
            return total.float().div_(self.world_size)
        layout = self.layout(numel)
        keys = layout.keys
        memories = [
            bank.get(0, keys, layout.param_numels, compressor.memory_names, flat[0].device,
                     compressor.memory_dtypes)
            for bank in self.banks
        ]
        compressed = [compressor.compress(g, m, layout, self.steps) for g, m in zip(flat, memories)]
        self.last_compressed = compressed
        gathered = [self.exchange.start(c.payload) for c in compressed][0].wait()
        self.wire_bytes += gathered.numel()
        aggregated = compressor.aggregate(gathered, layout, self.steps)
        if not bool(aggregated.usable.all()):
            self.skipped_steps += 1
            return torch.full_like(aggregated.average, float("nan"))
        results = [compressor.commit(m, c, aggregated.average, layout) for m, c in zip(memories, compressed)]
        self.steps += 1
        return results[0]

    def memory(self, rank: int, name: str) -> torch.Tensor:
        """Worker ``rank``'s memory ``name`` (for example ``"residual"``), flat."""
        found = self.banks[rank].buckets.get(0)
        if found is None or name not in found.entries:
            names = list(found.entries) if found else []
            raise KeyError(f"Simulator.memory: worker {rank} has no memory {name!r} (has {names})")
        return found.entries[name]

    def memory_bytes(self, rank: int = 0) -> Dict[str, int]:
        """Worker ``rank``'s compressor memory in bytes, by name and ``"total"`` (measured from its
        tensors, as ``state.stats()["memory_bytes"]`` is)."""
        return self.banks[rank].nbytes()

    def signal(self, signal: Signal) -> None:
        """Hands ``signal`` to the compressor when its traits ask for that kind (as the hook's
        state does)."""
        self.compressor.receive(signal)

    def report_metric(self, value: float, higher_is_better: bool = True) -> None:
        """A validation metric, as every worker would report it (see ``CompressionState``)."""
        self.signal(Metric(float(value), bool(higher_is_better)))

    def report_loss(self, loss: float) -> None:
        """The training loss of the coming step, as every worker would report it."""
        self.signal(Loss(loss))

    def note_timing(self, comm_share: float) -> None:
        """A scripted communication share of the step (the hook measures it; see granular)."""
        self.signal(CommShare(float(comm_share)))

    def state_dict(self) -> Dict[str, object]:
        return {"steps": self.steps, "banks": [bank.state_dict() for bank in self.banks],
                "compressor_state": self.compressor.state_dict()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.steps = int(state["steps"])
        self.compressor.load_state_dict(state.get("compressor_state", {}))
        for bank, saved in zip(self.banks, state["banks"]):
            bank.load_state_dict(saved)


def simulate(compressor: str, grads: List[List[torch.Tensor]], **options) -> List[torch.Tensor]:
    """Runs a whole sequence of steps (``grads[t][worker]``) and returns the averages."""
    sim = Simulator(compressor, world_size=len(grads[0]), **options)
    return [sim.step(step_grads) for step_grads in grads]
