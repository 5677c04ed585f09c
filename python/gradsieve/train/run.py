"""One training run of ``gradsieve-train`` on one rank: model, DDP, the communication under test,
the step loop with its clock, and the evaluations that time-to-target is read from.

The clock: each step is timed from drawing its batch to the end of the optimizer step (the loss is
read, which waits for it); evaluations are not on the clock. ``seconds`` in the evaluation history
is the training time spent up to that step, so time-to-target is what a user training without
evaluations would wait.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from gradsieve.compressor import Traits
from gradsieve.hook import compression_hook
from gradsieve.registry import compressor_class
from gradsieve.signals import Loss
from gradsieve.speculative import SpeculativeOptimizer, split_options
from gradsieve.state import CompressionState
from gradsieve.exchange import get_exchange
from gradsieve.train import cluster, link
from gradsieve.train.baselines import is_baseline, register_baseline
from gradsieve.train.checkpoint import RunCheckpoints, fault_point
from gradsieve.train.progress import Progress
from gradsieve.train.workloads import epochs_to_steps

__all__ = ["RunSpec", "train_one", "eval_steps"]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of a comparison: a gradsieve compressor or one of torch's baselines."""

    compressor: str
    options: Dict[str, Any]
    variant: str = ""  # the options given in --compare as name:key=value (e.g. "values=int8")

    @property
    def name(self) -> str:
        """How the table names the run: the compressor, its variant, PowerSGD's rank."""
        name = self.compressor + (f":{self.variant}" if self.variant else "")
        if self.compressor == "powersgd" and "rank=" not in self.variant:
            name += f" r{self.options.get('rank', 1)}"
        return name

    @property
    def label(self) -> str:
        """The name with the density, for plots and progress."""
        if "density" in self.options:
            return f"{self.name} {self.options['density']:g}"
        return self.name

    @property
    def from_torch(self) -> bool:
        return is_baseline(self.compressor)


# Run options that choose the exchange (``--compare topk:exchange=hierarchical``), not the compressor.
EXCHANGE_OPTIONS = ("exchange", "select")
EXCHANGES = ("allgather", "hierarchical", "allreduce", "hierarchical+allreduce")


def split_exchange(options: Dict[str, Any]) -> tuple:
    """(the options without the exchange's, (exchange name, its options)); ValueError naming a
    value that is not allowed."""
    rest = {k: v for k, v in options.items() if k not in EXCHANGE_OPTIONS}
    name = options.get("exchange", "allgather")
    if name not in EXCHANGES:
        raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}, got {name!r}")
    mine: Dict[str, Any] = {}
    if "select" in options:
        if "allreduce" not in name:
            raise ValueError(f"select= chooses the allreduce exchange's index set; exchange {name!r} has none")
        mine["select"] = options["select"]
    if name == "hierarchical+allreduce":
        return rest, ("hierarchical", {"cross": "allreduce", "cross_options": mine})
    return rest, (name, mine)


def check_exchange(compressor: str, options: Dict[str, Any], exchange) -> None:
    """Validates the exchange's options and that it can move ``compressor`` (no process group
    needed)."""
    name, mine = exchange
    built = get_exchange(name, simulated_world=1, **({"local": 1} if name == "hierarchical" else {}), **mine)
    from gradsieve.registry import get_compressor

    built.accepts(get_compressor(compressor, **options))


def _per_step(total: Optional[int], steps: int) -> Optional[float]:
    return None if total is None or not steps else total / steps


def eval_steps(steps: int, every: int) -> List[int]:
    """The steps after which the model is evaluated: 0 (the initial model), every ``every`` steps,
    and the last step."""
    points = list(range(0, steps, max(1, every)))
    if points[-1] != steps:
        points.append(steps)
    return points


def _optimizer(args, spec: RunSpec, params) -> torch.optim.Optimizer:
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr)
    momentum = 0.0 if "momentum" in spec.options else args.momentum
    return torch.optim.SGD(params, lr=args.lr, momentum=momentum)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _signature(args, spec: RunSpec, world: int, steps: int) -> Dict[str, Any]:
    """What a checkpoint must agree on with the run that resumes it."""
    fields = ("workload", "model_size", "seed", "batch_size", "lr", "optimizer", "momentum",
              "heterogeneous", "warmup_steps")
    return {**{f: getattr(args, f, None) for f in fields}, "steps": steps, "world_size": world,
            "run": spec.name, "options": dict(spec.options)}


