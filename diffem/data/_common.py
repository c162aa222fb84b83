"""Argument checks shared by the data modules."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def check_seed(seed) -> int:
    """``seed`` as an ``int``; ValueError naming ``seed`` unless it is a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}")
    return int(seed)


def image_indices(indices: Sequence[int] | Tensor | None, n: int) -> np.ndarray:
    """Per-image indices ``(n,)`` int64 (default ``0 .. n-1``); ValueError naming ``indices`` if bad."""
    if indices is None:
        return np.arange(n, dtype=np.int64)
    idx = np.asarray(indices.cpu() if torch.is_tensor(indices) else indices, dtype=np.int64).reshape(-1)
    if len(idx) != n:
        raise ValueError(f"`indices` has length {len(idx)}, expected {n} (one per image of `x`)")
    if (idx < 0).any():
        raise ValueError("`indices` must be non-negative")
    return idx
