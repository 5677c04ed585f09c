"""N workers in one process, running exactly the compressor code the DDP hook runs.

The simulator runs each worker's round of the exchange (:mod:`gradsieve.exchange`: the same
phases the hook runs, their collectives answered in one process by
:func:`~gradsieve.exchange.run_together`) and the same compressor code, so its averages equal the
hook's bit for bit (on CPU, for the sparse compressors; sums of more than two workers' values,
dense or in the ``allreduce`` exchange, are added in rank order here and in the library's order in
torch.distributed). With ``nodes`` and ``local`` it knows the cluster's layout, for the
``hierarchical`` exchange. It is meant for studying algorithms (heterogeneous data, many workers)
and for tests.

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
from gradsieve.exchange import Collective, Exchange, Phase, get_exchange, run_together
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
        nodes, local: the cluster's layout, ``nodes`` nodes of ``local`` workers (worker ``w`` on
            node ``w // local``); give them instead of ``world_size`` (or with it: then
            ``world_size == nodes * local``). Default: one node of ``world_size`` workers.
        exchange: a registered exchange name (``gradsieve.available_exchanges()``, default
            ``"allgather"``); ``exchange_options`` its options besides the layout (e.g.
            ``{"cross": "allreduce"}`` for ``hierarchical``).
        **options: compressor options (``density``, ...), validated by the registry.
    """

    def __init__(
        self,
        compressor: Union[str, Compressor],
        world_size: Optional[int] = None,
        param_sizes: Optional[Sequence[int]] = None,
        param_ndims: Optional[Sequence[int]] = None,
        param_keys: Optional[Sequence[int]] = None,
        nodes: Optional[int] = None,
        local: Optional[int] = None,
        exchange: str = "allgather",
        exchange_options: Optional[Dict[str, object]] = None,
        **options,
    ) -> None:
        for name, value in (("nodes", nodes), ("local", local)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Simulator: {name} must be an integer >= 1, got {value!r}")
        if nodes is not None or local is not None:
            if nodes is None or local is None:
                raise ValueError(f"Simulator: give nodes and local together, got nodes={nodes!r}, local={local!r}")
            if world_size is not None and world_size != nodes * local:
                raise ValueError(f"Simulator: world_size {world_size!r} is not nodes * local = {nodes * local}")
            world_size = nodes * local
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
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
        exchange_options = dict(exchange_options or {})
        if exchange == "hierarchical":
            exchange_options.setdefault("local", local or world_size)
        self.exchange: Exchange = get_exchange(exchange, None, simulated_world=world_size, **exchange_options)
        self.exchange.accepts(self.compressor)
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
            total = flat[0].to(dtype).clone()
            for g in flat[1:]:
                total += g.to(dtype)
            self.wire_bytes += self.world_size * total.numel() * total.element_size()
            self.steps += 1
            return total.float().div_(self.world_size)
        layout = self.layout(numel)
        rounds = [self.exchange.round(g, layout, worker) for worker, g in enumerate(flat)]
        parts = run_together([r.prepare() for r in rounds])
        memories = [
            bank.get(part.index, part.keys, part.param_numels, compressor.memory_names, flat[0].device,
                     compressor.memory_dtypes)
            for bank, (_, part) in zip(self.banks, parts)
        ]
        compressed = run_together([r.compress(compressor, grad, m, part, self.steps)
                                   for r, (grad, part), m in zip(rounds, parts, memories)])
        self.last_compressed = compressed
        received = run_together([_exchanged(r.send(c)) for r, c in zip(rounds, compressed)])
        # Every worker's payload, and the index sets an exchange broadcast (as the hook counts them).
        self.wire_bytes += sum(c.payload.numel() * c.payload.element_size() + r.index_bytes
                               for c, r in zip(compressed, rounds))
        # Every member of a payload group decodes the same payloads: once per group.
        aggregated = {}
        for r, got, (_, part) in zip(rounds, received, parts):
            if r.payload_group not in aggregated:
                aggregated[r.payload_group] = r.aggregate(compressor, got, part, self.steps)
        kept = all(bool(a.usable.all()) for a in aggregated.values())
        for r in rounds:
            r.settled(kept)
        if not kept:
            self.skipped_steps += 1
            return torch.full((numel,), float("nan"))
        results = [compressor.commit(m, c, aggregated[r.payload_group].average, part)
                   for r, m, c, (_, part) in zip(rounds, memories, compressed, parts)]
        finished = run_together([r.finish(result, True, ()) for r, result in zip(rounds, results)])
        self.steps += 1
        return finished[0][0]

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


def _exchanged(collective: Collective) -> Phase:
    """A phase that asks for one collective and returns its result."""
    return (yield collective)


def simulate(compressor: str, grads: List[List[torch.Tensor]], **options) -> List[torch.Tensor]:
    """Runs a whole sequence of steps (``grads[t][worker]``) and returns the averages."""
    sim = Simulator(compressor, world_size=len(grads[0]), **options)
    return [sim.step(step_grads) for step_grads in grads]
