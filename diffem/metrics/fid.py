r"""Image-set metrics on Inception-v3 features: FID, KID and the Inception score.

The Fréchet Inception distance between two image sets with Inception-v3 pool features
:math:`(\mu_1, \Sigma_1)` and :math:`(\mu_2, \Sigma_2)` is

.. math:: \mathrm{FID} = \lVert \mu_1 - \mu_2 \rVert^2
          + \operatorname{tr}\big(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2}\big).

The kernel Inception distance is the squared maximum mean discrepancy between the two
feature sets under the polynomial kernel :math:`k(a, b) = (a^\top b / D + 1)^3`
(``D = 2048``), estimated without bias (the U-statistic of Bińkowski et al.) on
``subsets`` random subsets of ``subset_size`` features from each side, and averaged.
Unlike FID, its expectation does not depend on the number of samples, so KIDs at a few
hundred samples can be compared with each other and with larger runs; a value near 0
(possibly slightly negative) means the distributions are close. FID is biased upward at
small sample counts. torch-fidelity computes both (``fid_statistics_to_metric``,
``kid_features_to_metric``); the Inception score is
:math:`\exp \mathbb{E}_x \mathrm{KL}(p(c|x) \,\|\, p(c))`, unavailable with the offline
weights (see :mod:`diffem.metrics.inception`).

Reference statistics and features are cached on disk by name (``cache_key``), e.g.
``"cifar10-train-jpeg-2000"``, under ``<cache_dir>/fid_stats/`` (``$DIFFEM_CACHE`` or
``~/.cache/diffem`` by default).

For an evaluation spread over several processes: compute :func:`inception_features` of
each process's shard on its own device, gather the ``(N, 2048)`` features in sample order,
then :func:`fid_from_features` and :func:`kid_from_features` (deterministic given the
features, whatever the process count).

References:
    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium", NeurIPS 2017, arXiv:1706.08500 (FID).
    Bińkowski et al., "Demystifying MMD GANs", ICLR 2018, arXiv:1801.01401 (KID).
    Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016,
    arXiv:1606.03498 (Inception score).
    Obukhov et al., torch-fidelity, https://github.com/toshas/torch-fidelity.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..cache import resolve_cache_dir
from .inception import (
    _FEATURES,
    _LOGITS,
    as_pixels,
    has_inception_logits,
    inception_features,
    resolve_inception_weights,
)

__all__ = [
    "fid_statistics",
    "frechet_distance",
    "fid_from_features",
    "kid_from_features",
    "reference_statistics",
    "fid",
    "kid",
    "fid_kid",
    "inception_score",
    "isc_from_logits",
    "KID_SUBSET_SIZE",
    "KID_SUBSETS",
    "KID_SEED",
]

#: torch-fidelity's default KID subset size (capped at the smaller set's size).
KID_SUBSET_SIZE = 1000
#: torch-fidelity's default number of KID subsets.
KID_SUBSETS = 100
#: torch-fidelity's default seed of the KID subsets and the IS shuffle.
KID_SEED = 2020

_STATS_VERSION = 2  # 2: the cache also holds the reference features (KID)
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _features_2d(name: str, features) -> Tensor:
    features = torch.as_tensor(features)
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"`{name}` must have shape (N, D) with N >= 2, got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"`{name}` contains NaN or inf values")
    return features.detach().cpu()


def fid_statistics(features: Tensor) -> dict[str, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (float64) of features ``(N, D)``, ``N >= 2``.

    Raises:
        ValueError: If ``features`` is not 2-D with at least 2 rows, or is not finite.
    """
    array = _features_2d("features", features).double().numpy()
    return {"mu": array.mean(axis=0), "sigma": np.cov(array, rowvar=False)}


