"""Issue 31: why does ef21 reach chance accuracy on digits at density 0.001?

Single-process, 2-worker replay of `gradsieve-train --workload digits` (same model init, shards,
batch generators, one dense warm-up step), with the gradient exchange done by
 - lib:      gradsieve.Simulator("ef21") (the library's EF21, zero-initialised estimates)
 - ref:      an independent EF21 (Richtarik et al. 2021, Alg. 1) with top-k, g_i^0 = 0
 - ref_init: the same with g_i^0 = grad_i at the warm-up step (as the paper's experiments)
 - sgdm:     EF21-SGDM (Fatkhullin et al. 2023): v_i = (1-eta) v_i + eta grad_i, g_i += topk(v_i - g_i)
 - sgdm_init: EF21-SGDM with g_i^0 = v_i^0 = grad_i at the warm-up step
 - dense:    plain average
Logs the relative error ||g - mean_i grad_i|| / ||mean_i grad_i||, loss, test accuracy.

  PYTHONPATH=python python experiments/density/ef21_probe.py --method lib --density 0.001
"""
import argparse
import json
import math

import torch

import gradsieve
from gradsieve.train.workloads import Digits


def topk(x, k):
    out = torch.zeros_like(x)
    idx = x.abs().topk(k).indices
    out[idx] = x[idx]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="lib")
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--eta", type=float, default=0.1, help="EF21-SGDM momentum weight")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--every", type=int, default=100)
    a = p.parse_args()
    torch.set_num_threads(1)
    W = a.world
    torch.manual_seed(a.seed)
    works = [Digits(r, W, a.seed, False, None) for r in range(W)]
    model = works[0].model()
    params = list(model.parameters())
    d = sum(q.numel() for q in params)
    k = math.ceil(a.density * d)
    opt = torch.optim.SGD(params, lr=a.lr, momentum=a.momentum)
    gens = [torch.Generator().manual_seed(a.seed * 1_000_003 + r) for r in range(W)]
    sim = gradsieve.Simulator("ef21", world_size=W, density=a.density) if a.method == "lib" else None
    gi = [torch.zeros(d) for _ in range(W)]
    vi = [torch.zeros(d) for _ in range(W)]
    g = torch.zeros(d)
    log = []
    for step in range(a.steps):
        grads, losses = [], []
        for r in range(W):
            x, y = works[r].batch(gens[r], a.batch)
            model.zero_grad(set_to_none=True)
            loss = works[r].loss(model(x), y)
            loss.backward()
            grads.append(torch.cat([q.grad.reshape(-1) for q in params]).clone())
            losses.append(loss.item())
        avg = sum(grads) / W
        if step == 0 or a.method == "dense":  # the dense warm-up step (--warmup-steps 1)
            out = avg
            if a.method.endswith("_init"):
                gi = [gr.clone() for gr in grads]
                vi = [gr.clone() for gr in grads]
                g = avg.clone()
        elif a.method == "lib":
            out = sim.step(grads)
        elif a.method.startswith("ref"):
            for r in range(W):
                c = topk(grads[r] - gi[r], k)
                gi[r] += c
                g += c / W
            out = g
        elif a.method.startswith("sgdm"):
            for r in range(W):
                vi[r] = (1 - a.eta) * vi[r] + a.eta * grads[r]
                c = topk(vi[r] - gi[r], k)
                gi[r] += c
                g += c / W
            out = g
        else:
            raise SystemExit(a.method)
        rel = ((out - avg).norm() / avg.norm()).item()
        off = 0
        for q in params:
            q.grad = out[off:off + q.numel()].view_as(q).clone()
            off += q.numel()
        opt.step()
        if step % a.every == 0 or step == a.steps - 1:
            tl, acc = works[0].evaluate(model, torch.device("cpu"))
            rec = dict(step=step, loss=sum(losses) / W, rel_err=rel, test_loss=tl, acc=acc,
                       g_norm=out.norm().item(), grad_norm=avg.norm().item(),
                       w_norm=torch.cat([q.detach().reshape(-1) for q in params]).norm().item())
            log.append(rec)
            print(json.dumps(rec), flush=True)
    print(json.dumps(dict(summary=vars(a), d=d, k=k, final_acc=log[-1]["acc"], final_loss=log[-1]["test_loss"])))


if __name__ == "__main__":
    main()
