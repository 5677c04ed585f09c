"""Issue 31, value codecs: `topk` with fp32, int8, int4, int2 and sign values at the same density
(the same entries kept), so that only the bits per value differ. Each (workload, split, seed) is
one ``gradsieve-train --compare``; ``summary`` prints the final metric per codec (mean ± std over
seeds) with the bits each kept entry costs on the wire, all included, for int32, csr16 and local
indices (over a bucket of 1M entries).

    python experiments/density/value_codecs.py run --workloads digits charlm --seeds 0 1 2
    python experiments/density/value_codecs.py run --workloads textcls --wires int4:32 int2:8 \
        --equal-bytes --seeds 0 1 2     # chosen (codec, chunk) pairs at int8's bytes
    python experiments/density/value_codecs.py summary
    python experiments/density/value_codecs.py plot      # results/codecs/pareto_<workload>.png
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "python"))

from sweeps import load, mean_std, train  # noqa: E402

from gradsieve.wire import PayloadFormat  # noqa: E402

CODECS = ["fp32", "int8", "int4", "int2", "sign"]
RESULTS = os.path.join(HERE, "results", "codecs")
WORKLOADS = {  # workload -> extra arguments and the metric reported
    "digits": ([], "accuracy"),
    "charlm": (["--model-size", "small", "--steps", "300"], "eval_loss"),
    "textcls": (["--model-size", "base"], "accuracy"),
}


def variants(density: float) -> List[str]:
    return [f"topk:density={density}:values={codec}" for codec in CODECS]


def equal_bytes_variants(density: float, wires: List[Tuple[str, int]] = ()) -> List[str]:
    """int8 values (chunk 256) at ``density`` and each codec below a byte (``wires``: (codec,
    chunk) pairs; by default int4, int2 and sign with chunk 256) at the density that costs the same
    bytes (local index, over a bucket of 1M entries): fewer bits per entry buy more entries."""
    budget = density * bits_per_entry("int8", "local", density)
    out = [f"topk:density={density}:values=int8:index=local"]
    for codec, chunk in wires or [(c, 256) for c in ("int4", "int2", "sign")]:
        d = density
        for _ in range(20):  # bits per entry fall slowly with the density: a fixed point
            d = budget / bits_per_entry(codec, "local", d, chunk=chunk)
        out.append(f"topk:density={d:.5f}:values={codec}" + (f":chunk={chunk}" if chunk != 256 else "")
                   + ":index=local")
    return out


def wire_variants(density: float, wires: List[Tuple[str, int]]) -> List[str]:
    """int8 (chunk 256) and each (codec, chunk) of ``wires`` at ``density``, local index."""
    return [f"topk:density={density}:values=int8:index=local"] + [
        f"topk:density={density}:values={codec}:chunk={chunk}:index=local" for codec, chunk in wires]


def bits_per_entry(codec: str, index: str, density: float, numel: int = 1_000_000, chunk: int = 256) -> float:
    """Bits per kept entry of one payload over a bucket of ``numel`` entries (header included)."""
    k = max(1, round(density * numel))
    return PayloadFormat(k, codec, min(chunk, k), index, numel).bits_per_entry


def run(args) -> None:
    for workload in args.workloads:
        extra, _ = WORKLOADS[workload]
        for density in args.densities:
            for seed in args.seeds:
                split = "het" if args.heterogeneous else "iid"
                wires = [(w.split(":")[0], int(w.split(":")[1])) for w in args.wires]
                tag = ("bytes-" if args.equal_bytes else "") + ("wires-" if wires else "")
                out = os.path.join(RESULTS, f"{workload}-{split}-{tag}d{density}-s{seed}")
                if os.path.exists(os.path.join(out, "metrics.json")):
                    continue
                if args.equal_bytes:
                    chosen = equal_bytes_variants(density, wires)
                else:
                    chosen = wire_variants(density, wires) if wires else variants(density)
                train(out, workload, args.heterogeneous, seed, extra, chosen)


def summary(_args) -> None:
    found = load(RESULTS)
    for setting in sorted(found):
        workload = setting.split("-")[0]
        metric = WORKLOADS[workload][1]
        density = float(setting.rsplit("d", 1)[1])
        print(f"\n{setting} ({metric}, mean ± std over seeds)")
        print("| values | density | bits/entry int32 | csr16 | local | KB/step sent | " + metric + " | seeds |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, records in found[setting].items():
            options = records[0].get("options", {})
            codec = options.get("values", "fp32") if "topk" in name else name
            chunk = int(options.get("chunk", 256))
            d = float(records[0].get("density") or density)
            scale = 100.0 if metric == "accuracy" else 1.0
            value = mean_std([r.get(metric) for r in records], scale)
            bits = (" | ".join(f"{bits_per_entry(codec, index, d, chunk=chunk):.1f}"
                               for index in ("int32", "csr16", "local"))
                    if codec in CODECS else "- | - | -")
            kb = mean_std([r.get("wire_bytes_per_step") for r in records], 1e-3, 3)
            label = codec if chunk == 256 else f"{codec} chunk {chunk}"
            print(f"| {label} | {d:g} | {bits} | {kb} | {value} | {len(records)} |")


def plot(_args) -> None:
    """Final metric against bytes per step (mean over seeds), one point per codec and density, one
    panel per workload and split: results/codecs/pareto_<workload>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = load(RESULTS)
    by_workload = {}
    for setting, runs in found.items():
        by_workload.setdefault(setting.split("-")[0], []).append((setting, runs))
    for workload, settings in by_workload.items():
        metric = WORKLOADS[workload][1]
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for setting, runs in sorted(settings):
            for name, records in runs.items():
                codec = records[0].get("options", {}).get("values", "fp32")
                x = statistics.mean(r["wire_bytes_per_step"] for r in records) / 1e3
                y = statistics.mean(r[metric] for r in records)
                marker = "s" if "-bytes-" in setting else "o"
                ax.scatter([x], [y], marker=marker, label=f"{codec} {setting.split('-', 2)[2]}")
                ax.annotate(codec, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("KB sent per step (wire_bytes_per_step)")
        ax.set_ylabel(metric)
        ax.set_title(f"topk on {workload}: value codecs (o equal density, s equal bytes)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"pareto_{workload}.png"), dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--workloads", nargs="+", default=["digits"], choices=sorted(WORKLOADS))
    r.add_argument("--densities", nargs="+", type=float, default=[0.01])
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--heterogeneous", action="store_true")
    r.add_argument("--equal-bytes", action="store_true",
                   help="int8 at each density against int4/int2/sign at the same bytes (local index)")
    r.add_argument("--wires", nargs="+", default=[], metavar="CODEC:CHUNK",
                   help="these (codec, chunk) pairs instead of every codec at chunk 256, against "
                   "int8 (local index); with --equal-bytes, each at int8's bytes")
    sub.add_parser("summary")
    sub.add_parser("plot")
    args = parser.parse_args()
    {"run": run, "summary": summary, "plot": plot}[args.command](args)


if __name__ == "__main__":
    main()
