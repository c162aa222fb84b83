r"""The low-dimensional manifold experiment: a random smooth curve in R^5.

The curve follows the "randman" construction (Zenke & Vogels, 2021) that the
authors use (``smooth_manifold`` in ``experiments/manifold/utils.py`` of
francois-rozet/diffusion-priors, with ``m = 1``, ``alpha = 3``,
``epsilon = 1e-3``). For each output feature :math:`i`,

.. math:: f_i(t) = \sum_{k=1}^{K} \frac{a_{ik}}{k^\alpha}
    \sin\big(2 \pi (k\, b_{ik}\, t + c_{ik})\big), \qquad t \in [0, 1],

with :math:`a, b, c \sim \mathcal{U}(0, 1)` i.i.d. and
:math:`K = \lceil \epsilon^{-1/\alpha} \rceil` (10 by default). Since the
frequencies :math:`k b_{ik}` are not integers, the curve is open. Each feature
is then rescaled affinely to [-2, 2] using its minimum and maximum over a dense
grid of ``t`` (a property of the curve, not of any sample; the authors use the
min / max of their 65,536 training points instead, which differs by a
negligible amount), and points are :math:`x = f(t)` with
:math:`t \sim \mathcal{U}(0, 1)`.

Each point is observed through its own random projection

.. math:: y = A x + e, \qquad A \in \mathbb{R}^{2 \times 5},\ A_{ij} \sim
    \mathcal{N}(0, 1) \text{ then rows normalised}, \qquad e \sim \mathcal{N}(0, \sigma_y^2 I)

with :math:`\sigma_y = 10^{-2}`.

Randomness: every function takes an integer ``seed``. The generator used is
seeded from ``numpy.random.SeedSequence([seed, stream])`` with a fixed
``stream`` tag per purpose (curve coefficients, training points, evaluation
points, projections, observation noise), so reusing one integer for several
purposes gives independent draws, and the training and evaluation points come
from different streams. Draws are vectorised over the whole ordered set with a
single generator: a set is generated once, so it does not depend on any later
batching (it does depend on its size ``n``).

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", NeurIPS 2024, arXiv:2405.13712, Section 5.1.
    Zenke & Vogels, "The remarkable robustness of surrogate gradient learning
    for instilling complex function in spiking neural networks", Neural
    Computation 2021 (randman, https://github.com/fzenke/randman).
"""

from __future__ import annotations

import math

import datasets
import numpy as np
import torch
from torch import Tensor

from ..random import derive_seed
from ._common import check_seed
from .tables import numpy_to_dataset

__all__ = [
    "ManifoldCurve",
    "manifold_points",
    "random_projections",
    "make_observations",
]

_STREAMS = {"curve": 0, "train": 1, "eval": 2, "projection": 3, "noise": 4}


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


def _generator(seed: int, stream: str) -> torch.Generator:
    """A CPU ``torch.Generator`` for ``(seed, stream)``, independent across streams."""
    return torch.Generator().manual_seed(derive_seed(check_seed(seed), _STREAMS[stream]))