def _check_signature(saved: Dict[str, Any], now: Dict[str, Any], path: str) -> None:
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise ValueError(f"--resume: {path} was written with {key}={saved.get(key)!r}, this run has "
                             f"{key}={now.get(key)!r}; resume with the same arguments or use a new "
                             "--checkpoint-dir")


def _replay_first_iteration(ddp, model, workload, args, device, saved) -> None:
    """A resumed process running one of PyTorch's own hooks replays DDP's first iteration (forward
    and backward of a throw-away batch, no optimizer step): DDP then rebuilds its buckets in the
    order the uninterrupted run used. The model's buffers (batch-norm statistics) are reloaded
    afterwards. gradsieve's hook needs no replay: after ``load_state_dict`` it runs DDP's first
    iteration in the saved bucket layout by itself."""
    x, y = workload.batch(torch.Generator().manual_seed(0), args.batch_size)
    workload.loss(ddp(x.to(device)), y.to(device)).backward()
    ddp.zero_grad(set_to_none=True)
    model.load_state_dict(saved["model"])


def train_one(args, spec: RunSpec, workload, rank: int, world: int, device: torch.device,
              index: int = 0) -> Dict[str, Any]:
    """Trains ``spec`` from the initial model of ``args.seed``; returns rank 0's record of the run
    (the losses are every rank's, averaged). With ``args.checkpoint_dir`` it saves a checkpoint
    every ``args.checkpoint_every`` steps and the finished record; with ``args.resume`` it
    continues from the newest checkpoint every rank has (``index``: the run's place in the
    comparison)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(args.seed)  # the same initial model on every rank and in every run
    model = workload.model().to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps = args.steps or epochs_to_steps(args.epochs, workload.shard_size, args.batch_size)
    wrapper = None
    if spec.from_torch:
        state, after_step = register_baseline(spec.compressor, ddp, spec.options, steps)
    else:
        options, (exchange, exchange_options) = split_exchange(dict(spec.options))
        options, wrapper = split_options(spec.compressor, options)
        if "horizon" in compressor_class(spec.compressor).OPTIONS and "horizon" not in options:
            # A compressor that declares a horizon (granular's progress signal) gets the run's
            # length in compressed steps.
            options["horizon"] = max(0, steps - args.warmup_steps)
        state = CompressionState(spec.compressor, warmup_steps=args.warmup_steps,
                                 exchange=get_exchange(exchange, **exchange_options), **options)
        ddp.register_comm_hook(state, compression_hook)
        after_step = None
    traits = Traits() if spec.from_torch else state.compressor.traits
    optimizer = _optimizer(args, spec, ddp.parameters())
    if not spec.from_torch:
        state.watch_optimizer(optimizer)
    if wrapper is not None:
        # Speculative training: the model holds this rank's working weights; evaluations and the
        # finished model use the global weights (the same on every rank).
        overlap = wrapper["overlap_compress"]
        optimizer = SpeculativeOptimizer(optimizer, state, revert_threshold=wrapper["revert_threshold"],
                                         overlap_compress=None if overlap == "auto" else overlap)
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + rank)  # same batches in every run
    evaluate_at = set(eval_steps(steps, args.eval_every or max(1, steps // 20)))

    losses, cum_bytes, step_times, evals, link_cum = [], [], [], [], []
    clock = 0.0
    start = 0
    signature = _signature(args, spec, world, steps)
    checkpoints = None
    if getattr(args, "checkpoint_dir", None):
        checkpoints = RunCheckpoints(args.checkpoint_dir, index, spec.name, rank)
        if getattr(args, "resume", False):
            done = checkpoints.finished(device)
            if done is not None:
                _check_signature(done["signature"], signature, checkpoints.done_path)
                return done["record"]
            at = checkpoints.newest_common(device)
            if at is not None:
                saved = checkpoints.load(checkpoints.path(at))
                _check_signature(saved["signature"], signature, checkpoints.path(at))
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                if spec.from_torch:
                    for key, value in saved["state"].items():
                        setattr(state, key, value)
                    _replay_first_iteration(ddp, model, workload, args, device, saved)
                else:
                    state.load_state_dict(saved["state"])
                generator.set_state(saved["generator"])
                torch.set_rng_state(saved["torch_rng"])
                if device.type == "cuda" and saved.get("cuda_rng") is not None:
                    torch.cuda.set_rng_state(saved["cuda_rng"], device)
                losses, cum_bytes, step_times = saved["losses"], saved["cum_bytes"], saved["step_times"]
                evals, link_cum, clock = saved["evals"], saved["link_cum"], saved["clock"]
                start = at
                if rank == 0:
                    print(f"gradsieve-train: {spec.label}: resumed after step {at} from {checkpoints.dir}",
                          file=sys.stderr, flush=True)
    every = getattr(args, "checkpoint_every", None) if checkpoints is not None else None
    fault = fault_point() if start == 0 else None

    def save_checkpoint(done_steps: int) -> None:
        checkpoints.save(done_steps, {
            "signature": signature, "step": done_steps, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "state": dataclasses.asdict(state) if spec.from_torch else state.state_dict(),
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "losses": losses, "cum_bytes": cum_bytes, "step_times": step_times, "evals": evals,
            "link_cum": link_cum, "clock": clock,
        })

    def evaluate(step: int) -> None:
        model.eval()
        if wrapper is not None:
            with optimizer.global_weights():
                loss, accuracy = workload.evaluate(model, device)
        else:
            loss, accuracy = workload.evaluate(model, device)
        model.train()
        point = {"step": step, "seconds": clock, "loss": loss, "accuracy": accuracy}
        if not spec.from_torch:
            # The metric goes to the compressor (predictive adapts its density to it), as rank 0
            # measured it, so that every rank reports the very same number.
            shared = torch.tensor([accuracy if accuracy is not None else loss], dtype=torch.float64,
                                  device=device)
            dist.broadcast(shared, src=0)
            state.report_metric(float(shared), higher_is_better=accuracy is not None)
        if not spec.from_torch:
            # What the compressor reports (e.g. predictive's density now, granular's levels
            # played, adaptive's entries sent so far: rank 0's), under the names it gives.
            counters = state.stats()
            for stat, field in traits.reports:
                if stat in counters:
                    point[field] = counters[stat]
        evals.append(point)

    # What the compressor asks of the loop: this rank's loss before each backward, a curvature
    # probe after each optimizer step (when due).
    wants_loss = Loss in traits.signals
    probing = None
    if traits.probes:
        def probing(module, data):
            return workload.loss(module(data[0]), data[1])

    progress = Progress(steps, spec.label) if rank == 0 and not args.no_progress else None
    if progress is not None and start:
        progress.update(start)
    if 0 in evaluate_at and start == 0:
        evaluate(0)
    # Bytes through the shaped loopback (all ranks, headers included), read by rank 0 every step.
    in_cluster = cluster.NIC_ENV in os.environ
    link_before = (link.tx_bytes() - (link_cum[-1] if link_cum else 0) if args.link and rank == 0 and not in_cluster
                   else None)
    # On an emulated cluster: the bytes this node's NIC sends, read by its local rank 0.
    nic_before = cluster.nic_tx_bytes() if in_cluster and os.environ.get("LOCAL_RANK") == "0" else None
    steady = min(max(args.warmup_steps, start), steps)  # cross-node bytes are counted from here
    for step in range(start, steps):
        if in_cluster and step == steady:
            # After the warm-up's dense steps, once every rank has sent all it had to.
            dist.barrier()
            if nic_before is not None:
                nic_before = cluster.nic_tx_bytes()
        if fault is not None and fault == (rank, step):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(17)  # a killed worker (tests: GRADSIEVE_FAULT_AT_STEP)
        _sync(device)
        started = time.perf_counter()
        x, y = workload.batch(generator, args.batch_size)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        output = ddp(x)
        loss = workload.loss(output, y)
        if wants_loss:
            state.report_loss(loss.detach())  # not waited for
        loss.backward()
        optimizer.step()
        if probing is not None:
            # The curvature probe when it is due (on the clock: it is training cost).
            state.probe(model, probing, (x, y))
        value = loss.item()  # also waits for the step
        if wrapper is not None and step + 1 in evaluate_at:
            optimizer.synchronize()  # the evaluation needs this step's exchange: wait on the clock
        _sync(device)
        elapsed = time.perf_counter() - started
        clock += elapsed
        step_times.append(elapsed)
        if after_step is not None:
            after_step()
        losses.append(value)
        cum_bytes.append(state.wire_bytes)
        if link_before is not None:
            link_cum.append(link.tx_bytes() - link_before)
        if step + 1 in evaluate_at:
            evaluate(step + 1)
        if progress is not None:
            shown = {"loss": f"{value:.4f}"}
            if evals and evals[-1]["step"] == step + 1:
                shown["eval"] = f"{evals[-1]['loss']:.4f}"
                if evals[-1]["accuracy"] is not None:
                    shown["acc"] = f"{evals[-1]['accuracy']:.3f}"
            shown["sent"] = human_bytes(state.wire_bytes)
            progress.update(1, **shown)
        if every and (step + 1) % every == 0 and step + 1 < steps:
            save_checkpoint(step + 1)
    link_bytes: Optional[float] = None
    if args.link or in_cluster:
        # A rank's send returns once its bytes are in the socket buffer: the last step's may still
        # be queued when rank 0 reads the counter. After a barrier every rank has received all it
        # was sent, so the run's total is complete (the barrier adds a few bytes).
        dist.barrier()
        if link_before is not None:
            link_bytes = (link.tx_bytes() - link_before) / steps
    cross_node_bytes: Optional[float] = None
    if in_cluster:
        # Every node's NIC, summed: the bytes that crossed the switch per step after the warm-up.
        sent = torch.tensor([0.0 if nic_before is None else float(cluster.nic_tx_bytes() - nic_before)],
                            dtype=torch.float64, device=device)
        dist.all_reduce(sent)
        cross_node_bytes = float(sent.item()) / max(1, steps - steady)
    eval_loss, accuracy = evals[-1]["loss"], evals[-1]["accuracy"]
    if progress is not None:
        progress.close(loss=f"{losses[-1]:.4f}", eval=f"{eval_loss:.4f}",
                       acc="-" if accuracy is None else f"{accuracy:.3f}", sent=human_bytes(state.wire_bytes))

    # Every rank's training losses, averaged per step: the loss of the global batch.
    # A float64 tensor, not all_gather_object: no rank ever unpickles a peer's bytes.
    mine = torch.tensor(losses, dtype=torch.float64, device=device)
    everyone = torch.empty(world * mine.numel(), dtype=torch.float64, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(everyone, mine)
    gathered = everyone.view(world, -1).tolist()
    mean_losses = [sum(ls[i] for ls in gathered) / world for i in range(steps)]
    stats = state.stats()
    warm = max(args.warmup_steps, 1)
    timed = step_times[min(len(step_times) - 1, warm):]
    tail = mean_losses[-max(1, steps // 10):]
    record = {
        "compressor": spec.compressor,
        "name": spec.name,
        "label": spec.label,
        "source": "torch" if spec.from_torch else "gradsieve",
        "options": dict(spec.options),
        "density": spec.options.get("density"),
        "steps": steps,
        "eval_loss": eval_loss,
        "accuracy": accuracy,
        "train_loss": sum(tail) / len(tail),
        "wire_bytes_per_step": stats["wire_bytes"] / steps,
        "dense_bytes_per_step": stats["dense_bytes"] / steps,
        "compression_ratio": stats["compression_ratio"],
        "link_bytes_per_step": link_bytes,
        "cross_node_bytes_per_step": cross_node_bytes,
        "node_bytes_per_step": None if spec.from_torch else stats.get("node_bytes", 0) / steps,
        "time_per_step_s": statistics.median(timed),
        "train_seconds": clock,
        "compress_s_per_step": None if stats["compress_s"] is None else stats["compress_s"] / steps,
        "decode_s_per_step": None if stats["decode_s"] is None else stats["decode_s"] / steps,
        "skipped_steps": stats["skipped_steps"],
        # curvature probes (rank 0): how many, and their share of the training time.
        "probes": stats.get("probes", 0),
        "probe_share": stats.get("probe_s", 0.0) / clock if clock else None,
        # speculative training (rank 0): corrections, layer reverts, drift kept, extra memory.
        "speculative": {**optimizer.stats(), "wait_s_per_step": stats["wait_s"] / steps,
                        "rolled_back": stats.get("rolled_back", 0)}
        if wrapper is not None else None,
        "history": {"loss": mean_losses, "cum_bytes": cum_bytes, "step_s": step_times, "eval": evals,
                    "link_cum_bytes": link_cum},
    }
    # The compressor's reported counters (rank 0), per compressed step (e.g. adaptive's entries put
    # on the wire, and those it would have sent without its capacity).
    for stat, field in traits.reports:
        if stat in traits.counters:
            record[f"{field}_per_step"] = _per_step(stats.get(stat), stats.get("compressed_steps", 0))
    if checkpoints is not None:
        if wrapper is not None:
            with optimizer.global_weights():  # the finished model is the global one
                final = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            final = model.state_dict()
        checkpoints.save_done({"signature": signature, "record": record, "model": final})
    return record
