r"""Gaussian prior with low-rank-plus-diagonal covariance (the lap-0 prior).

The prior is :math:`q(x) = \mathcal{N}(x \mid \mu, \Sigma)` with

.. math:: \Sigma = D I + U U^T, \qquad D \ge 0, \; U \in \mathbb{R}^{d \times r},

the probabilistic PCA form (Tipping & Bishop, 1999). For :math:`x_t = x + \sigma z`
its denoiser is exact and linear,

.. math:: \mathbb{E}[x \mid x_t] = x_t - \sigma^2 (\Sigma + \sigma^2 I)^{-1} (x_t - \mu),

evaluated in :math:`O(d r)` with the Woodbury identity. For linear-Gaussian
observations :math:`y = A x + e`, :math:`e \sim \mathcal{N}(0, \sigma_y^2 I)`, the
posterior is Gaussian with

.. math::
    K = A \Sigma A^T + \sigma_y^2 I, \quad
    \mathbb{E}[x \mid y] = \mu + \Sigma A^T K^{-1} (y - A \mu), \quad
    \mathbb{V}[x \mid y] = \Sigma - \Sigma A^T K^{-1} A \Sigma,

and the evidence is :math:`q(y) = \mathcal{N}(y \mid A \mu, K)`. Fitting the prior to
observations alone by EM (E-step: posteriors; M-step: PPCA of the posterior
moments or samples) is the lap 0 of Rozet et al. (2024), Section 4.

References:
    Tipping & Bishop, "Probabilistic principal component analysis", 1999.
    Rozet et al., arXiv:2405.13712, Section 4 and Appendix C.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor

from .denoiser import sigma_vector
from .operators import LinearOperator, _check_noise_std, check_finite

__all__ = ["GaussianPrior", "operator_matrix"]


def operator_matrix(operator: LinearOperator, in_shape: Sequence[int], dtype=torch.float64) -> Tensor:
    """The dense matrix of a batched operator, ``(B, m, d)`` (or ``(m, d)`` for batch shape ``()``).

    Built column by column by applying ``operator`` to the canonical basis: meant for
    small ``d`` (tests, the manifold experiment), not for images.
    """
    in_shape = tuple(in_shape)
    d = math.prod(in_shape)
    batch = tuple(operator.batch_shape)
    basis = torch.eye(d, dtype=dtype)
    columns = []
    for j in range(d):
        e = basis[j].reshape(in_shape).expand(*batch, *in_shape)
        columns.append(operator(e).reshape(*batch, -1))
    return torch.stack(columns, dim=-1)


class GaussianPrior(ModelMixin, ConfigMixin):
    r"""Gaussian prior :math:`\mathcal{N}(\mu, D I + U U^T)` over events of shape ``event_shape``.

    It is also an exact denoiser: ``prior(x_t, sigma)`` returns :math:`\mathbb{E}[x \mid x_t]`,
    so it can stand wherever a learned :class:`~diffem.denoiser.Denoiser` stands
    (MMPS, samplers, pipelines), and it saves / loads with diffusers'
    ``save_pretrained`` / ``from_pretrained``.

    Arguments:
        event_shape: The shape of one sample, e.g. ``(5,)`` or ``(3, 32, 32)``.
        rank: The number of columns ``r`` of ``U`` (``0 <= r <= d``).

    Buffers:
        mean: ``(d,)``; factor: ``U``, ``(d, r)``; diag: ``D``, a 0-d tensor ``>= 0``.
        Initialised to the standard normal :math:`\mathcal{N}(0, I)`.
    """

    @register_to_config
    def __init__(self, event_shape: Sequence[int] = (1,), rank: int = 0):
        super().__init__()
        d = math.prod(event_shape)
        if not 0 <= rank <= d:
            raise ValueError(f"`rank` must be in [0, {d}], got {rank}")
        self.event_shape = tuple(event_shape)
        self.features = d
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("factor", torch.zeros(d, rank))
        self.register_buffer("diag", torch.ones(()))

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_parameters(cls, mean: Tensor, factor: Tensor, diag, event_shape=None) -> "GaussianPrior":
        """A prior from ``mean`` ``(d,)``, ``factor`` ``(d, r)`` and ``diag`` (``D >= 0``)."""
        if mean.dim() != 1:
            raise ValueError(f"`mean` must have shape (d,), got {tuple(mean.shape)}")
        if factor.dim() != 2 or factor.shape[0] != mean.shape[0]:
            raise ValueError(f"`factor` must have shape ({mean.shape[0]}, r), got {tuple(factor.shape)}")
        diag = torch.as_tensor(diag, dtype=mean.dtype)
        if diag.dim() != 0 or diag < 0:
            raise ValueError(f"`diag` must be a scalar >= 0, got {diag}")
        event_shape = tuple(event_shape) if event_shape is not None else (mean.shape[0],)
        prior = cls(event_shape=event_shape, rank=factor.shape[1])
        prior.mean = mean.detach().clone()
        prior.factor = factor.detach().clone()
        prior.diag = diag.detach().clone().to(mean.device)
        return prior

    @classmethod
    def from_moments(cls, mean: Tensor, covariance: Tensor, rank: int, event_shape=None) -> "GaussianPrior":
        r"""Maximum-likelihood PPCA from a mean ``(d,)`` and a scatter matrix ``(d, d)``.

        With eigenpairs :math:`(\lambda_i, v_i)` of the scatter matrix in decreasing order,
        :math:`D = \text{mean}(\lambda_{r+1:d})` (0 when ``rank == d``) and
        :math:`U = V_r \, \text{diag}(\max(\lambda_{1:r} - D, 0))^{1/2}`
        (Tipping & Bishop 1999, eq. 7-8). It maximises :math:`\mathbb{E}[\log q(x)]`
        for any distribution of ``x`` with these first two moments.
        """
        d = mean.shape[0]
        if covariance.shape != (d, d):
            raise ValueError(f"`covariance` must have shape ({d}, {d}), got {tuple(covariance.shape)}")
        if not 0 <= rank <= d:
            raise ValueError(f"`rank` must be in [0, {d}], got {rank}")
        covariance = (covariance + covariance.mT) / 2
        eigval, eigvec = torch.linalg.eigh(covariance)
        eigval, eigvec = eigval.flip(0).clamp_min(0), eigvec.flip(1)
        diag = eigval[rank:].mean() if rank < d else eigval.new_zeros(())
        factor = eigvec[:, :rank] * (eigval[:rank] - diag).clamp_min(0).sqrt()
        return cls.from_parameters(mean, factor, diag, event_shape)

    @classmethod
    def fit(cls, x: Tensor, rank: int) -> "GaussianPrior":
        """PPCA fit from samples ``x`` of shape ``(N, *event_shape)``, ``N >= 2``.

        When ``N < d`` or ``d > 4096`` (images) the ``(d, d)`` scatter matrix is never formed:
        its top ``rank`` eigenpairs come from the thin SVD of the centred data, at
        ``O(min(N, d)^2 max(N, d))`` instead of ``O(d^3)`` (same result to round-off; measured
        at ``d = 4096``, ``N = 813`` in float64 on one CPU core: 1.2 s instead of 11 s).
        """
        if x.dim() < 2 or x.shape[0] < 2:
            raise ValueError(f"`x` must have shape (N >= 2, *event_shape), got {tuple(x.shape)}")
        check_finite("x", x)
        event_shape = tuple(x.shape[1:])
        flat = x.flatten(1)
        n, d = flat.shape
        mean = flat.mean(dim=0)
        centred = flat - mean
        if d <= 4096 and n >= d:
            return cls.from_moments(mean, centred.mT @ centred / n, rank, event_shape)
        # Top-r eigenpairs of the scatter from the thin SVD; D from the remaining trace.
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        eigval = s.square() / n
        total = eigval.sum()
        diag = (total - eigval[:rank].sum()) / max(d - rank, 1)
        factor = vh[:rank].mT * (eigval[:rank] - diag).clamp_min(0).sqrt()
        return cls.from_parameters(mean, factor, diag, event_shape)

    # -- moments --------------------------------------------------------------------------
    def covariance(self) -> Tensor:
        """The dense covariance :math:`D I + U U^T`, ``(d, d)`` (small ``d`` only)."""
        eye = torch.eye(self.features, dtype=self.mean.dtype, device=self.mean.device)
        return self.diag * eye + self.factor @ self.factor.mT

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` samples, ``(n, *event_shape)``, with an explicit ``generator``."""
        if generator is None:
            raise ValueError("`generator` is required: pass a seeded torch.Generator")
        dev = generator.device
        z = torch.randn(n, self.features, generator=generator, device=dev, dtype=self.mean.dtype)
        w = torch.randn(n, self.factor.shape[1], generator=generator, device=dev, dtype=self.mean.dtype)
        x = self.mean + self.diag.sqrt() * z.to(self.mean.device) + w.to(self.mean.device) @ self.factor.mT
        return x.reshape(n, *self.event_shape)

    # -- denoiser -----------------------------------------------------------------------------
    def forward(self, x_t: Tensor, sigma) -> Tensor:
        r"""Exact denoiser :math:`\mathbb{E}[x \mid x_t]` for :math:`x_t = x + \sigma z`.

        Arguments:
            x_t: Noisy samples, ``(B, *event_shape)``.
            sigma: Noise levels in data units, a float or a tensor of shape ``()`` or ``(B,)``, > 0.

        Returns:
            ``(B, *event_shape)``. Differentiable in ``x_t`` (it is linear), so MMPS can
            take its vector-Jacobian products.
        """
        if tuple(x_t.shape[1:]) != self.event_shape:
            raise ValueError(f"`x_t` must have shape (B, {self.event_shape}), got {tuple(x_t.shape)}")
        s2 = sigma_vector(sigma, x_t).square().to(self.mean.dtype)
        r = x_t.flatten(1).to(self.mean.dtype) - self.mean
        return (x_t.flatten(1).to(self.mean.dtype) - s2[:, None] * self._solve(r, s2)).reshape_as(x_t).to(x_t.dtype)

    def _solve(self, r: Tensor, s2: Tensor) -> Tensor:
        r"""``(\Sigma + s2 I)^{-1} r`` per sample by Woodbury; ``r`` ``(B, d)``, ``s2`` ``(B,)``."""
        a = self.diag + s2  # (B,)
        if self.factor.shape[1] == 0:
            return r / a[:, None]
        w, lam = self._eigenbasis()
        coef = (r @ w) / (a[:, None] + lam)
        return (r - coef @ w.mT) / a[:, None]

    def _eigenbasis(self) -> tuple[Tensor, Tensor]:
        r"""``(W, \Lambda)``: :math:`U Q` (orthogonal columns) and the eigenvalues of :math:`U^T U = Q \Lambda Q^T`.

        Computed once per value of ``factor`` (the same tensor object, unmodified: ``.to()`` or a
        new assignment recomputes it), not once per denoiser call or CG iteration."""
        f = self.factor
        cached = getattr(self, "_eigen_cache", None)  # (factor, its version, W, Lambda); holds the tensor itself
        if cached is None or cached[0] is not f or cached[1] != f._version:
            lam, q = torch.linalg.eigh(f.mT @ f)
            cached = self._eigen_cache = (f, f._version, f @ q, lam)
        return cached[2], cached[3]

    def conditional_covariance(self, u: Tensor, sigma) -> Tensor:
        r"""The exact :math:`\mathbb{V}[x \mid x_t]\, u` of this Gaussian for :math:`x_t = x + \sigma z`.

        .. math:: \mathbb{V}[x \mid x_t] = (\Sigma^{-1} + \sigma^{-2} I)^{-1}
           = \sigma^2 I - \sigma^4 (\Sigma + \sigma^2 I)^{-1},

        applied by Woodbury in :math:`O(d r)` per sample (it equals :math:`\sigma^2 J`, ``J`` the
        Jacobian of :meth:`forward`). MMPS's ``covariance="prior"`` / ``"sigma_x"`` heuristics use
        it with a fixed :math:`\Sigma` (Rozet et al. 2024, arXiv:2405.13712, Section 5.2; the
        authors' ``PosteriorDenoiser`` with ``cov_x``).

        Arguments:
            u: ``(B, *event_shape)`` (or ``(B, d)``), any float dtype.
            sigma: Noise levels in data units, a float or a tensor of shape ``()`` or ``(B,)``, > 0.

        Returns:
            ``(B, ...)`` like ``u``, in ``u``'s dtype (computed in the prior's dtype).

        Raises:
            ValueError: if ``u`` does not hold ``d`` features per sample, or ``sigma`` is not positive.
        """
        if math.prod(u.shape[1:]) != self.features:
            raise ValueError(f"`u` must hold {self.features} features per sample, got shape {tuple(u.shape)}")
        s2 = sigma_vector(sigma, u).square().to(self.mean.dtype)
        flat = u.flatten(1).to(self.mean.dtype)
        out = s2[:, None] * flat - s2[:, None] ** 2 * self._solve(flat, s2)
        return out.reshape(u.shape).to(u.dtype)

    # -- exact posterior and evidence --------------------------------------------------------------
    def _observation_terms(self, y: Tensor, operator: LinearOperator, noise_std: float):
        noise_std = _check_noise_std(noise_std)
        check_finite("y", y)
        dtype = self.mean.dtype
        A = operator_matrix(operator, self.event_shape, dtype=dtype).to(self.mean.device)
        if A.dim() == 2:
            A = A[None]
        out = operator.output_shape(self.event_shape)
        batch = tuple(operator.batch_shape)
        if batch == () and y.dim() == len(out) + 1:  # one operator shared by a batch of y
            batch = (y.shape[0],)
            A = A.expand(y.shape[0], -1, -1)
        expected = batch + out
        if tuple(y.shape) != expected:
            raise ValueError(f"`y` has shape {tuple(y.shape)}, expected {expected} to match A(x)")
        yf = y.reshape(A.shape[0], -1).to(dtype)
        C = self.covariance()
        K = A @ C @ A.mT + noise_std**2 * torch.eye(A.shape[1], dtype=dtype, device=A.device)
        return A, yf, C, K

    def posterior(self, y: Tensor, operator: LinearOperator, noise_std: float) -> tuple[Tensor, Tensor]:
        r"""Exact posterior :math:`q(x \mid y)` for :math:`y = A x + \sigma_y e`.

        Arguments:
            y: Observations, ``(B, *out_shape)`` (batch shape of ``operator``), finite.
            operator: The linear operator, batch shape ``(B,)`` or ``()`` (one operator,
                shared by every observation of a batch ``y``).
            noise_std: :math:`\sigma_y > 0`.

        Returns:
            ``(mean, covariance)`` of shapes ``(B, d)`` and ``(B, d, d)`` (flattened events;
            without the leading ``B`` when ``y`` is a single unbatched observation).
            Dense: for small ``d`` only.
        """
        A, yf, C, K = self._observation_terms(y, operator, noise_std)
        gain = torch.linalg.solve(K, A @ C).mT  # C A^T K^{-1}, (B, d, m)
        mean = self.mean + (gain @ (yf - (A @ self.mean))[..., None])[..., 0]
        cov = C - gain @ A @ C
        cov = (cov + cov.mT) / 2
        if y.dim() == len(operator.output_shape(self.event_shape)):  # an unbatched y
            return mean[0], cov[0]
        return mean, cov

    def log_evidence(self, y: Tensor, operator: LinearOperator, noise_std: float) -> Tensor:
        r"""Log-evidence :math:`\log \mathcal{N}(y \mid A\mu, A \Sigma A^T + \sigma_y^2 I)` per observation, ``(B,)``."""
        A, yf, C, K = self._observation_terms(y, operator, noise_std)
        r = yf - A @ self.mean
        L = torch.linalg.cholesky(K)
        z = torch.linalg.solve_triangular(L, r[..., None], upper=False)[..., 0]
        logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        out = -0.5 * (z.square().sum(-1) + logdet + A.shape[1] * math.log(2 * math.pi))
        return out[0] if y.dim() == len(operator.output_shape(self.event_shape)) else out
