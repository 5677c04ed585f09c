"""Saving and restoring a rank's :class:`~gradsieve.state.CompressionState`: one path, used by
``state_dict``/``load_state_dict`` and by pickling.

What is saved: the compressor's configuration (a checkpoint loads only into a state configured
alike), the warm-up, the hook's step, the compressor memory per parameter (so that it is placed
right whatever bucket layout the new process starts from), the compressor's run-time state and the
statistics, and the parameter keys of each bucket of DDP's current layout (the restored hook runs
DDP's first iteration in that layout, :mod:`gradsieve.resume`). Not saved: the process group and
the exchange's collectives, which parameter each key names (the hook learns that again from DDP's
first layout), and anything in flight (saving refuses while speculative exchanges are in flight).
"""

from __future__ import annotations

from typing import Any, Dict

from gradsieve.resume import FirstIteration

__all__ = ["STATS", "state_dict", "load_state_dict"]

# The statistics a checkpoint carries (the CompressionState attributes of the same names).
STATS = ("wire_bytes", "node_bytes", "dense_bytes", "compressed_steps", "skipped_steps", "compress_s", "decode_s",
         "bad_payloads", "bad_payload_ranks", "probe_s", "probe_count", "_last_probe", "wait_s",
         "rolled_back")


def state_dict(state: Any) -> Dict[str, Any]:
    if state.inflight.busy():
        raise ValueError("CompressionState.state_dict: speculative exchanges are still in flight or "
                         "not applied; call the SpeculativeOptimizer's state_dict() (or "
                         "synchronize()) first")
    return {
        "config": state.compressor.config(),
        "warmup_steps": state.warmup_steps,
        "step": state.step,
        "memory": state.memory.state_dict(),
        "compressor_state": state.compressor.state_dict(),
        "exchange": state.exchange.config(),
        "exchange_state": state.exchange.state_dict(),
        # The bucket layout the run is in: a restored hook runs DDP's first iteration in it.
        "layouts": state.bucket_layouts(),
        "stats": {key: getattr(state, key) for key in STATS},
    }


def load_state_dict(state: Any, saved: Dict[str, Any]) -> None:
    if saved["config"] != state.compressor.config():
        raise ValueError(
            f"CompressionState.load_state_dict: the checkpoint was made with {saved['config']}, "
            f"this state has {state.compressor.config()}"
        )
    exchange = saved.get("exchange", {"exchange": "allgather"})
    if exchange != state.exchange.config():
        raise ValueError(f"CompressionState.load_state_dict: the checkpoint was made with the exchange {exchange}, "
                         f"this state has {state.exchange.config()} (under the hierarchical exchange the "
                         f"compressor memory is per shard)")
    state.warmup_steps = int(saved["warmup_steps"])
    state.step = int(saved["step"])
    state.memory.load_state_dict(saved["memory"])
    state.compressor.load_state_dict(saved.get("compressor_state", {}))
    state.exchange.load_state_dict(saved.get("exchange_state", {}))
    layouts = saved.get("layouts")
    state.first_iteration = FirstIteration(layouts) if layouts else None
    for key, value in saved.get("stats", {}).items():
        if key not in STATS:
            raise ValueError(f"CompressionState.load_state_dict: unknown statistic {key!r} in the checkpoint")
        setattr(state, key, value)
