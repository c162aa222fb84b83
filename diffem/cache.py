"""The cache folder of datasets, FID statistics and converted weights.

``$DIFFEM_CACHE`` if set, else ``~/.cache/diffem``; every loader and metric that keeps files
between runs takes a ``cache_dir`` argument (``None``: this folder).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir", "resolve_cache_dir"]


def default_cache_dir() -> Path:
    """The cache folder of datasets, FID statistics and converted weights.

    ``$DIFFEM_CACHE`` if set, else ``~/.cache/diffem``.
    """
    return Path(os.environ.get("DIFFEM_CACHE") or Path.home() / ".cache" / "diffem").expanduser()


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` as a path (``~`` expanded), or :func:`default_cache_dir` when ``None``."""
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
