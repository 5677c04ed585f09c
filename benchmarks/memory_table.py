"""Compressor memory per gradient entry, measured.

Each registered compressor (default options, density 0.01) runs a few steps of the N-worker
Simulator on the parameter sizes of a small transformer block (2 x 512x512 attention weights, a
512x2048 and a 2048x512 MLP weight, biases and norms: 1.84M entries), so that every memory it keeps
(residual, momentum, history, predictor weights and Adam moments, smoothed averages) exists. The
bytes are read from worker 0's memory tensors (``Simulator.memory_bytes``, the same count as
``state.stats()["memory_bytes"]`` in the DDP hook) and divided by the number of gradient entries.

    python benchmarks/memory_table.py            # prints a Markdown table, writes results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import gradsieve

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = (512 * 512, 512, 512 * 512, 512, 512 * 2048, 2048, 2048 * 512, 512, 512, 512)
NDIMS = (2, 1, 2, 1, 2, 1, 2, 1, 1, 1)


EXTRA = ("predictive:history_dtype=bf16", "predictive:history=1")  # options that change memory


def measure(spec: str, steps: int, world: int = 2):
    name, *pairs = spec.split(":")
    options = {} if gradsieve.get_compressor(name).traits.dense else {"density": 0.01}
    for pair in pairs:
        key, value = pair.split("=")
        options[key] = int(value) if value.isdigit() else value
    sim = gradsieve.Simulator(name, world_size=world, param_sizes=SIZES, param_ndims=NDIMS, **options)
    numel = sum(SIZES)
    if name == "granular":
        # What one probe leaves (the hook's state.probe; the Simulator has no model to probe): a
        # Hessian-diagonal estimate per parameter.
        for key, size in enumerate(SIZES):
            sim.compressor.store_probe(sim.banks[0].params, key, torch.zeros(size))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        sim.step([torch.randn(numel, generator=g) for _ in range(world)])
    return sim.memory_bytes(0), numel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "memory.json"))
    args = parser.parse_args()
    rows = {}
    for name in sorted(gradsieve.available_compressors()) + list(EXTRA):
        sizes, numel = measure(name, args.steps)
        rows[name] = {"bytes": sizes, "numel": numel}
    lines = ["| compressor | bytes per gradient entry | what (bytes per entry) |", "|---|---|---|"]
    for name, row in rows.items():
        numel = row["numel"]
        big = [(key, value) for key, value in sorted(row["bytes"].items())
               if key != "total" and value >= 0.01 * numel]
        small = sum(value for key, value in row["bytes"].items() if key != "total" and value < 0.01 * numel)
        parts = [f"{key} {value / numel:.3g}" for key, value in big]
        if small:
            parts.append(f"the rest {small / numel:.2g} ({small} B)")
        lines.append(f"| `{name}` | {row['bytes']['total'] / numel:.3g} | {', '.join(parts) or '-'} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"sizes": SIZES, "steps": args.steps, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
