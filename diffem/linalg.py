r"""Batched Krylov solvers: conjugate gradient (symmetric positive definite systems) and GMRES
(any square system), one system per sample.

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

GMRES (:func:`gmres`) needs no symmetry: MMPS's system :math:`\Sigma_y + \sigma^2 A J A^T`
with the Jacobian :math:`J` of a learned denoiser is not symmetric, and CG's assumptions fail
there. It minimises the residual over the Krylov space of ``maxiter`` matvecs (the same cost
as CG), with float64 inner products and Givens rotations (azula, the authors' library, defaults
MMPS to GMRES).

References:
    Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
    systems", 1952. Saad & Schultz, "GMRES: a generalized minimal residual algorithm for
    solving nonsymmetric linear systems", 1986. Rozet et al. 2024 (arXiv:2405.13712), Section 4.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["conjugate_gradient", "gmres", "SOLVERS", "solve"]

#: The linear solvers of :func:`solve` (MMPS's ``solver``).
SOLVERS = ("cg", "gmres")


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product over all but the first dimension: ``(B, ...) -> (B,)``."""
    return (a * b).flatten(1).sum(dim=1)


def _expand(s: Tensor, like: Tensor) -> Tensor:
    return s.reshape(s.shape + (1,) * (like.dim() - 1))


def _check_solve(b: Tensor, maxiter, tol) -> None:
    """The arguments every solver shares; raises ValueError naming the bad one."""
    if int(maxiter) != maxiter or maxiter < 1:
        raise ValueError(f"`maxiter` must be an integer >= 1, got {maxiter!r}")
    if tol < 0:
        raise ValueError(f"`tol` must be >= 0, got {tol!r}")
    if b.dim() < 2:
        raise ValueError(f"`b` must have shape (B, ...), got {tuple(b.shape)}")


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
    _check_solve(b, maxiter, tol)

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


def gmres(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    maxiter: int = 1,
    tol: float = 0.0,
    companion: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Solve :math:`M v = b` per sample by GMRES from :math:`v_0 = 0`, without restarts.

    After ``maxiter`` matvecs, :math:`v` minimises :math:`\lVert b - M v \rVert` over the Krylov
    space :math:`\mathrm{span}\{b, M b, \dots, M^{k-1} b\}` (Arnoldi with modified Gram-Schmidt;
    the small least-squares problem by Givens rotations). Inner products and the small problem
    are float64 whatever the dtype of ``b``; the vectors keep it. The loop has no host-device
    synchronisation: a sample whose residual falls to ``tol * ||b_i||`` (or whose Krylov space
    is exhausted, an exact solve) adds nothing more.

    Arguments:
        matvec: The map :math:`v \mapsto M v` for a batch ``(B, ...) -> (B, ...)`` (block
            diagonal over the batch), :math:`M` square and nonsingular; with ``companion``, it
            returns ``(M p, W p)`` as for :func:`conjugate_gradient`.
        b: The right-hand sides ``(B, ...)``.
        maxiter: Krylov dimension = matvecs (>= 1); exact in at most ``prod(...)``.
        tol: Relative residual tolerance (0: every iteration counts).
        companion: Also return :math:`W v = \sum_j c_j W q_j` (the Arnoldi vectors' images).

    Returns:
        ``v`` ``(B, ...)`` (dtype of ``b``), or ``(v, W v)`` with ``companion``.

    Raises:
        ValueError: if ``maxiter < 1``, ``tol < 0`` or ``b`` has no batch dimension.

    Memory: ``maxiter + 1`` vectors of the shape of ``b`` (and ``maxiter`` of ``W p``).
    """
    _check_solve(b, maxiter, tol)
    k, n = int(maxiter), b.shape[0]

    def dot(u: Tensor, v: Tensor) -> Tensor:  # (B,) in float64
        return (u.double() * v.double()).flatten(1).sum(dim=1)

    tiny = torch.finfo(torch.float64).tiny
    beta = dot(b, b).sqrt()
    q = [torch.where(_expand(beta > 0, b), b / _expand(beta, b).to(b.dtype), torch.zeros_like(b))]
    wq = []
    R = torch.zeros(n, k, k, dtype=torch.float64, device=b.device)  # the rotated Hessenberg matrix
    g = torch.zeros(n, k + 1, dtype=torch.float64, device=b.device)
    g[:, 0] = beta
    cs = torch.ones(n, k, dtype=torch.float64, device=b.device)
    sn = torch.zeros(n, k, dtype=torch.float64, device=b.device)
    threshold = tol * beta
    active = beta > threshold.clamp_min(tiny)  # b = 0 (or within tol): nothing to do
    for j in range(k):
        if companion:
            w, wj = matvec(q[j])
            wq.append(wj)
        else:
            w = matvec(q[j])
        h = torch.zeros(n, j + 2, dtype=torch.float64, device=b.device)
        for i in range(j + 1):  # modified Gram-Schmidt
            h[:, i] = dot(q[i], w)
            w = w - _expand(h[:, i], w).to(w.dtype) * q[i]
        h[:, j + 1] = dot(w, w).sqrt()
        q.append(torch.where(_expand(h[:, j + 1] > tiny, w), w / _expand(h[:, j + 1].clamp_min(tiny), w).to(w.dtype),
                             torch.zeros_like(w)))
        for i in range(j):  # the previous rotations
            hi = cs[:, i] * h[:, i] + sn[:, i] * h[:, i + 1]
            h[:, i + 1] = -sn[:, i] * h[:, i] + cs[:, i] * h[:, i + 1]
            h[:, i] = hi
        denom = torch.sqrt(h[:, j] ** 2 + h[:, j + 1] ** 2)
        ok = active & (denom > tiny)
        c = torch.where(ok, h[:, j] / denom.clamp_min(tiny), torch.ones_like(denom))
        s_ = torch.where(ok, h[:, j + 1] / denom.clamp_min(tiny), torch.zeros_like(denom))
        cs[:, j], sn[:, j] = c, s_
        # an inactive sample's column is the identity with a zero right-hand side: its coefficient is 0
        R[:, : j + 1, j] = torch.where(ok[:, None], torch.cat([h[:, :j], denom[:, None]], dim=1),
                                       torch.eye(j + 1, dtype=torch.float64, device=b.device)[j].expand(n, j + 1))
        gj = g[:, j].clone()
        g[:, j] = torch.where(ok, c * gj, torch.zeros_like(gj))
        g[:, j + 1] = torch.where(ok, -s_ * gj, gj)
        active = ok & (g[:, j + 1].abs() > threshold)
    coef = torch.linalg.solve_triangular(R, g[:, :k, None], upper=True)[..., 0]  # (B, k)
    v = sum(_expand(coef[:, j], b).to(b.dtype) * q[j] for j in range(k))
    if companion:
        return v, sum(_expand(coef[:, j], wq[j]).to(wq[j].dtype) * wq[j] for j in range(k))
    return v


def solve(solver: str, matvec: Callable, b: Tensor, maxiter: int = 1, tol: float = 0.0, companion: bool = False):
    """:func:`conjugate_gradient` (``"cg"``) or :func:`gmres` (``"gmres"``) from ``v_0 = 0``.

    Raises:
        ValueError: for an unknown ``solver`` (and the solvers' own errors).
    """
    if solver == "cg":
        return conjugate_gradient(matvec, b, maxiter=maxiter, tol=tol, companion=companion)
    if solver == "gmres":
        return gmres(matvec, b, maxiter=maxiter, tol=tol, companion=companion)
    raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}")
