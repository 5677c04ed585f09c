"""Second-order influence of each weight (the score of influence-scored sparse updates).

The influence score rates a weight by how much the loss moves when the weight is perturbed a
little. To second order, for a perturbation of size ``eps``::

    influence_i = |g_i| * eps + 0.5 * |h_ii| * eps^2

where ``h_ii`` is the diagonal of the loss's Hessian. :func:`hessian_diagonal` estimates it from
measured perturbations of the weights (Hutchinson's estimator with Rademacher directions ``v``):
two extra gradient evaluations at ``w + eps * v`` and ``w - eps * v`` give
``H v ~ (g(w + eps v) - g(w - eps v)) / (2 eps)``, and ``v * (H v)`` is an unbiased estimate of
``diag(H)`` (up to the finite-difference error, ``O(eps^2)``). Averaging over probes, or over
steps as a rolling mean, reduces its variance.
"""

from __future__ import annotations

import time
from typing import Any, Callable, List, Optional, Sequence

import torch


def _rademacher(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    bits = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8,
                         device="cpu" if generator is not None else like.device)
    return (bits.to(like.device, like.dtype) * 2 - 1)


def hessian_diagonal(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    batch: object,
    probes: int = 1,
    eps: float = 1e-3,
    generator: Optional[torch.Generator] = None,
    parameters: Optional[Sequence[torch.nn.Parameter]] = None,
) -> List[torch.Tensor]:
    """Hutchinson estimate of the Hessian diagonal of ``loss_fn(model, batch)``.

    Args:
        model: the model; its weights are perturbed in place and restored bit for bit, the
            ``.grad`` of its parameters is left as it was, its buffers (batch-norm statistics) and
            the random state are restored.
        loss_fn: ``loss_fn(model, batch)`` -> scalar loss.
        batch: whatever ``loss_fn`` takes.
        probes: Rademacher directions averaged (2 gradient evaluations each), >= 1.
        eps: the perturbation size, > 0.
        generator: a CPU generator for the directions (reproducible probes).
        parameters: the parameters to probe (default: those of ``model`` that require grad).

    Returns:
        one float32 tensor per parameter, shaped like it: the estimate of ``diag(H)``.
    """
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"hessian_diagonal: probes must be an integer >= 1, got {probes!r}")
    if not (eps > 0 and eps < float("inf")):
        raise ValueError(f"hessian_diagonal: eps must be a positive number, got {eps!r}")
    params = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("hessian_diagonal: no parameters to probe")
    saved = [p.detach().clone() for p in params]
    # Buffers (batch-norm statistics) change in a training-mode forward: restored afterwards.
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    estimate = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})

    def gradient() -> List[torch.Tensor]:
        loss = loss_fn(model, batch)
        return list(torch.autograd.grad(loss, params, allow_unused=True))

    # Every evaluation starts from the same random state (dropout draws the same masks at
    # w + eps v and w - eps v, so their difference is curvature, not noise), and the caller's
    # random state is left as it was.
    with torch.random.fork_rng(devices=devices):
        start = torch.random.get_rng_state()
        cuda_start = [torch.cuda.get_rng_state(d) for d in devices]
        try:
            for _ in range(probes):
                directions = [_rademacher(p, generator) for p in params]
                grads = []
                for sign in (1.0, -1.0):
                    torch.random.set_rng_state(start)
                    for d, state in zip(devices, cuda_start):
                        torch.cuda.set_rng_state(state, d)
                    with torch.no_grad():
                        for p, w, v in zip(params, saved, directions):
                            p.copy_(w + sign * eps * v)
                    grads.append(gradient())
                for e, v, plus, minus in zip(estimate, directions, *grads):
                    if plus is None or minus is None:
                        continue  # a parameter the loss does not use: zero curvature
                    e.add_(v.float() * (plus.float() - minus.float()) / (2 * eps))
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
                for b, value in buffers:
                    b.copy_(value)
    return [e.div_(probes) for e in estimate]


def influence(grad: torch.Tensor, hessian_diag: torch.Tensor, eps: float) -> torch.Tensor:
    """The second-order influence of each weight: ``|g| * eps + 0.5 * |h| * eps^2``."""
    return grad.abs().float() * eps + 0.5 * hessian_diag.abs().float() * eps * eps


def probe(state: Any, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
          batch: Any) -> bool:
    """The curvature probe of a hook state whose compressor scores weights with curvature
    (``traits.probes``; ``CompressionState.probe`` calls it): when due by the compressor's
    :meth:`~gradsieve.compressor.Compressor.probe_plan` (every ``every`` steps), estimates the
    Hessian diagonal of ``loss_fn(model, batch)`` with :func:`hessian_diagonal` (``probes``
    directions, 2 extra gradient evaluations each; weights, gradients, buffers and random state
    restored) and hands each parameter's to the compressor, keyed as the hook keys it. Returns
    whether it probed. A DDP wrapper is unwrapped: the probe must not run DDP's reduction."""
    compressor = state.compressor
    plan = compressor.probe_plan() if compressor.traits.probes else None
    if plan is None:
        return False
    if state._last_probe is not None and state.step - state._last_probe < plan.every:
        return False
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    params = [p for p in model.parameters() if p.requires_grad and id(p) in state._param_keys]
    if not params:
        raise ValueError("CompressionState.probe: the hook has not seen this model's parameters "
                         "yet; call probe after a training step (after optimizer.step())")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(1_000_003 * state.step + 17)
    diagonal = hessian_diagonal(model, loss_fn, batch, probes=plan.probes, eps=plan.eps,
                                generator=generator, parameters=params)
    for p, d in zip(params, diagonal):
        compressor.store_probe(state.memory.params, state._param_keys[id(p)], d)
    state._last_probe = state.step
    state.probe_count += 1
    state.probe_s += time.perf_counter() - started
    return True