def frechet_distance(stats_1: dict, stats_2: dict) -> float:
    """FID between two ``{"mu", "sigma"}`` statistics, by torch-fidelity's formula (eigenvalues of Σ1 Σ2).

    Raises:
        ValueError: If the statistics have mismatched or wrong shapes.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    prepared = []
    for name, stats in (("stats_1", stats_1), ("stats_2", stats_2)):
        mu, sigma = np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"`{name}` must hold mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        prepared.append({"mu": mu, "sigma": sigma})
    if prepared[0]["mu"].shape != prepared[1]["mu"].shape:
        shapes = f"{prepared[0]['mu'].shape} vs {prepared[1]['mu'].shape}"
        raise ValueError(f"`stats_1` and `stats_2` have different dimensions: {shapes}")
    return float(fid_statistics_to_metric(prepared[0], prepared[1], False)[KEY_METRIC_FID])


def fid_from_features(features: Tensor, stats: dict) -> float:
    r"""FID of features ``(N, D)`` against reference statistics ``{"mu": (D,), "sigma": (D, D)}``.

    Exact low-rank evaluation when ``N <= D``: with centred features :math:`X` (``N x D``)
    and :math:`\Sigma_1 = X^T X / (N - 1)`, the non-zero eigenvalues of
    :math:`\Sigma_1 \Sigma_2` are those of the symmetric ``N x N`` matrix
    :math:`X \Sigma_2 X^T / (N - 1)`, so :math:`\operatorname{tr}(\Sigma_1 \Sigma_2)^{1/2}`
    costs an ``N x N`` symmetric eigendecomposition instead of torch-fidelity's general
    ``D x D`` one (minutes on a small CPU for D = 2048). For ``N > D``: :func:`frechet_distance`.

    Raises:
        ValueError: For features that are not ``(N >= 2, D)`` and finite, or statistics of
            another dimension.
    """
    features = _features_2d("features", features)
    x = features.double().numpy()
    n, d = x.shape
    if n > d:
        return frechet_distance(fid_statistics(features), stats)
    mu2, sigma2 = np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)
    if mu2.shape != (d,) or sigma2.shape != (d, d):
        raise ValueError(f"reference statistics have shapes {mu2.shape} / {sigma2.shape}, expected ({d},) / ({d}, {d})")
    mu1 = x.mean(axis=0)
    xc = x - mu1
    inner = xc @ sigma2 @ xc.T / (n - 1)
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.square(xc).sum() / (n - 1) + np.trace(sigma2) - 2.0 * tr_covmean)


_fid_from_features = fid_from_features  # the name before the metrics package split


def kid_from_features(
    features: Tensor,
    reference_features: Tensor,
    *,
    subset_size: int | None = None,
    subsets: int = KID_SUBSETS,
    seed: int = KID_SEED,
) -> dict:
    r"""Unbiased KID between features ``(N, D)`` and reference features ``(M, D)`` (torch-fidelity).

    Each of ``subsets`` rounds draws ``subset_size`` rows of each side without replacement
    (NumPy ``RandomState(seed)``, as torch-fidelity) and computes the unbiased MMD²
    estimate with the kernel :math:`(a^\top b / D + 1)^3` in float64; KID is their mean.

    Arguments:
        features: ``(N, D)`` features of the samples, ``N >= 2``.
        reference_features: ``(M, D)`` features of the reference set, ``M >= 2``.
        subset_size: Rows per subset, ``2 <= subset_size <= min(N, M)``; default
            ``min(1000, N, M)`` (torch-fidelity's 1000 when both sets are large enough).
        subsets: Number of subsets (torch-fidelity's default 100).
        seed: Seed of the subset draws.

    Returns:
        ``{"kid": float, "kid_std": float (spread over the subsets), "kid_subset_size": int,
        "kid_subsets": int}``.

    Raises:
        ValueError: For features that are not 2-D, finite and of equal width, or a
            ``subset_size`` outside ``[2, min(N, M)]``, ``subsets < 1``, ``seed < 0``.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    features = _features_2d("features", features)
    reference_features = _features_2d("reference_features", reference_features)
    if features.shape[1] != reference_features.shape[1]:
        raise ValueError(
            f"`features` {tuple(features.shape)} and `reference_features` {tuple(reference_features.shape)} "
            "have different widths"
        )
    largest = min(len(features), len(reference_features))
    if subset_size is None:
        subset_size = min(KID_SUBSET_SIZE, largest)
    subset_size = _positive_int("subset_size", subset_size, 2)
    if subset_size > largest:
        raise ValueError(
            f"`subset_size` ({subset_size}) must be <= the smaller set's size "
            f"(features {len(features)}, reference_features {len(reference_features)})"
        )
    subsets = _positive_int("subsets", subsets)
    seed = _positive_int("seed", seed, 0)
    out = kid_features_to_metric(
        features.double(), reference_features.double(),
        kid_subsets=subsets, kid_subset_size=subset_size, rng_seed=seed, verbose=False,
    )
    return {"kid": float(out[KEY_METRIC_KID_MEAN]), "kid_std": float(out[KEY_METRIC_KID_STD]),
            "kid_subset_size": subset_size, "kid_subsets": subsets}


# ---------------------------------------------------------------------------
# Reference statistics (cached)
# ---------------------------------------------------------------------------


def _fingerprint(pixels: Tensor) -> str:
    digest = hashlib.sha256(str(tuple(pixels.shape)).encode())
    digest.update(pixels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _stats_file(cache_key: str, cache_dir) -> Path:
    if not isinstance(cache_key, str) or not _KEY_PATTERN.match(cache_key):
        raise ValueError(f"`cache_key` must be a file-name-safe string like 'cifar10-train-jpeg', got {cache_key!r}")
    return resolve_cache_dir(cache_dir) / "fid_stats" / f"{cache_key}.npz"


def _load_stats(path: Path) -> dict:
    with np.load(path) as cached:
        stats = {
            "mu": cached["mu"],
            "sigma": cached["sigma"],
            "num": int(cached["num"]),
            "fingerprint": str(cached["fingerprint"]),
        }
        if "features" in cached.files:
            stats["features"] = torch.from_numpy(cached["features"])
    return stats


def reference_statistics(
    reference=None,
    *,
    cache_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
    verbose: bool = False,
) -> dict:
    """FID statistics and Inception features of a reference image set, cached on disk under ``cache_key``.

    With ``cache_key``, they live in ``<cache_dir>/fid_stats/<cache_key>.npz`` with the
    SHA-256 of the reference pixels: a later call with the same key loads them
    (``reference`` may then be ``None``); if ``reference`` is given and its pixels differ
    from the cached ones, or the cache predates the stored features, they are recomputed
    and overwritten (with a warning for changed pixels).

    Arguments:
        reference: ``(M, C, H, W)`` images (floats in [-2, 2] or uint8), or ``None``
            to load cached statistics.
        cache_key: Name of the cached statistics, e.g. ``"cifar10-train-jpeg-2000"``
            (letters, digits, ``.``, ``_``, ``-``).
        cache_dir, batch_size, device, weights_path, verbose: See :func:`inception_features`.

    Returns:
        ``{"mu": (2048,), "sigma": (2048, 2048), "num": M, "fingerprint": str,
        "features": (M, 2048) float32}``; ``"features"`` is missing only when a cache
        written before version 2 is loaded without ``reference``.

    Raises:
        ValueError: If both ``reference`` and ``cache_key`` are ``None``, or
            ``cache_key`` is not file-name safe; the errors of :func:`inception_features`.
        FileNotFoundError: If ``reference`` is ``None`` and nothing is cached under ``cache_key``.
    """
    if reference is None and cache_key is None:
        raise ValueError("`reference` and `cache_key` are both None: give images or the key of cached statistics")
    path = None if cache_key is None else _stats_file(cache_key, cache_dir)
    pixels = None if reference is None else as_pixels("reference", reference)
    fingerprint = None if pixels is None else _fingerprint(pixels)
    if path is not None and path.is_file():
        stats = _load_stats(path)
        if fingerprint is None or (fingerprint == stats["fingerprint"] and "features" in stats):
            return stats
        if fingerprint != stats["fingerprint"]:
            warnings.warn(f"`cache_key` {cache_key!r}: the reference images changed; recomputing {path}")
    elif pixels is None:
        raise FileNotFoundError(
            f"`cache_key` {cache_key!r}: no cached reference statistics at {path}; pass `reference`"
        )
    features = inception_features(
        pixels, batch_size=batch_size, device=device, weights_path=weights_path, cache_dir=cache_dir, verbose=verbose
    )[_FEATURES]
    stats = fid_statistics(features) | {"num": len(pixels), "fingerprint": fingerprint, "features": features}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"], num=stats["num"], fingerprint=fingerprint,
                 features=features.numpy(), version=_STATS_VERSION)
        os.replace(tmp, path)
    return stats


# ---------------------------------------------------------------------------
# FID, KID, IS of image sets
# ---------------------------------------------------------------------------


def isc_from_logits(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception score (mean, std over ``splits``) from classifier logits ``(N, 1008)`` (torch-fidelity, seed 2020).

    Raises:
        ValueError: If ``logits`` is not ``(N, K)`` and finite (e.g. the NaN classifier of
            the offline weights), or ``splits`` is not in ``[1, N]``.
    """
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    logits = _features_2d("logits", logits)
    splits = _positive_int("splits", splits)
    if splits > len(logits):
        raise ValueError(f"`splits` ({splits}) must be <= the number of images ({len(logits)})")
    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=KID_SEED)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


_isc = isc_from_logits


def fid_kid(
    samples,
    reference=None,
    *,
    cache_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    kid_subset_size: int | None = None,
    kid_subsets: int = KID_SUBSETS,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
    isc_splits: int = 10,
    verbose: bool = False,
) -> dict:
    """FID and KID of ``samples`` against a reference set, from one pass of Inception (and IS when possible).

    Arguments:
        samples: ``(N, C, H, W)``, ``C`` in {1, 3}, ``N >= 2``: floats in [-2, 2] or uint8 pixels.
        reference: Reference images, same conventions (any ``M >= 2``), or ``None``
            to use the statistics and features cached under ``cache_key``.
        cache_key: Cache the reference statistics under this name (see
            :func:`reference_statistics`), so a 50k reference set is processed once.
        kid_subset_size, kid_subsets: See :func:`kid_from_features` (default subset size
            ``min(1000, N, M)``).
        cache_dir, batch_size, device, weights_path, verbose: See :func:`inception_features`.
        isc_splits: Splits of the Inception score (torch-fidelity's estimator, seed 2020).

    Returns:
        ``{"fid", "kid", "kid_std": float, "kid_subset_size", "kid_subsets": int,
        "isc", "isc_std": float | None, "num_samples": N, "num_reference": M}``. ``isc``
        is ``None`` (unavailable) unless the weights have a real classifier.

    Raises:
        TypeError / ValueError: Bad ``samples`` / ``reference`` (naming them), bad
            ``cache_key``, ``kid_subset_size`` above ``min(N, M)``.
        FileNotFoundError: If ``reference`` is ``None`` and nothing (or no features) is
            cached under ``cache_key``, or ``weights_path`` is missing.
    """
    return _image_set_metrics(
        samples, reference, want_kid=True, cache_key=cache_key, cache_dir=cache_dir, kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets, batch_size=batch_size, device=device, weights_path=weights_path,
        isc_splits=isc_splits, verbose=verbose,
    )


def _image_set_metrics(samples, reference, *, want_kid: bool, cache_key, cache_dir, kid_subset_size, kid_subsets,
                       batch_size, device, weights_path, isc_splits, verbose, want_isc: bool = True) -> dict:
    """The body of :func:`fid`, :func:`kid` and :func:`fid_kid`: one Inception pass over ``samples``."""
    isc_splits = _positive_int("isc_splits", isc_splits)
    pixels = as_pixels("samples", samples)
    path = resolve_inception_weights(weights_path, cache_dir)
    ref = reference_statistics(
        reference, cache_key=cache_key, cache_dir=cache_dir, batch_size=batch_size,
        device=device, weights_path=path, verbose=verbose,
    )
    if want_kid and "features" not in ref:
        raise FileNotFoundError(
            f"`cache_key` {cache_key!r}: the cached reference statistics predate stored features (needed for "
            "KID); pass `reference` to recompute them"
        )
    if want_kid:  # check the subset size before the (slow) Inception pass
        largest = min(len(pixels), int(ref["num"]))
        if kid_subset_size is not None and not (isinstance(kid_subset_size, int) and 2 <= kid_subset_size <= largest):
            raise ValueError(f"`kid_subset_size` must be an integer in [2, {largest}] "
                             f"(samples {len(pixels)}, reference {ref['num']}), got {kid_subset_size!r}")
    logits = want_isc and has_inception_logits(path)
    features = inception_features(
        pixels, batch_size=batch_size, device=device, weights_path=path, logits=logits, verbose=verbose
    )
    isc = isc_std = None
    if logits:
        isc, isc_std = _isc(features[_LOGITS], isc_splits)
    out = {"fid": fid_from_features(features[_FEATURES], ref), "isc": isc, "isc_std": isc_std}
    if want_kid:
        out |= kid_from_features(features[_FEATURES], ref["features"], subset_size=kid_subset_size,
                                 subsets=kid_subsets)
    return out | {"num_samples": len(pixels), "num_reference": int(ref["num"])}


def fid(
    samples,
    reference=None,
    *,
    cache_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
    isc_splits: int = 10,
    verbose: bool = False,
) -> dict:
    """FID of ``samples`` against a reference set (and their Inception score when possible).

    Arguments and errors: as :func:`fid_kid`, without the KID arguments.

    Returns:
        ``{"fid": float, "isc": float | None, "isc_std": float | None,
        "num_samples": N, "num_reference": M}``.
    """
    return _image_set_metrics(
        samples, reference, want_kid=False, cache_key=cache_key, cache_dir=cache_dir, kid_subset_size=None,
        kid_subsets=KID_SUBSETS, batch_size=batch_size, device=device, weights_path=weights_path,
        isc_splits=isc_splits, verbose=verbose,
    )


def kid(
    samples,
    reference=None,
    *,
    subset_size: int | None = None,
    subsets: int = KID_SUBSETS,
    cache_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
    verbose: bool = False,
) -> dict:
    """Unbiased KID of ``samples`` against a reference set (torch-fidelity; see :func:`kid_from_features`).

    Arguments:
        samples, reference, cache_key, cache_dir, batch_size, device, weights_path,
            verbose: As :func:`fid_kid`.
        subset_size: Features per subset, ``2 <= subset_size <= min(N, M)``; default
            ``min(1000, N, M)``.
        subsets: Number of random subsets.

    Returns:
        ``{"kid": float, "kid_std": float, "kid_subset_size": int, "kid_subsets": int,
        "num_samples": N, "num_reference": M}``.

    Raises:
        As :func:`fid_kid`.
    """
    out = _image_set_metrics(
        samples, reference, want_kid=True, cache_key=cache_key, cache_dir=cache_dir, kid_subset_size=subset_size,
        kid_subsets=subsets, batch_size=batch_size, device=device, weights_path=weights_path, isc_splits=1,
        want_isc=False, verbose=verbose,
    )
    keys = ("kid", "kid_std", "kid_subset_size", "kid_subsets", "num_samples", "num_reference")
    return {k: out[k] for k in keys}


def inception_score(
    samples,
    *,
    splits: int = 10,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> float | None:
    """Inception score of ``samples`` ``(N, C, H, W)``, or ``None`` when no classifier weights exist.

    With the offline converted weights (no classifier) this returns ``None``
    ("unavailable") without running the network: never a made-up number.

    Raises:
        The errors of :func:`inception_features`; ValueError if ``splits < 1``.
    """
    splits = _positive_int("splits", splits)
    pixels = as_pixels("samples", samples)
    path = resolve_inception_weights(weights_path, cache_dir)
    if not has_inception_logits(path):
        return None
    logits = inception_features(pixels, batch_size=batch_size, device=device, weights_path=path, logits=True)[_LOGITS]
    return _isc(logits, splits)[0]
