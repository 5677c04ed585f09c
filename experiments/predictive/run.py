"""The predictive compressor against topk, regtopk and ef21 at the same bytes per step.

Two studies:

* ``sweep``: ``gradsieve-train --compare`` for every (workload, data split, seed), all at density
  0.01 with int8 values (5 bytes per entry plus the int8 scales: the same bytes for every sparse
  variant, except adaptive k, whose bytes follow the metric). Each run's metrics go under
  ``results/<workload>-<split>-s<seed>/``; existing results are reused.
* ``precision``: 4 workers simulated in one process (:class:`gradsieve.Simulator`) train the same
  model; every step, precision at k of worker 0's selection against the global top-k (the top-k of
  the true average of the 4 dense gradients), for the predictor and for local magnitude (what
  ``topk`` sends from the same worker's own accumulator), and the predictor's training time.

    python experiments/predictive/run.py                 # both (about 25 min on 2 cores)
    python experiments/predictive/run.py --summarize     # tables and plots only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))
from sweeps import load as load_settings, mean_std, train  # noqa: E402

VARIANTS = [
    "none",
    "topk:values=int8",
    "regtopk:values=int8",
    "ef21:values=int8",
    "predictive:magnitude=0",
    "predictive:ranking=product:magnitude=0",
    "predictive:label=average:magnitude=0",
    "predictive:k_min=0.005:k_max=0.02:magnitude=0",
]
# Round 1 ran when all of k went by the learned score (magnitude 0, the first default); its results
# were relabelled with ":magnitude=0" when the default became 0.5. Round 2 (``--round 2``, results
# under ``<setting>-round2/``): a share of each k chosen by magnitude alone before the learned
# ranking picks the rest, added after the convergence test of the learned selection
# (tests/test_convergence.py: plain SGD, 600 steps) found the learned ranking alone 11 points under
# dense there.
ROUND2 = ["predictive:magnitude=0.25", "predictive:magnitude=0.5"]
WHAT = {
    "none": "dense fp32 all-reduce",
    "topk:values=int8": "top-k by magnitude, int8, error feedback",
    "regtopk:values=int8": "RegTop-k, int8",
    "ef21:values=int8": "EF21 top-k, int8",
    "predictive:magnitude=0": "all of k by the learned score (the first default)",
    "predictive:ranking=product:magnitude=0": "learned score x magnitude",
    "predictive:label=average:magnitude=0": "labels from this step's average only (the issue's literal label)",
    "predictive:k_min=0.005:k_max=0.02:magnitude=0": "adaptive k in [0.5%, 2%]",
    "predictive:magnitude=0.25": "a quarter of k by magnitude, the rest by the learned score",
    "predictive:magnitude=0.5": "half of k by magnitude, the rest by the learned score (the default)",
}
WORKLOADS = {"digits": ["--steps", "1000"], "charlm": []}
SEEDS = (0, 1, 2)


def sweep(only: List[str], round_: int = 1) -> None:
    variants, suffix = (VARIANTS, "") if round_ == 1 else (ROUND2, "-round2")
    for workload, extra in WORKLOADS.items():
        for heterogeneous in (False, True):
            for seed in SEEDS:
                tag = f"{workload}-{'het' if heterogeneous else 'iid'}-s{seed}"
                out = os.path.join(RESULTS, tag + suffix)
                if only and tag not in only:
                    continue
                if not os.path.exists(os.path.join(out, "metrics.json")):
                    train(out, workload, heterogeneous, seed, ["--density", "0.01", *extra], variants)


# ------------------------------------------------------------------------------------ precision
def precision(workload_name: str, heterogeneous: bool, steps: int, seed: int = 0) -> Dict[str, list]:
    """Simulated data-parallel training (4 workers, SGD on the average the compressor delivers)."""
    import torch

    import gradsieve
    from gradsieve import ops
    from gradsieve.compressors import predictive as pred_module
    from gradsieve.train.workloads import make_workload

    world, density = 4, 0.01
    torch.manual_seed(seed)
    shards = [make_workload(workload_name, r, world, seed, heterogeneous, None) for r in range(world)]
    model = shards[0].model()
    params = [p for p in model.parameters()]
    sizes = [p.numel() for p in params]
    ndims = [p.dim() for p in params]
    sim = gradsieve.Simulator("predictive", world_size=world, density=density, param_sizes=sizes,
                              param_ndims=ndims)
    topk = gradsieve.Simulator("topk", world_size=world, density=density, values="int8", param_sizes=sizes,
                               param_ndims=ndims)
    lr = 0.05 if workload_name == "digits" else 0.003
    optimizer = (torch.optim.SGD(params, lr=lr, momentum=0.9) if workload_name == "digits"
                 else torch.optim.Adam(params, lr=lr))
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + r) for r in range(world)]
    batch = 32 if workload_name == "digits" else 16
    n = sum(sizes)
    k = math.ceil(density * n)
    out = {"step": [], "predictor": [], "magnitude": [], "train_s": []}
    timed = []
    original = pred_module._job

    def timed_job(*args, **kwargs):
        began = time.perf_counter()
        result = original(*args, **kwargs)
        timed.append(time.perf_counter() - began)
        return result

    pred_module._job = timed_job
    try:
        for step in range(steps):
            grads = []
            for shard, gen in zip(shards, gens):
                x, y = shard.batch(gen, batch)
                model.zero_grad(set_to_none=True)
                shard.loss(model(x), y).backward()
                grads.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
            best = set(ops.topk_abs(torch.stack(grads).mean(0), k)[1].tolist())
            mine = (topk.memory(0, "residual") if topk.steps else torch.zeros(n)) + grads[0]
            magnitude = set(ops.topk_abs(mine, k)[1].tolist())
            average = sim.step(grads)
            topk.step(grads)
            chosen = set(sim.last_compressed[0].scratch["indices"].tolist())
            out["step"].append(step)
            out["predictor"].append(len(best & chosen) / k)
            out["magnitude"].append(len(best & magnitude) / k)
            offset = 0
            for p, size in zip(params, sizes):  # the model follows the predictive run
                p.grad = average[offset:offset + size].view_as(p).clone()
                offset += size
            optimizer.step()
    finally:
        pred_module._job = original
    # Each job is one parameter's training step; report per training step of the whole model.
    per_step = len(timed) / max(1, steps - 1)
    out["train_s_per_step"] = statistics.median(timed) * per_step if timed else None
    out["params"] = len(sizes)
    return out


def precision_study() -> None:
    os.makedirs(RESULTS, exist_ok=True)
    for workload, steps in (("digits", 600), ("charlm", 300)):
        for heterogeneous in (False, True):
            path = os.path.join(RESULTS, f"precision-{workload}-{'het' if heterogeneous else 'iid'}.json")
            if os.path.exists(path):
                continue
            print(f"precision: {workload} {'het' if heterogeneous else 'iid'}", flush=True)
            found = precision(workload, heterogeneous, steps)
            with open(path, "w") as f:
                json.dump(found, f)


# ------------------------------------------------------------------------------------ summaries
def summarize() -> None:
    lines = []
    table: Dict[str, Dict[str, dict]] = {}
    for setting, runs in load_settings(RESULTS).items():
        metric = "accuracy" if setting.startswith("digits") else "eval_loss"
        scale = 100.0 if metric == "accuracy" else 1.0
        lines += [f"### {setting} ({len(next(iter(runs.values())))} seeds; {metric}"
                  f"{' %' if scale == 100 else ''}: mean ± std)", "",
                  f"| variant | what | {metric} | train loss | bytes/step | ms/step | compress ms/step | final density |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in VARIANTS + ROUND2:
            records = runs.get(name)
            if not records:
                continue
            row = {metric: [r[metric] for r in records], "bytes": [r["wire_bytes_per_step"] for r in records],
                   "train_loss": [r["train_loss"] for r in records],
                   "step_ms": [1000 * r["time_per_step_s"] for r in records],
                   "compress_ms": [1000 * (r["compress_s_per_step"] or 0.0) for r in records],
                   "density": [r["history"]["eval"][-1].get("density") for r in records]}
            table.setdefault(setting, {})[name] = row
            lines.append(f"| `{name}` | {WHAT.get(name, '')} | {mean_std(row[metric], scale)} | "
                         f"{mean_std(row['train_loss'])} | {statistics.mean(row['bytes']) / 1024:.1f} KB | "
                         f"{mean_std(row['step_ms'], digits=3)} | "
                         f"{mean_std(row['compress_ms'], digits=3)} | {mean_std(row['density'], digits=3)} |")
        lines.append("")
    precision_rows = ["### precision at k against the global top-k (worker 0 of 4, simulated)", "",
                      "| setting | steps | predictor (last 100 steps) | local magnitude (last 100) | "
                      "predictor (first 50) | training ms/step (all parameters) |", "|---|---|---|---|---|---|"]
    for name in sorted(os.listdir(RESULTS)) if os.path.isdir(RESULTS) else []:
        if name.startswith("precision-") and name.endswith(".json"):
            with open(os.path.join(RESULTS, name)) as f:
                p = json.load(f)
            late = slice(-100, None)
            ms = p["train_s_per_step"] * 1000 if p.get("train_s_per_step") else float("nan")
            precision_rows.append(
                f"| {name[10:-5]} | {len(p['step'])} | {statistics.mean(p['predictor'][late]):.3f} | "
                f"{statistics.mean(p['magnitude'][late]):.3f} | {statistics.mean(p['predictor'][:50]):.3f} | "
                f"{ms:.2f} |")
    lines += precision_rows + [""]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(RESULTS, "summary.json"), "w") as f:
        json.dump(table, f, indent=1)
    plot()
    print("\n".join(lines))


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(n for n in os.listdir(RESULTS) if n.startswith("precision-") and n.endswith(".json"))
    if not files:
        return
    fig, axes = plt.subplots(1, len(files), figsize=(4 * len(files), 3.4), squeeze=False)
    for ax, name in zip(axes[0], files):
        with open(os.path.join(RESULTS, name)) as f:
            p = json.load(f)

        def smooth(values, width=20):
            return [statistics.mean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]

        ax.plot(p["step"], smooth(p["predictor"]), label="predictor")
        ax.plot(p["step"], smooth(p["magnitude"]), "--", label="local magnitude")
        ax.set_title(name[10:-5], fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("precision at k vs global top-k")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "precision.png"), dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summarize", action="store_true", help="tables and plots from existing results")
    parser.add_argument("--only", choices=("sweep", "precision"), default=None)
    parser.add_argument("--settings", default="", help="comma-separated sweep settings to run "
                        "(e.g. charlm-iid-s0,digits-het-s0); default: all")
    parser.add_argument("--round", type=int, choices=(1, 2), default=1,
                        help="sweep round: 1 the main variants, 2 the magnitude-share variants")
    args = parser.parse_args()
    if not args.summarize:
        if args.only in (None, "precision"):
            precision_study()
        if args.only in (None, "sweep"):
            sweep([t for t in args.settings.split(",") if t], args.round)
    summarize()


if __name__ == "__main__":
    main()
