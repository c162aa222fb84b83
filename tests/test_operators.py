"""Tests of diffem.operators: adjoint identities, orthonormality, noise model, input validation."""

import math

import pytest
import torch

from diffem.gaussian import GaussianPrior
from diffem.operators import (
    LinearOperator,
    GaussianBlur,
    GaussianObservation,
    Identity,
    Mask,
    Projection,
    Scaled,
    SenseFourier,
    SubsampledFourier,
    SuperResolution,
)
from diffem.posterior import MMPSDenoiser

BATCHES = [(), (3,)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make_operator(kind, batch, g):
    """An operator of ``kind`` with batch shape ``batch`` and its (in, out) event shapes."""
    if kind == "identity":
        return Identity(), (2, 3, 4), (2, 3, 4)
    if kind == "mask":
        mask = torch.rand(*batch, 1, 5, 4, generator=g) < 0.5
        mask[..., 0, 0, 0] = True
        return Mask(mask, channels=3), (3, 5, 4), (3, 5, 4)
    if kind == "projection":
        return Projection(torch.randn(*batch, 3, 7, generator=g, dtype=torch.float64)), (7,), (3,)
    if kind == "fourier":
        # Odd width and a height != width: fftshift != ifftshift, so the adjoint order matters.
        mask = torch.rand(*batch, 7, generator=g) < 0.5
        mask[..., 3] = True
        return SubsampledFourier(mask, height=6), (1, 6, 7), (2, 6, 7)
    if kind == "sense":  # odd width, height != width, 3 complex coil maps, a 2-D k-space mask
        mask = torch.rand(*batch, 6, 7, generator=g) < 0.5
        mask[..., 3, 3] = True
        maps = torch.complex(torch.randn(*batch, 3, 6, 7, generator=g), torch.randn(*batch, 3, 6, 7, generator=g))
        return SenseFourier(mask, maps), (1, 6, 7), (3, 2, 6, 7)
    if kind == "fourier-complex":  # complex images as (real, imaginary) channels: no conjugate symmetry
        mask = torch.rand(*batch, 7, generator=g) < 0.5
        mask[..., 3] = True
        return SubsampledFourier(mask, height=6, complex_images=True), (2, 6, 7), (2, 6, 7)
    if kind == "sense-complex":
        mask = torch.rand(*batch, 6, 7, generator=g) < 0.5
        mask[..., 3, 3] = True
        maps = torch.complex(torch.randn(*batch, 3, 6, 7, generator=g), torch.randn(*batch, 3, 6, 7, generator=g))
        return SenseFourier(mask, maps, complex_images=True), (2, 6, 7), (3, 2, 6, 7)
    if kind == "box":
        top = torch.randint(0, 3, batch, generator=g)
        left = torch.randint(0, 4, batch, generator=g)
        return Mask.box((5, 6), (3, 2), top, left, channels=2), (2, 5, 6), (2, 5, 6)
    if kind == "superres":  # no per-sample parameters: batch shape (), shared by any batch
        return SuperResolution(2, (2, 4, 6)), (2, 4, 6), (2, 2, 3)
    if kind == "blur":
        # std <= 0.7 px: min |k^| > 1e-3 = cutoff on 6x5, so the pseudo-inverse is exact.
        std = 0.3 + 0.4 * torch.rand(batch, generator=g, dtype=torch.float64)
        return GaussianBlur(std, (2, 6, 5)), (2, 6, 5), (2, 6, 5)
    if kind == "scaled":  # a per-sample projection, one scale per sample (whitening)
        scale = 0.5 + torch.rand(batch, generator=g, dtype=torch.float64)
        return Scaled(Projection(torch.randn(*batch, 3, 7, generator=g, dtype=torch.float64)), scale), (7,), (3,)
    if kind == "scaled-shared":  # one shared operator, scaled per sample: the scale carries the batch
        scale = 0.5 + torch.rand(batch, generator=g, dtype=torch.float64)
        return Scaled(SuperResolution(2, (2, 4, 6)), scale), (2, 4, 6), (2, 2, 3)
    raise AssertionError(kind)


KINDS = ["identity", "mask", "projection", "fourier", "sense", "fourier-complex", "sense-complex", "box", "superres",
         "blur", "scaled", "scaled-shared"]
PARAM_KINDS = ["mask", "projection", "fourier", "sense", "fourier-complex", "sense-complex", "box", "blur", "scaled",
               "scaled-shared"]  # with per-sample parameters


# -- adjoint identity ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kind", KINDS)
def test_adjoint_identity(kind, batch):
    g = _gen(1)
    A, in_shape, out_shape = make_operator(kind, batch, g)
    x = torch.randn(*batch, *in_shape, generator=g, dtype=torch.float64)
    y = torch.randn(*batch, *out_shape, generator=g, dtype=torch.float64)
    Ax, ATy = A(x), A.T(y)
    assert Ax.shape == (*batch, *out_shape) and Ax.dtype == torch.float64
    assert ATy.shape == (*batch, *in_shape) and ATy.dtype == torch.float64
    # Per sample: <A x, y> = <x, A^T y>.
    lhs = (Ax * y).reshape(*batch, -1).sum(-1)
    rhs = (x * ATy).reshape(*batch, -1).sum(-1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kind", KINDS[1:])
def test_linearity(kind, batch):
    g = _gen(2)
    A, in_shape, _ = make_operator(kind, batch, g)
    x1 = torch.randn(*batch, *in_shape, generator=g, dtype=torch.float64)
    x2 = torch.randn(*batch, *in_shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A(2.5 * x1 - x2), 2.5 * A(x1) - A(x2), rtol=1e-10, atol=1e-10)


def test_projection_matches_dense_product():
    g = _gen(3)
    M = torch.randn(4, 2, 5, generator=g, dtype=torch.float64)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    A = Projection(M)
    torch.testing.assert_close(A(x), torch.einsum("bij,bj->bi", M, x))


# -- SubsampledFourier: orthonormality -------------------------------------------------------------


def _fourier_full(batch, H, W):
    return SubsampledFourier(torch.ones(*batch, W, dtype=torch.bool), height=H)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("H, W", [(6, 7), (8, 8)])
def test_fourier_full_sampling_is_an_isometry(batch, H, W):
    """With every column sampled, A is the orthonormal DFT: A^T A = I and ||A x|| = ||x||."""
    g = _gen(4)
    A = _fourier_full(batch, H, W)
    x = torch.randn(*batch, 1, H, W, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A.T(A(x)), x, rtol=0, atol=1e-12)
    n_x = x.reshape(*batch, -1).norm(dim=-1)
    n_Ax = A(x).reshape(*batch, -1).norm(dim=-1)
    torch.testing.assert_close(n_Ax, n_x, rtol=1e-12, atol=0)


def _symmetric_column_mask(batch, W, g):
    """A column mask invariant under k -> -k in the centred indexing (column c <-> 2*(W//2) - c)."""
    mask = torch.rand(*batch, W, generator=g) < 0.5
    centre = W // 2
    for c in range(W):
        mirror = 2 * centre - c
        if 0 <= mirror < W:
            mask[..., mirror] = mask[..., c] = mask[..., c] | mask[..., mirror]
    mask[..., centre] = True
    return mask


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("H, W", [(6, 7), (8, 8)])
def test_fourier_orthonormal_on_sampled_columns(batch, H, W):
    r"""A A^T = M on the sampled columns (orthonormal rows).

    The input space is real, so A A^T y = M y holds for k-space data y that a real image can
    produce (Hermitian symmetric: y = A_full x) and a mask that is symmetric under k -> -k;
    then A^T A is the orthogonal projection onto the sampled frequencies and A A^T A = A.
    """
    g = _gen(5)
    mask = _symmetric_column_mask(batch, W, g)
    A = SubsampledFourier(mask, height=H)
    x = torch.randn(*batch, 1, H, W, generator=g, dtype=torch.float64)
    y = _fourier_full(batch, H, W)(x)  # Hermitian-symmetric k-space of a real image
    expected = y * mask[..., None, None, :].to(y.dtype)
    torch.testing.assert_close(A(A.T(y)), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(A(A.T(A(x))), A(x), rtol=0, atol=1e-12)
    # Idempotent projection: (A^T A)^2 = A^T A.
    P = A.T(A(x))
    torch.testing.assert_close(A.T(A(P)), P, rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch", BATCHES)
def test_fourier_is_a_contraction_for_any_mask(batch):
    """For an arbitrary column mask (real input space), ||A|| <= 1: ||A x|| <= ||x||, ||A^T y|| <= ||y||."""
    g = _gen(6)
    A, in_shape, out_shape = make_operator("fourier", batch, g)
    x = torch.randn(*batch, *in_shape, generator=g, dtype=torch.float64)
    y = torch.randn(*batch, *out_shape, generator=g, dtype=torch.float64)
    assert (A(x).reshape(*batch, -1).norm(dim=-1) <= x.reshape(*batch, -1).norm(dim=-1) * (1 + 1e-12)).all()
    assert (A.T(y).reshape(*batch, -1).norm(dim=-1) <= y.reshape(*batch, -1).norm(dim=-1) * (1 + 1e-12)).all()
    # Unsampled columns of A(x) are exactly zero.
    out = A(x)
    unsampled = ~A.mask[..., None, None, :].expand_as(out)
    assert (out[unsampled] == 0).all()


@pytest.mark.parametrize("batch", BATCHES)
def test_mask_is_an_orthogonal_projection(batch):
    g = _gen(7)
    A, in_shape, _ = make_operator("mask", batch, g)
    x = torch.randn(*batch, *in_shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A(A(x)), A(x), rtol=0, atol=0)
    torch.testing.assert_close(A.T(x), A(x), rtol=0, atol=0)
    # Shared over channels: every channel sees the same mask.
    out = A(x)
    assert torch.equal(out[..., 0, :, :] == 0, out[..., 1, :, :] == 0)


# -- indexing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PARAM_KINDS)
def test_indexing_a_batched_operator(kind):
    g = _gen(8)
    A, in_shape, _ = make_operator(kind, (5,), g)
    x = torch.randn(5, *in_shape, generator=g, dtype=torch.float64)
    full = A(x)
    # An indexed operator is applied through another kernel (e.g. a matrix-vector product
    # instead of a batched one), so results agree to float64 round-off, not bit for bit;
    # a wrong index would differ by O(1).
    ROUNDOFF = dict(rtol=1e-12, atol=1e-12)
    for i in range(5):
        Ai = A[i]
        assert Ai.batch_shape == ()
        torch.testing.assert_close(Ai(x[i]), full[i], **ROUNDOFF)
    sub = A[1:4]
    assert sub.batch_shape == (3,)
    torch.testing.assert_close(sub(x[1:4]), full[1:4], **ROUNDOFF)
    idx = torch.tensor([4, 0])
    torch.testing.assert_close(A[idx](x[idx]), full[idx], **ROUNDOFF)
    # A () operator is shared by every sample: indexing it again returns it.
    first = A[0]
    assert first[0] is first and first[1:3] is first


def test_identity_indexing_and_any_shape():
    A = Identity()
    x = torch.randn(4, 2, 3)
    assert A[1:3] is not None and torch.equal(A[1:3](x), x)
    assert torch.equal(A.T(x), x)


# -- shape validation: no silent broadcast ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS[1:])
def test_unbatched_operator_broadcasts_over_any_leading_shape(kind):
    """Batch shape (): one operator applies to x of shape (*lead, *in_shape), sample by sample."""
    g = _gen(9)
    A, in_shape, out_shape = make_operator(kind, (), g)
    x = torch.randn(2, 3, *in_shape, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, *out_shape, generator=g, dtype=torch.float64)
    Ax, ATy, Apy = A(x), A.T(y), (A.pinv(y) if A.has_pinv else A.T(y))
    assert Ax.shape == (2, 3, *out_shape) and ATy.shape == (2, 3, *in_shape) and Apy.shape == ATy.shape
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(Ax[i, j], A(x[i, j]), rtol=0, atol=1e-12)
            torch.testing.assert_close(ATy[i, j], A.T(y[i, j]), rtol=0, atol=1e-12)
            torch.testing.assert_close(Apy[i, j], A.pinv(y[i, j]) if A.has_pinv else A.T(y[i, j]), rtol=0, atol=1e-12)
    # The event shape is still checked.
    bad = list(in_shape)
    bad[-1] += 1
    with pytest.raises(ValueError, match="`x`"):
        A(torch.randn(3, *bad, dtype=torch.float64))
    with pytest.raises(ValueError, match="`y`"):
        A.T(torch.randn(*in_shape[1:], dtype=torch.float64) if len(in_shape) > 1 else torch.randn(()))


@pytest.mark.parametrize("kind", PARAM_KINDS)
def test_batched_operator_rejects_unbatched_or_wrong_batch_x(kind):
    g = _gen(10)
    A, in_shape, out_shape = make_operator(kind, (3,), g)
    with pytest.raises(ValueError, match="`x`"):
        A(torch.randn(*in_shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="`x`"):
        A(torch.randn(1, *in_shape, dtype=torch.float64))  # would broadcast: must not
    with pytest.raises(ValueError, match="`x`"):
        A(torch.randn(4, *in_shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="`y`"):
        A.T(torch.randn(*out_shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="`y`"):
        A.T(torch.randn(1, *out_shape, dtype=torch.float64))


@pytest.mark.parametrize("kind", PARAM_KINDS)
def test_wrong_event_shape_raises(kind):
    g = _gen(11)
    A, in_shape, _ = make_operator(kind, (2,), g)
    bad = list(in_shape)
    bad[-1] += 1
    with pytest.raises(ValueError, match="`x`"):
        A(torch.randn(2, *bad, dtype=torch.float64))


def test_non_tensor_input_raises():
    A = Projection(torch.randn(2, 3))
    with pytest.raises(TypeError, match="`x`"):
        A([1.0, 2.0, 3.0])


# -- parameter validation --------------------------------------------------------------------------


def test_mask_float_dtype_raises():
    with pytest.raises(ValueError, match="`mask`.*bool"):
        Mask(torch.ones(1, 4, 4))


def test_mask_with_channel_dimension_raises():
    with pytest.raises(ValueError, match="`mask`"):
        Mask(torch.ones(2, 3, 4, 4, dtype=torch.bool))  # (B, 3, H, W): must be (B, 1, H, W)
    with pytest.raises(ValueError, match="`mask`"):
        Mask(torch.ones(4, 4, dtype=torch.bool))  # missing the channel dimension
    with pytest.raises(ValueError, match="`mask`"):
        Mask(torch.ones(2, 2, 1, 4, 4, dtype=torch.bool))  # two batch dimensions


def test_all_zero_mask_raises():
    with pytest.raises(ValueError, match="`mask`.*observes nothing"):
        Mask(torch.zeros(1, 4, 4, dtype=torch.bool))
    mask = torch.ones(3, 1, 4, 4, dtype=torch.bool)
    mask[1] = False  # one sample of the batch observes nothing
    with pytest.raises(ValueError, match=r"`mask`.*observes nothing.*\[1\]"):
        Mask(mask)


def test_fourier_mask_validation():
    with pytest.raises(ValueError, match="`mask`.*bool"):
        SubsampledFourier(torch.ones(8))
    with pytest.raises(ValueError, match="`mask`.*observes nothing"):
        SubsampledFourier(torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="`mask`"):
        SubsampledFourier(torch.ones(2, 2, 8, dtype=torch.bool))


def test_projection_validation():
    with pytest.raises(ValueError, match="`matrix`"):
        Projection(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="`matrix`"):
        Projection(torch.ones(3))
    with pytest.raises(ValueError, match="`matrix`"):
        Projection(torch.tensor([[1.0, float("nan")]]))


# -- GaussianObservation -----------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
def test_gaussian_observation_noise_statistics(batch):
    noise_std = 0.3
    g = _gen(12)
    M = torch.randn(*batch, 50, 4, generator=g, dtype=torch.float64)
    A = Projection(M)
    x = torch.randn(*batch, 4, generator=g, dtype=torch.float64)
    obs = GaussianObservation(A, noise_std)
    draws = torch.stack([obs.sample(x, generator=g) for _ in range(400)])  # (400, *batch, 50)
    noise = (draws - A(x)).reshape(-1)
    n = noise.numel()
    # Mean 0 and std noise_std within ~5 standard errors.
    assert abs(noise.mean().item()) < 5 * noise_std / math.sqrt(n)
    assert abs(noise.std().item() / noise_std - 1) < 5 / math.sqrt(2 * n)
    # Replayable with the same seed, different with another.
    y1 = obs.sample(x, generator=_gen(3))
    y2 = obs.sample(x, generator=_gen(3))
    y3 = obs.sample(x, generator=_gen(4))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_gaussian_observation_requires_generator():
    obs = GaussianObservation(Identity(), 0.1)
    with pytest.raises(ValueError, match="`generator`"):
        obs.sample(torch.zeros(2, 3))


@pytest.mark.parametrize("noise_std", [0.0, -0.1, float("nan"), float("inf")])
def test_gaussian_observation_bad_noise_std(noise_std):
    with pytest.raises(ValueError, match="`noise_std`"):
        GaussianObservation(Identity(), noise_std)


def test_gaussian_observation_bad_operator():
    with pytest.raises(TypeError, match="`operator`"):
        GaussianObservation(torch.eye(3), 0.1)


# -- observations through MMPSDenoiser ---------------------------------------------------------------


def _prior(d=4):
    return GaussianPrior(event_shape=(d,), rank=0)


def test_mmps_rejects_y_not_matching_operator_output():
    A = Projection(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="`y`"):
        MMPSDenoiser(_prior(), torch.randn(2, 4), A, 0.1)  # A(x) has event shape (3,)


def test_mmps_rejects_y_not_matching_identity_output_at_call_time():
    mmps = MMPSDenoiser(_prior(), torch.randn(2, 3), Identity(), 0.1)  # Identity: A(x) is (2, 4)
    with pytest.raises(ValueError, match="`y`"):
        mmps(torch.randn(2, 4), 1.0)


def test_mmps_rejects_operator_with_wrong_batch():
    with pytest.raises(ValueError, match="`operator`"):
        MMPSDenoiser(_prior(), torch.randn(2, 3), Projection(torch.randn(3, 3, 4)), 0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_mmps_rejects_non_finite_y(bad):
    y = torch.randn(2, 3)
    y[1, 2] = bad
    with pytest.raises(ValueError, match="`y`"):
        MMPSDenoiser(_prior(), y, Projection(torch.randn(2, 3, 4)), 0.1)


@pytest.mark.parametrize("noise_std", [0.0, -1.0, float("nan")])
def test_mmps_rejects_bad_noise_std(noise_std):
    with pytest.raises(ValueError, match="`noise_std`"):
        MMPSDenoiser(_prior(), torch.randn(2, 3), Projection(torch.randn(2, 3, 4)), noise_std)


def test_gaussian_prior_rejects_non_finite_y():
    prior = GaussianPrior(event_shape=(4,), rank=1).double()
    y = torch.randn(2, 3, dtype=torch.float64)
    y[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`y`"):
        prior.posterior(y, Projection(torch.randn(2, 3, 4, dtype=torch.float64)), 0.1)


@pytest.mark.parametrize("kind", PARAM_KINDS)
def test_operator_to_device_keeps_the_operator(kind):
    g = _gen(13)
    A, in_shape, _ = make_operator(kind, (2,), g)
    B = A.to("cpu")
    assert type(B) is type(A) and B.batch_shape == A.batch_shape
    x = torch.randn(2, *in_shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(B(x), A(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", PARAM_KINDS)
def test_operator_to_dtype_keeps_masks_boolean(kind):
    """``A.to(dtype)`` casts float parameters only: a boolean mask stays a valid mask."""
    g = _gen(14)
    A, in_shape, _ = make_operator(kind, (2,), g)
    B = A.to(torch.float32)
    for name, value in B.parameters().items():
        old = A.parameters()[name].dtype
        expected = torch.bool if old == torch.bool else (torch.complex64 if old.is_complex else torch.float32)
        assert value.dtype == expected, name
    x = torch.randn(2, *in_shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(B(x.float()).double(), A(x), rtol=1e-5, atol=1e-5)


# -- pseudo-inverse --------------------------------------------------------------------------------


def _dense(A, in_shape):
    """The dense matrix (m, d) of an operator with batch shape (), in float64."""
    d = math.prod(in_shape)
    columns = [A(torch.eye(d, dtype=torch.float64)[j].reshape(in_shape)).reshape(-1) for j in range(d)]
    return torch.stack(columns, dim=-1)


def _dense_pinv(A, out_shape):
    m = math.prod(out_shape)
    columns = [A.pinv(torch.eye(m, dtype=torch.float64)[j].reshape(out_shape)).reshape(-1) for j in range(m)]
    return torch.stack(columns, dim=-1)


def _fourier_sizes():
    # (H, W) at odd and even sizes, masks with and without mirrored columns.
    return [(6, 7), (7, 6), (5, 5), (4, 8)]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith("sense")])  # SENSE has no closed-form pinv
def test_pinv_penrose_identities(kind, batch):
    """A A^+ A = A and A^+ A A^+ = A^+ on random vectors, per sample."""
    g = _gen(20)
    A, in_shape, out_shape = make_operator(kind, batch, g)
    assert A.has_pinv
    x = torch.randn(*batch, *in_shape, generator=g, dtype=torch.float64)
    y = torch.randn(*batch, *out_shape, generator=g, dtype=torch.float64)
    assert A.pinv(y).shape == (*batch, *in_shape)
    torch.testing.assert_close(A(A.pinv(A(x))), A(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(A.pinv(A(A.pinv(y))), A.pinv(y), rtol=0, atol=1e-10)


@pytest.mark.parametrize("H, W", _fourier_sizes())
@pytest.mark.parametrize("seed", range(3))
def test_fourier_pinv_equals_dense_pinv(H, W, seed):
    """A.pinv is the Moore-Penrose pseudo-inverse of the dense real matrix of A, odd and even sizes."""
    g = _gen(30 + seed)
    mask = torch.rand(W, generator=g) < 0.5
    mask[W // 2] = True
    A = SubsampledFourier(mask, height=H)
    M = _dense(A, (1, H, W))
    expected = torch.linalg.pinv(M)
    torch.testing.assert_close(_dense_pinv(A, (2, H, W)), expected, rtol=0, atol=1e-10)
    # The rank and the eigenvalues {0, 1/2, 1} of A A^T, as derived in the docstring.
    assert int(A.rank()) == torch.linalg.matrix_rank(M).item()
    eig = torch.linalg.eigvalsh(M @ M.T)
    assert torch.all((eig.abs() < 1e-10) | ((eig - 0.5).abs() < 1e-10) | ((eig - 1).abs() < 1e-10))
    single = (mask & ~A.mirrored_mask()).any()
    assert bool(((eig - 0.5).abs() < 1e-10).any()) == bool(single)


@pytest.mark.parametrize("W", [7, 8])
def test_fourier_pinv_differs_from_adjoint_for_asymmetric_mask(W):
    """A kept column whose mirror is dropped: A A^T = I/2 there, so A^+ = 2 A^T on it, not A^T."""
    mask = torch.zeros(W, dtype=torch.bool)
    mask[W // 2] = True  # DC: self-mirrored
    mask[W // 2 + 1] = True  # its mirror W//2 - 1 is dropped
    A = SubsampledFourier(mask, height=4)
    y = A(torch.randn(1, 4, W, generator=_gen(40), dtype=torch.float64))
    assert not torch.allclose(A.pinv(y), A.T(y))
    torch.testing.assert_close(A(A.pinv(y)), y, rtol=0, atol=1e-12)  # y in the range of A
    # Nominal acceleration W / 2; effective W * H / rank = W / 3 (the pair counts twice).
    torch.testing.assert_close(A.effective_acceleration(), torch.tensor(W / 3, dtype=torch.float64))


@pytest.mark.parametrize("batch", BATCHES)
def test_projection_pinv_matches_torch(batch):
    g = _gen(41)
    M = torch.randn(*batch, 3, 5, generator=g, dtype=torch.float64)
    y = torch.randn(*batch, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(Projection(M).pinv(y), (torch.linalg.pinv(M) @ y[..., None])[..., 0])


def test_pinv_missing_raises_naming_the_class():
    from diffem.operators import LinearOperator

    class Blur(LinearOperator):
        in_shape = out_shape = (3,)

        def _forward(self, x):
            return x

        _adjoint = _forward

    A = Blur()
    assert not A.has_pinv
    with pytest.raises(NotImplementedError, match="Blur"):
        A.pinv(torch.zeros(3))


def test_pinv_checks_shape():
    A = Projection(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="`y`"):
        A.pinv(torch.zeros(2, 4))


# -- fastMRI column mask ---------------------------------------------------------------------------


@pytest.mark.parametrize("R", [4, 6, 8, 16, 32])
@pytest.mark.parametrize("W", [320, 64])
def test_column_mask_fraction(R, W):
    """The kept fraction matches the stated one within sampling error; the centre is always kept."""
    from diffem.data.mri_mask import column_mask, column_mask_fraction

    n = 2000
    masks = column_mask(W, R, _gen(50), batch=n)
    assert masks.shape == (n, W) and masks.dtype == torch.bool
    half = math.ceil(60 * W / (320 * R))
    assert masks[:, W // 2 - half : W // 2 + half].all()
    f = column_mask_fraction(W, R)
    if W == 320:  # the authors' numbers: 2 ceil(60/R) centre columns, others kept w.p. 200/(320R-120)
        p = 200 / (320 * R - 120)
        assert f == pytest.approx((2 * math.ceil(60 / R) + p * (320 - 2 * math.ceil(60 / R))) / 320)
        assert abs(f - 1 / R) < 0.1 / R
        others = torch.cat([masks[:, : W // 2 - half], masks[:, W // 2 + half :]], dim=1).double()
        assert abs(others.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / others.numel())
    else:
        assert f == pytest.approx(column_mask_fraction(320, R))  # same fraction at another width
    rest = W - 2 * half
    p = (f * W - 2 * half) / rest
    se = math.sqrt(p * (1 - p) * rest / n) / W  # standard error of the mean kept fraction
    assert abs(masks.double().mean().item() - f) < 5 * se + 1e-12


def test_column_mask_replayable_and_batch_independent():
    from diffem.data.mri_mask import column_mask

    a = column_mask(64, 8, _gen(7), batch=5)
    b = column_mask(64, 8, _gen(7), batch=5)
    c = column_mask(64, 8, _gen(8), batch=5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(column_mask(64, 8, _gen(7), batch=3), a[:3])
    assert column_mask(64, 8, _gen(7)).shape == (64,)
    A = SubsampledFourier(a)
    assert A.batch_shape == (5,) and (A.effective_acceleration() < 64 / a.sum(-1)).all()


def test_column_mask_validation():
    from diffem.data.mri_mask import column_mask

    with pytest.raises(ValueError, match="`acceleration`"):
        column_mask(64, 0.5, _gen())
    with pytest.raises(ValueError, match="`width`"):
        column_mask(1, 4, _gen())
    with pytest.raises(ValueError, match="`generator`"):
        column_mask(64, 4, None)


# -- benchmark operators: box inpainting, super-resolution, deblurring --------------------------------


def test_box_mask_hole():
    A = Mask.box((6, 7), (2, 3), torch.tensor([0, 4]), torch.tensor([1, 4]), channels=1)
    assert A.batch_shape == (2,) and A.mask.shape == (2, 1, 6, 7)
    hole = ~A.mask[:, 0]
    assert hole.sum().item() == 2 * 6
    assert hole[0, 0:2, 1:4].all() and hole[1, 4:6, 4:7].all()
    single = Mask.box((6, 7), (2, 3), 1, 2)
    assert single.batch_shape == () and single.in_shape == (3, 6, 7) and (~single.mask).sum() == 6


def test_random_box_replayable_and_inside():
    a = Mask.random_box((8, 9), (3, 4), _gen(3), batch=50, channels=1)
    b = Mask.random_box((8, 9), (3, 4), _gen(3), batch=20, channels=1)
    assert torch.equal(a.mask[:20], b.mask)
    assert ((~a.mask).flatten(1).sum(-1) == 12).all()
    corners = (~a.mask[:, 0]).flatten(1).float().argmax(-1)  # first hole pixel, row-major
    rows, cols = corners // 9, corners % 9
    assert set(rows.tolist()) <= set(range(6)) and set(cols.tolist()) <= set(range(6))
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # not a fixed box


def test_box_validation():
    with pytest.raises(ValueError, match="`top`"):
        Mask.box((6, 6), (2, 2), 5, 0)
    with pytest.raises(ValueError, match="`left`"):
        Mask.box((6, 6), (2, 2), 0, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="`box_size`"):
        Mask.box((6, 6), (6, 6), 0, 0)
    with pytest.raises(ValueError, match="`top` and `left`"):
        Mask.box((6, 6), (2, 2), torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="`generator`"):
        Mask.random_box((6, 6), (2, 2), None)


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_superres_is_average_pooling(factor):
    g = _gen(60)
    A = SuperResolution(factor, (3, 8, 8))
    x = torch.randn(3, 8, 8, generator=g, dtype=torch.float64)
    expected = torch.nn.functional.avg_pool2d(x[None], factor)[0]
    torch.testing.assert_close(A(x), expected)
    y = torch.randn(*A.out_shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A(A.T(y)), y / factor**2)  # A A^T = I / f^2
    torch.testing.assert_close(A.pinv(y), factor**2 * A.T(y))
    torch.testing.assert_close(A(A.pinv(y)), y)


def test_superres_validation():
    with pytest.raises(ValueError, match="`factor`"):
        SuperResolution(3, (1, 8, 8))
    with pytest.raises(ValueError, match="`factor`"):
        SuperResolution(0, (1, 8, 8))
    with pytest.raises(ValueError, match="`image_shape`"):
        SuperResolution(2, (8, 8))


def test_blur_is_a_normalised_symmetric_convolution():
    g = _gen(61)
    A = GaussianBlur(1.3, (1, 9, 8))
    x = torch.randn(1, 9, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A(torch.ones(1, 9, 8, dtype=torch.float64)), torch.ones(1, 9, 8, dtype=torch.float64))
    # Same as a dense circular convolution with the periodised kernel (shift invariance).
    delta = torch.zeros(1, 9, 8, dtype=torch.float64)
    delta[0, 0, 0] = 1
    kernel = A(delta)[0]
    assert (kernel > 0).all() and kernel.sum().item() == pytest.approx(1)
    dense = torch.stack([torch.roll(kernel, (i, j), (0, 1)) for i in range(9) for j in range(8)]).reshape(72, 72)
    torch.testing.assert_close(A(x).reshape(-1), dense.T @ x.reshape(-1))
    torch.testing.assert_close(dense, dense.T)
    # Larger std blurs more: the high frequencies lose more energy.
    assert A(x).norm() < GaussianBlur(0.5, (1, 9, 8))(x).norm() < x.norm()


@pytest.mark.parametrize("cutoff", [1e-3, 0.05])
def test_blur_pinv_is_the_truncated_pseudo_inverse(cutoff):
    """With a spectrum reaching below the cutoff: pinv = torch.linalg.pinv(dense, atol=cutoff)."""
    A = GaussianBlur(1.5, (1, 6, 5), cutoff=cutoff)
    k = A.spectrum()
    assert (k.abs() < cutoff).any() and (k.abs() > cutoff).any()
    M = _dense(A, (1, 6, 5))
    s = torch.linalg.svdvals(M)
    assert ((s - cutoff).abs() > 1e-6).all()  # no singular value at the threshold
    torch.testing.assert_close(_dense_pinv(A, (1, 6, 5)), torch.linalg.pinv(M, atol=cutoff), rtol=0, atol=1e-8)
    y = torch.randn(1, 6, 5, generator=_gen(62), dtype=torch.float64)
    torch.testing.assert_close(A.pinv(A(A.pinv(y))), A.pinv(y), rtol=0, atol=1e-10)
    x = torch.randn(1, 6, 5, generator=_gen(63), dtype=torch.float64)
    assert (A(A.pinv(A(x))) - A(x)).norm() <= cutoff * x.norm()


def test_blur_validation():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="`std`"):
            GaussianBlur(bad, (1, 4, 4))
    with pytest.raises(ValueError, match="`std`"):
        GaussianBlur(torch.ones(2, 2), (1, 4, 4))
    with pytest.raises(ValueError, match="`cutoff`"):
        GaussianBlur(1.0, (1, 4, 4), cutoff=1.0)
    with pytest.raises(ValueError, match="`image_shape`"):
        GaussianBlur(1.0, (4, 4))


# -- a shared operator, user operators, wrapped functions (issue 12, item 8) ----------------------------


def test_check_batch_accepts_shared_or_per_sample_operators():
    from diffem.operators import check_batch

    check_batch(Projection(torch.randn(3, 4)), 5)  # () : shared by the 5 observations
    check_batch(Projection(torch.randn(5, 3, 4)), 5)
    check_batch(Identity(), 5)
    with pytest.raises(ValueError, match=r"`operator` must have batch shape \(5,\)"):
        check_batch(Projection(torch.randn(4, 3, 4)), 5)
    with pytest.raises(TypeError, match="`operator`"):
        check_batch(torch.randn(3, 4), 5)


def test_mmps_with_a_shared_operator_equals_the_expanded_one():
    """One () operator for the whole batch gives what the same operator repeated per sample gives."""
    g = _gen(70)
    prior = GaussianPrior(event_shape=(4,), rank=2)
    M = torch.randn(3, 4, generator=g)
    y = torch.randn(5, 3, generator=g)
    x_t = torch.randn(5, 4, generator=g)
    shared = MMPSDenoiser(prior, y, Projection(M), 0.1, maxiter=3)(x_t, torch.tensor(1.0))
    per_sample = MMPSDenoiser(prior, y, Projection(M.expand(5, 3, 4).clone()), 0.1, maxiter=3)(x_t, torch.tensor(1.0))
    torch.testing.assert_close(shared, per_sample, rtol=1e-5, atol=1e-6)


class _Kernel(LinearOperator):
    """A user operator: per-sample weights (B, n) and an extra non-tensor constructor argument."""

    params = ("weight",)

    def __init__(self, weight, scale, label="user"):
        self.weight, self.scale, self.label = weight, float(scale), label
        self.batch_shape = tuple(weight.shape[:-1])
        self.in_shape = (weight.shape[-1],)  # out_shape left out: inferred

    def _forward(self, x):
        return self.scale * (self.weight * x).cumsum(-1)[..., ::2]

    def _adjoint(self, y):
        z = torch.zeros(*y.shape[:-1], self.weight.shape[-1], dtype=y.dtype, device=y.device)
        z[..., ::2] = y
        return self.scale * self.weight * z.flip(-1).cumsum(-1).flip(-1)


def test_user_subclass_with_extra_arguments_moves_and_indexes():
    g = _gen(71)
    A = _Kernel(torch.randn(4, 5, generator=g, dtype=torch.float64), scale=2.0, label="mine")
    assert A.out_shape == (3,)  # inferred by one call
    assert set(A.parameters()) == {"weight"}
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close((A(x) * y).sum(-1), (x * A.T(y)).sum(-1))  # its adjoint is right
    B = A.to(torch.float32)
    assert type(B) is _Kernel and B.scale == 2.0 and B.label == "mine" and B.weight.dtype == torch.float32
    assert A.weight.dtype == torch.float64  # the original is untouched
    torch.testing.assert_close(B(x.float()).double(), A(x), rtol=1e-5, atol=1e-5)
    sub = A[1:3]
    assert type(sub) is _Kernel and sub.batch_shape == (2,) and sub.label == "mine" and sub.scale == 2.0
    torch.testing.assert_close(sub(x[1:3]), A(x)[1:3])
    one = A[2]
    assert one.batch_shape == () and one.out_shape == (3,)
    torch.testing.assert_close(one(x[2]), A(x)[2])
    torch.testing.assert_close(one(x), A[2](x))  # () : applies to the whole batch
    with pytest.raises(ValueError, match="`x`"):
        A(x[:3])  # a (4,) operator needs exactly 4 samples


def test_operator_without_event_shapes_is_refused_clearly():
    class NoShape(LinearOperator):
        def _forward(self, x):
            return 2 * x

        _adjoint = _forward

    A = NoShape()
    with pytest.raises(ValueError, match="NoShape declares neither `in_shape` nor `out_shape`"):
        A(torch.zeros(3))
    with pytest.raises(ValueError, match="NoShape declares neither"):
        A.out_shape

    class OnlyOut(NoShape):
        out_shape = (3,)

    assert OnlyOut().in_shape == (3,)  # inferred through the adjoint


def test_parameters_not_matching_attributes_raise_on_to():
    class Legacy(LinearOperator):
        in_shape = out_shape = (2,)

        def __init__(self, w):
            self._w = w
            self.batch_shape = tuple(w.shape[:-1])

        def parameters(self):
            return {"w": self._w}

        def _forward(self, x):
            return self._w * x

        _adjoint = _forward

    with pytest.raises(TypeError, match="`params`"):
        Legacy(torch.ones(3, 2)).to(torch.float64)


def test_declared_parameter_must_be_a_tensor():
    class Bad(LinearOperator):
        params = ("w",)
        in_shape = out_shape = (2,)

        def __init__(self):
            self.w = [1.0, 2.0]

    with pytest.raises(TypeError, match="Bad.w"):
        Bad().parameters()


def test_from_function_adjoint_by_vjp():
    from diffem.operators import FunctionOperator, check_batch

    g = _gen(72)
    kernel = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64)

    def conv(x):  # (N, 3, 6, 6) -> (N, 2, 4, 4), valid convolution
        return torch.nn.functional.conv2d(x, kernel)

    A = LinearOperator.from_function(conv, (3, 6, 6), dtype=torch.float64)
    assert isinstance(A, FunctionOperator) and A.batch_shape == () and A.out_shape == (2, 4, 4)
    assert not A.has_pinv
    x = torch.randn(5, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A(x), conv(x))
    lhs = (A(x) * y).flatten(1).sum(-1)
    rhs = (x * A.T(y)).flatten(1).sum(-1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(A.T(y), torch.nn.functional.conv_transpose2d(y, kernel))
    with pytest.raises(NotImplementedError, match="FunctionOperator\\(conv\\)"):
        A.pinv(y)
    with pytest.raises(ValueError, match="`x`"):
        A(torch.randn(5, 3, 6, 7, dtype=torch.float64))
    check_batch(A, 5)  # a shared operator serves any batch


def test_from_function_with_pinv_and_validation():
    A = LinearOperator.from_function(lambda x: 3 * x[..., :2], (4,), pinv=lambda y: torch.cat([y / 3, torch.zeros_like(y)], -1))
    assert A.out_shape == (2,) and A.has_pinv
    x = torch.randn(7, 4, generator=_gen(73))
    torch.testing.assert_close(A(A.pinv(A(x))), A(x))
    with pytest.raises(TypeError, match="`function`"):
        LinearOperator.from_function(3, (4,))
    with pytest.raises(ValueError, match="`in_shape`"):
        LinearOperator.from_function(lambda x: x, (0, 2))
    with pytest.raises(ValueError, match="leading"):
        LinearOperator.from_function(lambda x: x.sum(0), (4,))
    B = LinearOperator.from_function(lambda x: x[..., :2], (4,), out_shape=(3,))  # a wrong declared out_shape
    with pytest.raises(ValueError, match="`function` returned"):
        B(torch.zeros(4))



def test_sense_with_full_sampling_and_normalised_maps_is_an_isometry_inverted_by_its_combination():
    g = _gen(3)
    maps = torch.complex(torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64),
                         torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64))
    maps = maps / maps.abs().square().sum(1, keepdim=True).sqrt()  # sum_c |S_c|^2 = 1
    A = SenseFourier(torch.ones(2, 6, 6, dtype=torch.bool), maps)
    x = torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A(x).flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    torch.testing.assert_close(A.T(A(x)), x)
    torch.testing.assert_close(A.sense_combination(A(x)), x)
    # one coil of sensitivity 1 with a column mask is the single-coil operator
    cols = torch.rand(2, 6, generator=g) < 0.5
    cols[:, 3] = True
    single = SubsampledFourier(cols)
    one = SenseFourier(cols[:, None, :].expand(2, 6, 6).clone(), torch.ones(2, 1, 6, 6, dtype=torch.complex128))
    torch.testing.assert_close(one(x)[:, 0], single(x))


def test_sense_validation():
    mask = torch.ones(4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="`maps` must be a complex tensor"):
        SenseFourier(mask, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="`maps` has shape"):
        SenseFourier(mask, torch.ones(2, 4, 5, dtype=torch.complex64))
    with pytest.raises(ValueError, match="`mask` must have dtype torch.bool"):
        SenseFourier(mask.float(), torch.ones(2, 4, 4, dtype=torch.complex64))
    bad = torch.ones(2, 4, 4, dtype=torch.complex64)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SenseFourier(mask, bad)


def test_complex_fourier_is_a_partial_isometry_at_the_nominal_acceleration():
    """On complex images there is no conjugate symmetry: A A^T = M, A^+ = A^T, rank 2H per sampled
    column and the effective acceleration equals the nominal R = W / columns."""
    g = _gen(90)
    mask = torch.rand(3, 8, generator=g) < 0.4
    mask[:, 4] = True
    A = SubsampledFourier(mask, complex_images=True)
    y = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64) * mask[:, None, None, :]
    torch.testing.assert_close(A(A.T(y)), y)
    torch.testing.assert_close(A.pinv(y), A.T(y))
    torch.testing.assert_close(A.effective_acceleration(), 8 / mask.sum(-1).double())
    real = SubsampledFourier(mask)
    assert bool((real.effective_acceleration() <= A.effective_acceleration()).all())
    # A real image in the real channel is observed exactly as by the real-image operator.
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A(torch.cat([x, torch.zeros_like(x)], 1)), real(x))


def test_complex_sense_with_normalised_maps_inverts_by_its_combination():
    g = _gen(91)
    maps = torch.complex(torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64),
                         torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64))
    maps = maps / maps.abs().square().sum(1, keepdim=True).sqrt()
    A = SenseFourier(torch.ones(2, 6, 6, dtype=torch.bool), maps, complex_images=True)
    x = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A.sense_combination(A(x)), x)
    torch.testing.assert_close(A.T(A(x)), x)  # sum_c |S_c|^2 = 1 and full sampling: an isometry
