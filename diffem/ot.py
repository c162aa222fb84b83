r"""Sinkhorn divergence between point clouds (the manifold experiment's metric).

Entropic optimal transport cost with squared Euclidean ground cost, computed by POT
in the log domain:

.. math:: W_\lambda(u, v) = \min_{P \in \Pi(u, v)} \langle P, C \rangle - \lambda H(P),
   \quad C_{ij} = \lVert u_i - v_j \rVert^2 .

The paper's metric (authors' ``experiments/manifold/utils.py``) compares prior samples
``v`` to ground truth ``u1`` and subtracts the value between two ground-truth sets:

.. math:: \max\big(W_\lambda(u_1, v) - W_\lambda(u_1, u_2), 10^{-6}\big), \qquad \lambda = 10^{-3}.

References:
    Chizat et al., "Faster Wasserstein Distance Estimation with the Sinkhorn Divergence",
    arXiv:2006.08172; Flamary et al., "POT: Python Optimal Transport", JMLR 2021;
    Rozet et al., arXiv:2405.13712, Section 5.1.
"""

from __future__ import annotations

import warnings

import numpy as np
import ot
import torch

__all__ = ["entropic_ot", "manifold_divergence"]


def _points(name: str, x) -> np.ndarray:
    x = x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 1:
        raise ValueError(f"`{name}` must be a point cloud of shape (N, d), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"`{name}` contains NaN or inf values")
    return x


def entropic_ot(u, v, reg: float = 1e-3, maxiter: int = 1024, tol: float = 1e-3) -> float:
    r"""Entropic OT cost :math:`W_\lambda(u, v)` between uniform clouds ``(N, d)`` and ``(M, d)``."""
    u, v = _points("u", u), _points("v", v)
    if u.shape[1] != v.shape[1]:
        raise ValueError(f"`u` and `v` must have the same dimension, got {u.shape[1]} and {v.shape[1]}")
    # POT's torch backend: its log-sum-exp is several times faster than NumPy's here.
    u, v = torch.from_numpy(u), torch.from_numpy(v)
    a, b = torch.full((len(u),), 1 / len(u), dtype=u.dtype), torch.full((len(v),), 1 / len(v), dtype=v.dtype)
    cost = ot.dist(u, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "did not converge": maxiter is the budget
        return float(ot.sinkhorn2(a, b, cost, reg=reg, numItermax=maxiter, stopThr=tol, method="sinkhorn_log"))


def manifold_divergence(
    samples, truth_a, truth_b, reg: float = 1e-3, floor: float = 1e-6, baseline: float | None = None,
    return_dropped: bool = False, **kwargs
):
    r"""The paper's manifold metric :math:`\max(W_\lambda(u_1, v) - W_\lambda(u_1, u_2), \text{floor})`.

    Arguments:
        samples: Prior (or posterior) samples ``v``, ``(N, d)``; non-finite or far-out samples
            (any coordinate outside ``(-3, 3)``, as the authors filter them) are dropped first.
        truth_a, truth_b: Two independent ground-truth sets ``u_1``, ``u_2``, ``(M, d)``.
        baseline: :math:`W_\lambda(u_1, u_2)` if already computed (it does not depend on ``samples``).
        return_dropped: Also return how many samples were dropped.
        kwargs: ``maxiter`` and ``tol`` of :func:`entropic_ot`.

    Returns:
        The divergence (a float ``>= floor``), or ``(divergence, dropped)`` with ``return_dropped``.

    Raises:
        ValueError: if no sample is finite and inside ``(-3, 3)``.
    """
    v = samples.detach().cpu().double() if torch.is_tensor(samples) else torch.as_tensor(samples, dtype=torch.float64)
    keep = torch.isfinite(v).all(dim=1) & (v.abs() < 3).all(dim=1)
    if keep.sum() == 0:
        raise ValueError("`samples` has no finite sample inside [-3, 3]")
    dropped = int((~keep).sum())
    v = v[keep]
    if baseline is None:
        baseline = entropic_ot(truth_a, truth_b, reg, **kwargs)
    value = max(entropic_ot(truth_a, v, reg, **kwargs) - baseline, floor)
    return (value, dropped) if return_dropped else value
