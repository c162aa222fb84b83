"""Arrays as ``datasets`` tables: how observation sets are stored (``y`` and operator parameters).

:func:`numpy_to_dataset` builds a ``datasets.Dataset`` (``torch`` format, ``float32``) from
named arrays ``(N, *S)`` in one Arrow table; the manifold and MNIST observation sets use it.
"""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa

__all__ = ["numpy_to_dataset"]


def _arrow_column(array: np.ndarray, feature) -> pa.Array:
    """Arrow storage of a C-contiguous ``float32`` array ``(N, *S)`` for ``feature``, without copies per row."""
    values = pa.array(array.reshape(-1))
    if array.ndim == 2:  # fixed-size list feature
        return pa.FixedSizeListArray.from_arrays(values, array.shape[1])
    if array.size >= 2**31:
        raise OverflowError("too large for 32-bit list offsets")
    for size in reversed(array.shape[1:]):
        offsets = np.arange(0, len(values) + 1, size, dtype=np.int32)
        values = pa.ListArray.from_arrays(pa.array(offsets), values)
    return pa.ExtensionArray.from_storage(feature(), values)


def numpy_to_dataset(columns: dict[str, np.ndarray]) -> datasets.Dataset:
    r"""A ``datasets.Dataset`` (``torch`` format) with one ``float32`` column per array.

    An array of shape ``(N, m)`` becomes a fixed-length ``Sequence`` column and
    one of shape ``(N, *S)`` with ``2 <= len(S) <= 5`` an ``ArrayXD`` column.
    The Arrow table is built in one piece (about 100x faster than
    ``Dataset.from_dict`` for 65,536 small matrices); should that fail on some
    ``datasets`` version, ``Dataset.from_dict`` is used instead, with the same
    features and values.

    Raises:
        ValueError: If the arrays do not share their first dimension or have
            an unsupported number of dimensions.
    """
    arrays_xd = {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D, 5: datasets.Array5D}
    arrays, features = {}, {}
    lengths = {len(a) for a in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: { {k: len(a) for k, a in columns.items()} }")
    for name, array in columns.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 2:
            features[name] = datasets.Sequence(datasets.Value("float32"), length=array.shape[1])
        elif array.ndim - 1 in arrays_xd:
            features[name] = arrays_xd[array.ndim - 1](shape=array.shape[1:], dtype="float32")
        else:
            raise ValueError(f"column {name!r} has shape {array.shape}, expected 2 to 6 dimensions")
        arrays[name] = array
    features = datasets.Features(features)
    try:
        table = pa.table(
            {name: _arrow_column(array, features[name]) for name, array in arrays.items()},
            schema=features.arrow_schema,
        )
        ds = datasets.Dataset(table)
        if ds.features != features:
            raise TypeError("unexpected features")
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        ds = datasets.Dataset.from_dict(arrays, features=features)
    return ds.with_format("torch")
