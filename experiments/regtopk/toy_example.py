"""The two-worker motivating example of RegTop-k (Bereyhi et al., arXiv 2409.14893).

Two workers, a two-parameter logistic model p = sigmoid(w . x), one sample each: x_1 = (100, 1),
x_2 = (-100, 1), both labelled y = 1. Each worker sends Top-1 of its two entries (density 0.5),
gradient descent with learning rate 0.9 from w = (0, 1), as in the authors' code.

The first entries of the two local gradients are large and opposite: they cancel in the average.
Top-k sends exactly those every step, so the model does not move until the residual of the second
entry has grown as large (then it jumps, with an effective learning rate of many steps at once).
RegTop-k sees that its first entry aggregated to nothing (1 + Delta = 0, weight tanh(0) = 0) and
sends the second one: it follows centralized gradient descent.

Run: python experiments/regtopk/toy_example.py  (a few seconds; writes results/toy_example.*)
"""

import argparse
import json
import os

import torch

import gradsieve

HERE = os.path.dirname(os.path.abspath(__file__))
X = torch.tensor([[100.0, 1.0], [-100.0, 1.0]], dtype=torch.float64)
RUNS = {
    "centralized GD (none)": ("none", {}),
    "Top-k (k=1)": ("topk", {"density": 0.5}),
    "RegTop-k (k=1, mu=1)": ("regtopk", {"density": 0.5, "mu": 1.0}),
    "EF21 (k=1)": ("ef21", {"density": 0.5}),
}


def loss(w):
    return float(torch.nn.functional.softplus(-(X @ w)).mean())  # -log sigmoid(w . x), y = 1


def run(compressor, options, steps, lr):
    sim = gradsieve.Simulator(compressor, world_size=2, **options)
    w = torch.tensor([0.0, 1.0], dtype=torch.float64)
    losses, weights = [loss(w)], [w.tolist()]
    for _ in range(steps):
        p = torch.sigmoid(X @ w)
        grads = [(p[n] - 1.0) * X[n] for n in range(2)]  # d/dw of -log sigmoid(w . x_n)
        w = w - lr * sim.step(grads).double()
        losses.append(loss(w))
        weights.append(w.tolist())
    return losses, weights


def first_move(weights):
    """The first step at which w differs from the start (None if it never moves)."""
    return next((t for t, w in enumerate(weights) if w != weights[0]), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.9)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for label, (name, options) in RUNS.items():
        losses, weights = run(name, options, args.steps, args.lr)
        results[label] = {"compressor": name, "options": options, "loss": losses, "w": weights,
                          "first_move": first_move(weights)}
        print(f"{label:24s} loss at steps 10/50/100/{args.steps}: "
              + " ".join(f"{losses[t]:.4f}" for t in (10, 50, 100, args.steps))
              + f"   first move at step {results[label]['first_move']}")
    with open(os.path.join(args.out, "toy_example.json"), "w") as f:
        json.dump({"steps": args.steps, "lr": args.lr, "runs": results}, f, indent=1)
    plot(results, os.path.join(args.out, "toy_example.png"))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"none": "k-", "topk": "C3-", "regtopk": "C0--", "ef21": "C2:"}
    for label, r in results.items():
        left.plot(r["loss"], styles[r["compressor"]], label=label, lw=1.6)
        right.plot([w[1] for w in r["w"]], styles[r["compressor"]], label=label, lw=1.6)
    left.set(yscale="log", xlabel="iteration", ylabel="training loss",
             title="Two workers, logistic loss, Top-1, lr 0.9")
    right.set(xlabel="iteration", ylabel="w[1]", title="second weight (w[0] stays 0)")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


if __name__ == "__main__":
    main()