class ManifoldCurve:
    r"""A random smooth open curve :math:`t \mapsto x(t)` in :math:`[-2, 2]^F`.

    See the module docstring for the construction (randman, 1-D, as in the
    authors' code).

    Arguments:
        seed: Non-negative integer seed of the curve's coefficients.
        features: Ambient dimension :math:`F` (5 in the paper).
        alpha: Smoothness exponent :math:`\alpha > 0` (amplitudes decay as :math:`k^{-\alpha}`).
        epsilon: Amplitude cutoff in (0, 1): :math:`K = \lceil \epsilon^{-1/\alpha} \rceil` terms.
        grid: Number of grid points on [0, 1] used for the min / max rescaling (``>= 2``).

    Attributes:
        a, b, c: Coefficients, ``float64`` tensors of shape ``(F, K)``.
        low, high: Per-feature min / max of the unscaled curve over the grid,
            ``float64`` tensors of shape ``(F,)``.

    Raises:
        ValueError: On a negative / non-integer ``seed``, ``features < 1``,
            ``alpha <= 0``, ``epsilon`` outside (0, 1), ``grid < 2``, or a
            degenerate (constant) feature.
    """

    def __init__(
        self,
        seed: int = 0,
        features: int = 5,
        alpha: float = 3.0,
        epsilon: float = 1e-3,
        grid: int = 2**16 + 1,
    ):
        self.seed = check_seed(seed)
        self.features = _check_positive_int("features", features)
        if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"`alpha` must be a finite number > 0, got {alpha!r}")
        if not (isinstance(epsilon, (int, float)) and 0 < epsilon < 1):
            raise ValueError(f"`epsilon` must be in (0, 1), got {epsilon!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
            raise ValueError(f"`grid` must be an integer >= 2, got {grid!r}")
        self.alpha = float(alpha)
        self.epsilon = float(epsilon)
        self.terms = math.ceil(self.epsilon ** (-1.0 / self.alpha))

        g = _generator(self.seed, "curve")
        self.a, self.b, self.c = torch.rand(3, self.features, self.terms, generator=g, dtype=torch.float64)

        t = torch.linspace(0.0, 1.0, grid, dtype=torch.float64)
        values = torch.cat([self._raw(chunk) for chunk in t.split(8192)])
        self.low = values.min(dim=0).values
        self.high = values.max(dim=0).values
        if not (self.high - self.low > 1e-12).all():
            raise ValueError(f"curve with `seed`={seed} has a constant feature; pick another seed")

    def _raw(self, t: Tensor) -> Tensor:
        # t: (N,) float64 -> (N, F) float64, before rescaling.
        k = torch.arange(1, self.terms + 1, dtype=torch.float64)
        phase = 2 * math.pi * (k * self.b * t[:, None, None] + self.c)  # (N, F, K)
        return (self.a / k**self.alpha * torch.sin(phase)).sum(dim=-1)

    def __call__(self, t: Tensor) -> Tensor:
        r"""Evaluate the curve.

        Arguments:
            t: Curve parameters in [0, 1], any shape ``(*)``.

        Returns:
            Points of shape ``(*, F)``, ``float32``, in [-2, 2] (clamped to
            absorb round-off of the grid min / max).

        Raises:
            ValueError: If ``t`` is not a finite tensor with values in [0, 1].
        """
        if not torch.is_tensor(t):
            raise ValueError(f"`t` must be a tensor, got {type(t).__name__}")
        t64 = t.detach().to("cpu", torch.float64)
        if not torch.isfinite(t64).all() or (t64 < 0).any() or (t64 > 1).any():
            raise ValueError("`t` must hold finite values in [0, 1]")
        flat = t64.reshape(-1)
        raw = self._raw(flat) if flat.numel() else torch.empty(0, self.features, dtype=torch.float64)
        x = 4.0 * (raw - self.low) / (self.high - self.low) - 2.0
        return x.clamp(-2.0, 2.0).to(torch.float32).reshape(*t.shape, self.features)

    def sample(self, n: int, seed: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draw points :math:`x(t)`, :math:`t \sim \mathcal{U}(0, 1)`.

        Arguments:
            n: Number of points, ``>= 1``.
            seed: Non-negative integer seed (the ``"train"`` stream of
                :func:`manifold_points` applies it); exclusive with ``generator``.
            generator: A CPU ``torch.Generator`` to draw ``t`` from instead.

        Returns:
            A ``float32`` tensor of shape ``(n, F)`` in [-2, 2].

        Raises:
            ValueError: If ``n < 1``, or not exactly one of ``seed`` / ``generator`` is given.
        """
        n = _check_positive_int("n", n)
        if (seed is None) == (generator is None):
            raise ValueError("give exactly one of `seed` and `generator`")
        if generator is None:
            generator = _generator(seed, "train")
        t = torch.rand(n, generator=generator, dtype=torch.float64)
        return self(t)

    def __repr__(self) -> str:
        return (
            f"ManifoldCurve(seed={self.seed}, features={self.features}, "
            f"alpha={self.alpha}, epsilon={self.epsilon}, terms={self.terms})"
        )


def manifold_points(
    n: int = 65536,
    seed: int = 0,
    split: str = "train",
    features: int = 5,
    curve: ManifoldCurve | None = None,
) -> Tensor:
    r"""Ground-truth points of the manifold experiment.

    The curve is ``ManifoldCurve(seed, features)`` (or ``curve``); the curve
    parameters ``t`` come from the ``split``'s own seed stream, so the
    ``"train"`` and ``"eval"`` sets of one seed are independent samples of the
    same curve.

    Arguments:
        n: Number of points (65,536 in the paper).
        seed: Non-negative integer seed (curve and points).
        split: ``"train"`` (the latent points behind the observations) or
            ``"eval"`` (held-out points for the Sinkhorn divergence).
        features: Ambient dimension (5 in the paper); ignored if ``curve`` is given.
        curve: A prebuilt curve, to avoid rebuilding it.

    Returns:
        A ``float32`` tensor of shape ``(n, features)`` in [-2, 2].

    Raises:
        ValueError: If ``split`` is not ``"train"`` / ``"eval"``, or on a bad
            ``n`` / ``seed`` / ``features``.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"`split` must be 'train' or 'eval', got {split!r}")
    if curve is None:
        curve = ManifoldCurve(seed, features=features)
    return curve.sample(n, generator=_generator(seed, split))


def random_projections(n: int, seed: int, in_features: int = 5, out_features: int = 2) -> Tensor:
    r"""Per-point Gaussian projection matrices with unit-norm rows.

    :math:`A_{ij} \sim \mathcal{N}(0, 1)`, then each row is divided by its norm.

    Arguments:
        n: Number of matrices, ``>= 1``.
        seed: Non-negative integer seed (``"projection"`` stream).
        in_features: Input dimension (5 in the paper).
        out_features: Output dimension (2 in the paper).

    Returns:
        A ``float32`` tensor of shape ``(n, out_features, in_features)``.

    Raises:
        ValueError: On a non-positive ``n`` / ``in_features`` / ``out_features``
            or a bad ``seed``.
    """
    n = _check_positive_int("n", n)
    in_features = _check_positive_int("in_features", in_features)
    out_features = _check_positive_int("out_features", out_features)
    g = _generator(seed, "projection")
    A = torch.randn(n, out_features, in_features, generator=g, dtype=torch.float64)
    A = A / torch.linalg.vector_norm(A, dim=-1, keepdim=True)
    return A.to(torch.float32)


def make_observations(x: Tensor, matrices: Tensor, noise_std: float = 1e-2, seed: int = 0) -> datasets.Dataset:
    r"""Observe points through :math:`y_i = A_i x_i + \sigma_y e_i`.

    The noise :math:`e \sim \mathcal{N}(0, I)` of shape ``(n, m)`` is drawn in
    one call from a generator seeded by ``seed`` (``"noise"`` stream), over the
    whole ordered set.

    Arguments:
        x: Clean points, shape ``(n, d)``, values in [-2, 2].
        matrices: Projections, shape ``(n, m, d)`` (e.g. :func:`random_projections`).
        noise_std: :math:`\sigma_y > 0` (1e-2 in the paper).
        seed: Non-negative integer seed.

    Returns:
        A ``datasets.Dataset`` in ``torch`` format with columns ``y``
        (``float32``, shape ``(m,)`` per row) and ``matrix`` (``float32``,
        ``(m, d)`` per row) only: the clean points are not stored.

    Raises:
        ValueError: If shapes disagree, a tensor holds NaN / inf, ``noise_std <= 0``,
            or ``seed`` is bad.
    """
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"`x` must be a tensor of shape (n, d), got {getattr(x, 'shape', type(x))}")
    if not torch.is_tensor(matrices) or matrices.dim() != 3:
        raise ValueError(
            f"`matrices` must be a tensor of shape (n, m, d), got {getattr(matrices, 'shape', type(matrices))}"
        )
    n, d = x.shape
    if matrices.shape[0] != n or matrices.shape[2] != d:
        raise ValueError(
            f"`matrices` has shape {tuple(matrices.shape)}, expected ({n}, m, {d}) to match `x` {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError("`x` contains NaN or inf values")
    if not torch.isfinite(matrices).all():
        raise ValueError("`matrices` contains NaN or inf values")
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not (0 < noise_std < math.inf):
        raise ValueError(f"`noise_std` must be a finite number > 0, got {noise_std!r}")
    m = matrices.shape[1]
    g = _generator(seed, "noise")
    e = torch.randn(n, m, generator=g, dtype=torch.float64)
    A = matrices.detach().to("cpu", torch.float64)
    y = torch.einsum("nij,nj->ni", A, x.detach().to("cpu", torch.float64)) + float(noise_std) * e
    return numpy_to_dataset({"y": y.to(torch.float32).numpy(), "matrix": A.to(torch.float32).numpy()})
