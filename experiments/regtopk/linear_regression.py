"""Distributed linear regression on heterogeneous workers: none, Top-k, RegTop-k and EF21.

The setting of the linear-regression experiment of RegTop-k (Bereyhi et al., arXiv 2409.14893,
and the authors' code): N = 20 workers, d = 100, 500 samples per worker. Worker n has its own true
model x_n = m_n * 1 + N(0, I) around a worker mean m_n ~ N(0, 5); its data A_n ~ N(0, 1)^(500 x d),
y_n = A_n x_n + N(0, 0.5). Local loss f_n(theta) = ||A_n theta - y_n||^2 / 500 (full-batch
gradients), the global objective is their average, theta* its minimiser. Gradient descent from
theta = 0 with learning rate 0.01 for 2500 rounds; each round every worker's gradient goes through
the compressor in gradsieve.Simulator (float32 on the wire, as in the DDP hook), theta in float64.

Sweeps: k/d in {0.1, 0.4, 0.55, 0.7}; RegTop-k's mu in {1, 2, 4}; seeds 0.. (data and models).
Metric: log10 ||theta_t - theta*||^2 per round.

Run: python experiments/regtopk/linear_regression.py [--seeds 3] [--jobs 1]
(about 6 minutes per seed on one core; writes results/linreg_*.json|csv|png)

--step-guard adds the step-rejection rule of the authors' linear-regression script to every run
(a step whose squared norm is at least 100x the last accepted one is undone; the compressor state
moves on), to check whether the paper's curves depend on it; use it with --prefix.
"""

import argparse
import csv
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

import gradsieve

HERE = os.path.dirname(os.path.abspath(__file__))
KEEP_EVERY = 5  # rounds between the stored points of each curve


def make_problem(seed, workers, dim, samples):
    g = torch.Generator().manual_seed(seed)
    means = math.sqrt(5.0) * torch.randn(workers, generator=g, dtype=torch.float64)
    truths = means[:, None] + torch.randn(workers, dim, generator=g, dtype=torch.float64)
    a = torch.randn(workers, samples, dim, generator=g, dtype=torch.float64)
    y = torch.einsum("nsd,nd->ns", a, truths) + math.sqrt(0.5) * torch.randn(
        workers, samples, generator=g, dtype=torch.float64)
    gram = torch.einsum("nsd,nse->de", a, a)
    theta_star = torch.linalg.solve(gram, torch.einsum("nsd,ns->d", a, y))
    return a, y, theta_star


def run(job):
    """One training run; returns its log10 squared distance to theta* per round."""
    seed, compressor, options, cfg = job
    torch.set_num_threads(1)
    a, y, theta_star = make_problem(seed, cfg["workers"], cfg["dim"], cfg["samples"])
    sim = gradsieve.Simulator(compressor, world_size=cfg["workers"], **options)
    theta = torch.zeros(cfg["dim"], dtype=torch.float64)
    errors = np.empty(cfg["rounds"])
    limit, rejected = 1e5, 0  # the step guard's threshold (the authors' initial value)
    for t in range(cfg["rounds"]):
        residual = torch.einsum("nsd,d->ns", a, theta) - y
        grads = (2.0 / cfg["samples"]) * torch.einsum("nsd,ns->nd", a, residual)
        step = cfg["lr"] * sim.step(list(grads)).double()
        if cfg["step_guard"]:
            size = float(step.square().sum())
            if size >= limit:
                rejected += 1
                step = torch.zeros_like(step)
            else:
                limit = 100.0 * size
        theta = theta - step
        errors[t] = float((theta - theta_star).square().sum())
    return np.log10(errors), rejected


