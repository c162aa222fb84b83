r"""Shared checks and helpers of the posterior methods (not public API)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..denoiser import expand_as
from ..denoiser import sigma_vector as _sigma_vector
from ..operators import LinearOperator, _check_noise_std, check_batch, check_finite

__all__ = [
    "check_observation", "sigma_vector", "expand_as", "check_maxiter", "check_tol", "check_nonnegative", "StepHook",
    "denoise_with_vjp",
]


def check_observation(y: Tensor, operator: LinearOperator, noise_std) -> float:
    """Validate ``y`` ``(B, *out_shape)``, the operator (batch shape ``(B,)``) and ``noise_std``; return it."""
    check_finite("y", y)
    check_batch(operator, y.shape[0])
    if operator.out_shape is not None and tuple(y.shape[1:]) != tuple(operator.out_shape):
        raise ValueError(f"`y` has shape {tuple(y.shape)}, expected ({y.shape[0]}, *{operator.out_shape}) to match A(x)")
    return _check_noise_std(noise_std)


def check_maxiter(maxiter) -> int:
    if isinstance(maxiter, bool) or int(maxiter) != maxiter or maxiter < 1:
        raise ValueError(f"`maxiter` must be an integer >= 1, got {maxiter!r}")
    return int(maxiter)


def check_tol(tol) -> float:
    tol = float(tol)
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"`tol` must be a finite number >= 0, got {tol!r}")
    return tol


def check_nonnegative(name: str, value, strict: bool = False) -> float:
    """A finite float ``>= 0`` (``> 0`` when ``strict``), or a ValueError naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number, got {value!r}") from None
    ok = value > 0 if strict else value >= 0
    if not (ok and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite number {'>' if strict else '>='} 0, got {value!r}")
    return value


def sigma_vector(sigma, x_t: Tensor, batch: int) -> Tensor:
    r"""``sigma`` (float, 0-d or ``(B,)``, > 0) as a ``(B,)`` tensor of ``x_t``'s dtype and device."""
    if x_t.shape[0] != batch:
        raise ValueError(f"`x_t` has batch size {x_t.shape[0]}, expected {batch} (one per observation)")
    return _sigma_vector(sigma, x_t)


def denoise_with_vjp(denoiser: Callable, x_t: Tensor, sigma: Tensor, operator: LinearOperator, y: Tensor):
    r"""The prior's :math:`\hat{x}(x_t)`, :math:`A \hat{x}` and :math:`v \mapsto J^T v` (:math:`J = \partial \hat{x} / \partial x_t`).

    Call inside ``torch.enable_grad()``. ``x_t`` ``(B, *event_shape)``, ``sigma`` ``(B,)``,
    ``y`` ``(B, *out_shape)``. Returns ``(x_hat, y_hat, vjp)``: ``x_hat`` and ``y_hat`` carry
    the graph; ``vjp(v)`` takes ``v`` of ``x_hat``'s shape and keeps the graph for more calls.

    Raises:
        ValueError: ``A(x_hat)`` does not have ``y``'s shape.
    """
    x_t = x_t.detach().requires_grad_(True)
    x_hat = denoiser(x_t, sigma)
    y_hat = operator(x_hat)
    if y_hat.shape != y.shape:
        raise ValueError(f"`y` has shape {tuple(y.shape)} but A(x) has shape {tuple(y_hat.shape)}")

    def vjp(v: Tensor) -> Tensor:
        return torch.autograd.grad(x_hat, x_t, v, retain_graph=True)[0]

    return x_hat, y_hat, vjp


class StepHook(nn.Module):
    r"""The shared half of the guidance step hooks (DPS, :math:`\Pi`GDM).

    ``hook(x_t, sigma)`` returns the prior's :math:`\hat{x}` (shape of ``x_t``, detached) and
    keeps ``x_t`` (with gradient) and :math:`\hat{x}(x_t)` for the subclass's
    ``step_correction``, which takes them back with :meth:`_take_pending`. A subclass sets
    ``denoiser`` and ``y`` ``(B, *out_shape)`` and ``_pending = None``.
    """

    def forward(self, x_t: Tensor, sigma) -> Tensor:
        sigma = sigma_vector(sigma, x_t, self.y.shape[0])
        with torch.enable_grad():
            x_t = x_t.detach().requires_grad_(True)
            x_hat = self.denoiser(x_t, sigma)
        self._pending = (x_t, x_hat, sigma)
        return x_hat.detach()

    def _take_pending(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_t, x_hat, sigma)`` of the last call, once; RuntimeError without a preceding call."""
        if self._pending is None:
            raise RuntimeError("call the hook on x_t before `step_correction`")
        pending, self._pending = self._pending, None
        return pending
