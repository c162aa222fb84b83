r"""Batched conjugate gradient: one symmetric positive definite system per sample.

Solves :math:`M_i v_i = b_i` for every sample :math:`i` of a batch, where
:math:`M_i` is only available through matrix-vector products (in MMPS, each
product costs one vector-Jacobian product of the denoiser). The loop runs a
fixed ``maxiter`` iterations without host-device synchronisation; samples whose
residual norm falls below ``tol * ||b_i||``, or that meet a direction of
non-positive curvature (``p^T M p <= 0``, possible when ``M`` comes from an
imperfect learned Jacobian), are frozen with ``torch.where``.

Companion output. Started from :math:`v_0 = 0`, CG builds its solution from its search
directions, :math:`v = \sum_k \alpha_k p_k`. When every matvec also yields
:math:`w_k = W p_k` for some linear map :math:`W` (in MMPS, :math:`W = J^T A^T`, which the
matvec :math:`M p = \Sigma_y p + \sigma^2 A J^T A^T p` computes anyway), then
:math:`W v = \sum_k \alpha_k w_k` is accumulated with the same step sizes and the same
freezing, at no extra cost: MMPS then needs one forward and ``maxiter`` vector-Jacobian
products instead of ``maxiter + 1``.

References:
    Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
    systems", 1952. Rozet et al. 2024 (arXiv:2405.13712), Section 4.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["conjugate_gradient"]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product over all but the first dimension: ``(B, ...) -> (B,)``."""
    return (a * b).flatten(1).sum(dim=1)


def _expand(s: Tensor, like: Tensor) -> Tensor:
    return s.reshape(s.shape + (1,) * (like.dim() - 1))


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    maxiter: int = 1,
    tol: float = 0.0,
    companion: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Solve :math:`M v = b` per sample by conjugate gradient.

    Arguments:
        matvec: The map :math:`v \mapsto M v` for a batch ``(B, ...) -> (B, ...)``, with
            :math:`M` symmetric positive definite per sample (and block diagonal over
            the batch: sample ``i`` of the output depends only on sample ``i``).
        b: The right-hand sides, shape ``(B, ...)``.
        x0: The initial guess, shape of ``b`` (default: zeros).
        maxiter: The number of iterations (>= 1). Exact in at most ``prod(...)``.
        tol: Relative residual tolerance; a sample stops updating once
            ``||r_i|| <= tol * ||b_i||`` (0 runs all iterations).
        companion: If true, ``matvec(p)`` returns a pair ``(M p, W p)`` for a linear map
            :math:`W` (``W p`` of any shape ``(B, ...)``), and the result is the pair
            ``(v, W v)`` with :math:`W v = \sum_k \alpha_k W p_k` accumulated inside the loop
            (same step sizes, same freezing by ``tol`` and by the curvature guard). Needs
            ``x0 = None`` (the sum starts from :math:`v_0 = 0`).

    Returns:
        The approximate solutions ``v``, shape ``(B, ...)``; with ``companion``, the pair
        ``(v, W v)``.

    Raises:
        ValueError: if ``maxiter < 1``, ``tol < 0``, ``b`` has no batch dimension, or
            ``companion`` is set together with ``x0``.
    """
    if int(maxiter) != maxiter or maxiter < 1:
        raise ValueError(f"`maxiter` must be an integer >= 1, got {maxiter!r}")
    if tol < 0:
        raise ValueError(f"`tol` must be >= 0, got {tol!r}")
    if b.dim() < 2:
        raise ValueError(f"`b` must have shape (B, ...), got {tuple(b.shape)}")

    if companion and x0 is not None:
        raise ValueError("`companion` needs `x0=None`: W v is accumulated from v0 = 0")

    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        if x0.shape != b.shape:
            raise ValueError(f"`x0` has shape {tuple(x0.shape)}, expected {tuple(b.shape)}")
        x = x0.clone()
        r = b - matvec(x)

    p = r.clone()
    rr = _dot(r, r)
    threshold = (tol**2) * _dot(b, b)
    tiny = torch.finfo(b.dtype).tiny
    wx = None  # W x, accumulated when `companion`

    for _ in range(int(maxiter)):
        if companion:
            Mp, Wp = matvec(p)
        else:
            Mp = matvec(p)
        pMp = _dot(p, Mp)
        # A direction of non-positive curvature means M is not positive definite there
        # (e.g. the Jacobian of an imperfect denoiser): stop that sample rather than diverge.
        active = (rr > threshold) & (pMp > 0)
        alpha = torch.where(active, rr / pMp.clamp_min(tiny), torch.zeros_like(rr))
        x = x + _expand(alpha, x) * p
        if companion:
            step = _expand(alpha, Wp) * Wp
            wx = step if wx is None else wx + step
        r = r - _expand(alpha, r) * Mp
        rr_new = _dot(r, r)
        beta = torch.where(active, rr_new / rr.clamp_min(tiny), torch.zeros_like(rr))
        p = torch.where(_expand(active, p), r + _expand(beta, p) * p, p)
        rr = torch.where(active, rr_new, rr)

    if companion:
        return x, wx
    return x