def configurations(densities, mus):
    """(label, compressor, options, density) of every run of one seed; `none` once."""
    out = [("none", "none", {}, None)]
    for density in densities:
        out.append((f"topk k/d={density}", "topk", {"density": density}, density))
        out.append((f"ef21 k/d={density}", "ef21", {"density": density}, density))
        for mu in mus:
            out.append((f"regtopk mu={mu:g} k/d={density}", "regtopk",
                        {"density": density, "mu": float(mu)}, density))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2500)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.4, 0.55, 0.7])
    parser.add_argument("--mus", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--step-guard", action="store_true",
                        help="undo steps 100x larger than the last (the authors' script)")
    parser.add_argument("--prefix", default="linreg", help="file name prefix of the outputs")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = {k: getattr(args, k) for k in ("rounds", "workers", "dim", "samples", "lr", "step_guard")}
    prefix = os.path.join(args.out, args.prefix)
    configs = configurations(args.densities, args.mus)
    jobs = [(seed, name, options, cfg) for seed in range(args.seeds)
            for _, name, options, _ in configs]
    started = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = list(pool.map(run, jobs))
    print(f"{len(jobs)} runs in {time.time() - started:.0f} s")

    runs = {}
    for (seed, _, _, _), (curve, rejected), (label, name, options, density) in zip(
            jobs, outcomes, [c for _ in range(args.seeds) for c in configs]):
        entry = runs.setdefault(label, {"compressor": name, "options": options, "density": density,
                                        "log10_error": {}, "final": {}, "tail_mean": {},
                                        "rejected_steps": {}})
        entry["log10_error"][seed] = curve[KEEP_EVERY - 1::KEEP_EVERY].round(4).tolist()
        entry["final"][seed] = float(curve[-1])
        entry["tail_mean"][seed] = float(curve[-250:].mean())
        entry["rejected_steps"][seed] = rejected
    rounds = list(range(KEEP_EVERY, args.rounds + 1, KEEP_EVERY))
    with open(prefix + "_curves.json", "w") as f:
        json.dump({"config": {**cfg, "seeds": args.seeds}, "rounds": rounds, "runs": runs}, f)
    with open(prefix + "_final.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "compressor", "density", "mu", "seed", "final_log10_error",
                         "tail_mean_log10_error"])
        for label, r in runs.items():
            for seed in sorted(r["final"]):
                writer.writerow([label, r["compressor"], r["density"], r["options"].get("mu", ""),
                                 seed, f"{r['final'][seed]:.4f}", f"{r['tail_mean'][seed]:.4f}"])
    summary = summarize(runs)
    with open(prefix + "_summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    for label, s in summary.items():
        print(f"{label:30s} final {s['final_mean']:8.3f} +- {s['final_std']:.3f} "
              f"[{s['final_min']:.3f}, {s['final_max']:.3f}]  last-250 mean {s['tail_mean']:8.3f}"
              + (f"  rejected steps {s['rejected_steps']}" if args.step_guard else ""))
    plot(runs, rounds, args, prefix + "_error.png")
    plot_final(summary, args, prefix + "_final.png")


def summarize(runs):
    out = {}
    for label, r in runs.items():
        final = np.array([r["final"][s] for s in sorted(r["final"])])
        tail = np.array([r["tail_mean"][s] for s in sorted(r["tail_mean"])])
        out[label] = {"compressor": r["compressor"], "density": r["density"],
                      "mu": r["options"].get("mu"), "seeds": len(final),
                      "final_mean": float(final.mean()), "final_std": float(final.std()),
                      "final_min": float(final.min()), "final_max": float(final.max()),
                      "tail_mean": float(tail.mean()), "tail_std": float(tail.std()),
                      "rejected_steps": sum(r["rejected_steps"].values())}
    return out


STYLE = {"none": ("k", "-"), "topk": ("C3", "-"), "ef21": ("C2", ":")}
MU_COLORS = {1.0: "C0", 2.0: "C1", 4.0: "C4"}


def _style(r):
    if r["compressor"] == "regtopk":
        return MU_COLORS.get(r["options"]["mu"], "C5"), "--"
    return STYLE[r["compressor"]]


def plot(runs, rounds, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2
    rows = math.ceil(len(args.densities) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 4.2 * rows), squeeze=False)
    for ax, density in zip(axes.flat, args.densities):
        for label, r in runs.items():
            if r["density"] not in (None, density):
                continue
            curves = np.array([r["log10_error"][s] for s in sorted(r["log10_error"])])
            color, ls = _style(r)
            name = label.replace(f" k/d={density}", "")
            ax.plot(rounds, curves.mean(0), color=color, ls=ls, lw=1.4, label=name)
            ax.fill_between(rounds, curves.min(0), curves.max(0), color=color, alpha=0.12, lw=0)
        ax.set(title=f"k/d = {density:g}", xlabel="round", ylabel="log10 ||theta - theta*||^2")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Distributed linear regression, {args.workers} heterogeneous workers, "
                 f"d={args.dim}, lr {args.lr}" + (", step guard" if args.step_guard else "")
                 + f": mean over {args.seeds} seeds (band: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


def plot_final(summary, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    groups = {}
    for label, s in summary.items():
        key = "none" if s["compressor"] == "none" else (
            f"regtopk mu={s['mu']:g}" if s["compressor"] == "regtopk" else s["compressor"])
        groups.setdefault(key, []).append(s)
    for key, items in groups.items():
        if key == "none":
            s = items[0]
            ax.axhline(s["final_mean"], color="k", lw=1, label="none")
            continue
        items.sort(key=lambda s: s["density"])
        color, ls = _style({"compressor": items[0]["compressor"], "options": {"mu": items[0]["mu"]}})
        ax.errorbar([s["density"] for s in items], [s["final_mean"] for s in items],
                    yerr=[[s["final_mean"] - s["final_min"] for s in items],
                          [s["final_max"] - s["final_mean"] for s in items]],
                    color=color, ls=ls, marker="o", capsize=3, label=key)
    ax.set(xlabel="k / d", ylabel=f"log10 ||theta - theta*||^2 after {args.rounds} rounds",
           title="Final distance to the optimum (mean, min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
