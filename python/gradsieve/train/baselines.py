"""PyTorch's own DDP communication, as ``gradsieve-train`` baselines.

These are what a user would pick instead of gradsieve, run with torch's code, not ours:

* ``none``: DDP's default: no hook, DDP's built-in all-reduce of every bucket in the gradients'
  dtype (fp32 for the workloads here).
* ``torch-fp16``, ``torch-bf16``: ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks``'s
  ``fp16_compress_hook`` and ``bf16_compress_hook`` (cast, all-reduce, cast back).
* ``powersgd``: ``PowerSGDState`` + ``powerSGD_hook`` (Vogels et al. 2019, arXiv 1905.13727) with
  error feedback and warm start (torch's defaults). ``start_iter`` is its dense warm-up: torch's
  docs advise starting at 10% of the training steps, which is the default here.

Each registration returns a :class:`ByteCount` that the training loop reads like a gradsieve
``CompressionState``: ``wire_bytes`` (bytes this rank put into collectives) and ``dense_bytes``
(what DDP's own all-reduce of the buckets, in their dtype, moves).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping

from gradsieve.options import Option, resolve

__all__ = ["BASELINES", "ByteCount", "is_baseline", "baseline_options", "register_baseline"]


@dataclasses.dataclass
class ByteCount:
    """Statistics of a torch hook, in the form of ``CompressionState.stats()``."""

    name: str
    wire_bytes: int = 0
    dense_bytes: int = 0
    step: int = 0

    def stats(self) -> Dict[str, Any]:
        return {
            "compressor": self.name,
            "steps": self.step,
            "wire_bytes": self.wire_bytes,
            "dense_bytes": self.dense_bytes,
            "compression_ratio": self.dense_bytes / self.wire_bytes if self.wire_bytes else float("nan"),
            "compress_s": None,
            "decode_s": None,
            "skipped_steps": 0,
        }


def _none(ddp, options, steps, counter: ByteCount) -> Callable[[], None]:
    # No hook: DDP all-reduces every parameter's gradient, in its dtype, each step.
    per_step = sum(p.numel() * p.element_size() for p in ddp.parameters() if p.requires_grad)
    dense = per_step

    def after_step() -> None:
        counter.wire_bytes += per_step
        counter.dense_bytes += dense
        counter.step += 1

    return after_step


def _torch_cast(hook_name: str):
    """Registers torch's ``default_hooks.<hook_name>`` (a 16-bit cast around the all-reduce)."""

    def register(ddp, options, steps, counter: ByteCount) -> Callable[[], None]:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        torch_hook = getattr(default_hooks, hook_name)

        def hook(process_group, bucket):  # no annotations: DDP checks them against the real types
            counter.wire_bytes += bucket.buffer().numel() * 2
            counter.dense_bytes += bucket.buffer().numel() * bucket.buffer().element_size()
            counter.step += int(bucket.is_last())
            return torch_hook(process_group, bucket)

        ddp.register_comm_hook(None, hook)
        return lambda: None

    return register


def _powersgd(ddp, options, steps, counter: ByteCount) -> Callable[[], None]:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    start = options["start_iter"]
    if start is None:  # torch's advice: about 10% of the training steps, and at least 2
        start = max(2, steps // 10)
    state = powersgd.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=options["rank"],
        start_powerSGD_iter=start,
        min_compression_rate=options["min_compression_rate"],
        use_error_feedback=True,
        warm_start=True,
        random_seed=0,
    )

    def hook(state_, bucket):
        before = state.total_numel_after_compression
        future = powersgd.powerSGD_hook(state, bucket)
        sent = state.total_numel_after_compression - before
        # Before start_iter PowerSGD runs a plain all-reduce of the bucket (and counts nothing).
        elements = sent if sent else bucket.buffer().numel()
        counter.wire_bytes += elements * bucket.buffer().element_size()
        counter.dense_bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        counter.step += int(bucket.is_last())
        return future

    ddp.register_comm_hook(state, hook)
    return lambda: None


@dataclasses.dataclass(frozen=True)
class Baseline:
    name: str
    doc: str
    OPTIONS: Mapping[str, Option]
    register: Callable[..., Callable[[], None]]


def _positive_int_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, int) and v >= 2)


BASELINES: Dict[str, Baseline] = {
    "none": Baseline("none", "DDP's default: dense all-reduce, no hook", {}, _none),
    "torch-fp16": Baseline("torch-fp16", "torch's fp16_compress_hook", {}, _torch_cast("fp16_compress_hook")),
    "torch-bf16": Baseline("torch-bf16", "torch's bf16_compress_hook", {}, _torch_cast("bf16_compress_hook")),
    "powersgd": Baseline("powersgd", "torch's PowerSGD hook (error feedback, warm start)", {
        "rank": Option(1, "matrix approximation rank (torch's matrix_approximation_rank)", kind=int,
                       check=lambda v: v >= 1, allowed="an integer >= 1"),
        "start_iter": Option(None, "dense all-reduce steps before PowerSGD starts (torch's "
                             "start_powerSGD_iter; default 10% of the steps, at least 2)", kind=int,
                             check=_positive_int_or_none, allowed="an integer >= 2"),
        "min_compression_rate": Option(2.0, "compress a matrix only if it shrinks at least this much",
                                       check=lambda v: v >= 1.0, allowed=">= 1"),
    }, _powersgd),
}


def is_baseline(name: str) -> bool:
    return name in BASELINES


def baseline_options(name: str, given: Mapping[str, Any]) -> Dict[str, Any]:
    """Validated options of a baseline (ValueError names the option and what is allowed)."""
    spec = BASELINES[name]
    declared = dict(spec.OPTIONS)
    # start_iter accepts None (its default) besides integers.
    if given.get("start_iter", 0) is None:
        given = {k: v for k, v in given.items() if k != "start_iter"}
    return resolve(f"baseline {name!r}", declared, given)


def register_baseline(name: str, ddp, options: Mapping[str, Any], steps: int):
    """Sets up baseline ``name`` on ``ddp``. Returns (ByteCount, after_step callable)."""
    counter = ByteCount(name)
    after_step = BASELINES[name].register(ddp, baseline_options(name, options), steps, counter)
    return counter, after_step
