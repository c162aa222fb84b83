r"""Your own observations: the observation-dataset schema that ``diffem train custom`` reads.

A dataset of observations :math:`y_i = A_i x_i + e_i`, :math:`e_i \sim \mathcal{N}(0, \sigma_y^2 I)`,
with no clean :math:`x` in it. Rows are observations; the columns are

- ``y``: the observation, float, the same shape in every row;
- the operator's parameters, named by the operator kind (metadata ``operator``):

  ========== ============ ============================================================ ===================
  operator   column       shape per row                                                 ``y`` per row
  ========== ============ ============================================================ ===================
  mask       ``mask``     bool ``(H, W)`` or ``(1, H, W)``: True = observed pixel       ``event_shape``
  projection ``matrix``   float ``(m, d)``, ``d = prod(event_shape)``                   ``(m,)``
  fourier    ``mask``     bool ``(W,)``: observed k-space columns (event ``(1, S, S)``) ``(2, S, S)``
  ========== ============ ============================================================ ===================

  (:class:`~diffem.operators.Mask`, :class:`~diffem.operators.Projection`,
  :class:`~diffem.operators.SubsampledFourier`: the centred orthonormal FFT, real and imaginary
  parts as two channels);
- ``noise_std``: :math:`\sigma_y` (optional column; else the metadata's), in data units, > 0: one
  for all rows, or one per row. Observations with their own noise level are whitened
  (:func:`diffem.observations.whiten`): row :math:`i` becomes :math:`w_i y_i` with operator
  :math:`w_i A_i` and one shared :math:`\sigma_0` (the median), which leaves every posterior unchanged.

The metadata (a JSON object) gives ``operator`` (``"mask"``, ``"projection"`` or ``"fourier"``),
``event_shape`` (the shape of one ``x``: ``[d]`` for vectors, ``[C, H, W]`` for images),
``data_range`` (``[low, high]``: where the clean signals lie; diffem maps it to its own
``[-2, 2]``, :func:`to_observation_set`) and optionally ``noise_std`` and ``name``. It is read
from ``diffem.json`` beside (or inside) the data, or from the dataset's ``info.description``
(what :func:`save_observation_dataset` writes, and what a Hub dataset carries).

Sources (:func:`load_observation_dataset`): a folder written by ``datasets.Dataset.save_to_disk``,
a ``.parquet`` file or a folder of them, an ``.npz`` file (arrays named as the columns,
``metadata`` a JSON string or a ``diffem.json`` beside it), or a Hub dataset id (online only).

A *validation* dataset (``data.validation``, optional) has the same schema and metadata plus the
column ``x``: the clean signals behind its observations. It is read by the evaluation only, which
then scores posteriors against ``x`` (:class:`diffem.tasks.custom.CustomTask`); EM never sees it.

Every check (:func:`validate`) runs before any work and raises
:class:`~diffem.config.ConfigError` naming the column or metadata key and what was expected.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError

__all__ = ["OPERATOR_COLUMNS", "METADATA_FILE", "CustomObservations", "load_observation_dataset", "validate",
           "to_observation_set", "to_model_units", "save_observation_dataset"]

#: Operator kind -> the column holding its per-row parameters.
OPERATOR_COLUMNS = {"mask": "mask", "projection": "matrix", "fourier": "mask"}
#: The metadata file beside (or inside) the data.
METADATA_FILE = "diffem.json"


class CustomObservations:
    """A validated observation dataset: arrays in the user's units and the metadata.

    Attributes: ``y`` ``(N, *out_shape)`` float32, ``params`` (the operator column ``(N, ...)``),
    ``noise_std`` (float, or a float64 tensor ``(N,)`` when the rows have their own; user units), ``operator`` (kind), ``event_shape`` (tuple),
    ``data_range`` (low, high), ``name`` and ``source`` (what was read); ``x`` ``(N, *event_shape)``,
    the clean signals, for a validation dataset only (else ``None``).
    """

    def __init__(self, y, params, noise_std, operator, event_shape, data_range, name, source):
        self.y, self.params, self.noise_std, self.x = y, params, noise_std, None
        self.operator, self.event_shape, self.data_range = operator, event_shape, data_range
        self.name, self.source = name, source

    def __len__(self) -> int:
        return len(self.y)


def _read_metadata(path: Path | None, description: str | None, embedded=None) -> dict:
    for candidate in ([path / METADATA_FILE, path.parent / METADATA_FILE] if path is not None else []):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except ValueError as e:
                raise ConfigError(f"metadata file `{candidate}` is not valid JSON: {e}") from None
    for text in (embedded, description):
        if text:
            try:
                return json.loads(text)
            except ValueError:
                continue
    raise ConfigError(f"no metadata: write `{METADATA_FILE}` beside the data (or the dataset's info.description) "
                      "with `operator`, `event_shape` and `data_range` (diffem.data.custom)")


def load_observation_dataset(source: str | os.PathLike, clean: bool = False, key: str = "data.path") -> CustomObservations:
    """Read and :func:`validate` an observation dataset (module docstring: the schema and the sources).

    Arguments:
        source: A ``save_to_disk`` folder, parquet file or folder, ``.npz`` file or Hub dataset id.
        clean: Read a *validation* dataset: the same schema plus the column ``x``, the clean signals.
        key: The config key named in errors.

    Raises:
        ConfigError: for a missing source, a missing or bad column or metadata key (the message names it).
    """
    import datasets

    text = str(source)
    path = Path(text).expanduser()
    embedded = None
    if path.suffix == ".npz":
        if not path.is_file():
            raise ConfigError(f"config key `{key}`: file `{path}` does not exist")
        with np.load(path, allow_pickle=False) as f:
            columns = {k: f[k] for k in f.files if k != "metadata"}
            embedded = str(f["metadata"]) if "metadata" in f.files else None
        meta = _read_metadata(path.parent, None, embedded)
    else:
        if path.exists():
            if (path / "dataset_info.json").is_file():
                ds = datasets.load_from_disk(str(path))
            elif path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
                files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
                ds = datasets.load_dataset("parquet", data_files=files, split="train")
            else:
                raise ConfigError(f"config key `{key}`: `{path}` is neither a `save_to_disk` folder, parquet nor .npz")
        elif "/" in text and not text.startswith((".", "/", "~")):
            try:
                ds = datasets.load_dataset(text, split="train")
            except Exception as e:  # noqa: BLE001 - offline, or no such dataset
                raise ConfigError(f"config key `{key}`: `{text}` is no local path and could not be loaded from "
                                  f"the Hub ({type(e).__name__}: {e})") from None
        else:
            raise ConfigError(f"config key `{key}`: `{path}` does not exist")
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        meta = _read_metadata(path if path.exists() else None, ds.info.description)
        ds = ds.with_format("numpy")
        columns = {name: ds[name] for name in ds.column_names}
    return validate(columns, meta, text, clean=clean)


def _stack(name: str, column) -> np.ndarray:
    try:
        array = np.asarray(column)
        if array.dtype == object:
            array = np.stack([np.asarray(v) for v in column])
    except ValueError:
        raise ConfigError(f"column `{name}`: rows of different shapes (every row must have the same shape)") from None
    return array


def validate(columns: dict, meta: dict, source: str = "", clean: bool = False) -> CustomObservations:
    """Check columns and metadata against the schema; see the module docstring.

    With ``clean`` (a validation dataset) the column ``x`` is required: the clean signals, of the
    event shape, finite, in the data's units; it is returned as the attribute ``x`` (float32).

    Raises:
        ConfigError: naming the column or metadata key: a missing column, wrong shapes, an operator
            kind and parameters that disagree, non-finite values, a bad noise level or data range.
    """
    for key in ("operator", "event_shape", "data_range"):
        if key not in meta:
            raise ConfigError(f"metadata `{key}` is missing (need operator, event_shape, data_range)")
    kind = meta["operator"]
    if kind not in OPERATOR_COLUMNS:
        raise ConfigError(f"metadata `operator`: {kind!r} is unknown (known: {', '.join(OPERATOR_COLUMNS)})")
    try:
        event = tuple(int(s) for s in meta["event_shape"])
    except (TypeError, ValueError):
        raise ConfigError(f"metadata `event_shape` must be a list of integers, got {meta['event_shape']!r}") from None
    if len(event) not in (1, 3) or min(event) < 1:
        raise ConfigError(f"metadata `event_shape` must be [d] (vectors) or [C, H, W] (images), got {list(event)}")
    rng = meta["data_range"]
    if not (isinstance(rng, (list, tuple)) and len(rng) == 2 and all(isinstance(v, (int, float)) for v in rng)
            and math.isfinite(rng[0]) and math.isfinite(rng[1]) and rng[0] < rng[1]):
        raise ConfigError(f"metadata `data_range` must be [low, high] with low < high (where the clean signals lie), "
                          f"got {rng!r}")
    if "y" not in columns:
        raise ConfigError(f"column `y` is missing (columns: {', '.join(sorted(columns)) or 'none'})")
    param = OPERATOR_COLUMNS[kind]
    if param not in columns:
        raise ConfigError(f"operator {kind!r} needs a column `{param}` (columns: {', '.join(sorted(columns))})")
    if clean and "x" not in columns:
        raise ConfigError(f"column `x` is missing: a validation dataset holds the clean signals `x` beside y and `{param}`")
    others = sorted(set(columns) - {"y", param, "noise_std"} - ({"x"} if clean else set()))
    if others:
        raise ConfigError(f"column `{others[0]}` is not part of the schema for operator {kind!r} "
                          f"(y, {param}, noise_std); a clean `x` never belongs in an observation dataset")
    y = _stack("y", columns["y"]).astype(np.float32)
    p = _stack(param, columns[param])
    n = len(y)
    if n < 2:
        raise ConfigError(f"column `y`: {n} observation(s); EM needs at least 2")
    if len(p) != n:
        raise ConfigError(f"column `{param}` has {len(p)} rows, column `y` {n}")
    bad = np.flatnonzero(~np.isfinite(y.reshape(n, -1)).all(1))
    if len(bad):
        raise ConfigError(f"column `y` has non-finite values in {len(bad)} row(s), the first: {bad[:5].tolist()}")
    if kind in ("mask", "fourier"):
        if p.dtype != np.bool_:
            if not np.isin(p, (0, 1)).all():
                raise ConfigError(f"column `mask` must be boolean (or 0 / 1), got values {np.unique(p)[:5].tolist()}")
            p = p.astype(bool)
    else:
        p = p.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(p.reshape(n, -1)).all(1))
        if len(bad):
            raise ConfigError(f"column `matrix` has non-finite values in {len(bad)} row(s), the first: {bad[:5].tolist()}")
    row_y, row_p = tuple(y.shape[1:]), tuple(p.shape[1:])
    if kind == "mask":
        if len(event) != 3:
            raise ConfigError(f"operator 'mask' needs images: metadata `event_shape` [C, H, W], got {list(event)}")
        if row_p not in (event[1:], (1, *event[1:])):
            raise ConfigError(f"column `mask`: rows of shape {row_p}, expected {event[1:]} or {(1, *event[1:])} "
                              f"(event_shape {list(event)})")
        if row_y != event:
            raise ConfigError(f"column `y`: rows of shape {row_y}, expected the event shape {event} (operator 'mask')")
        p = p.reshape(n, 1, *event[1:])
        if not p.reshape(n, -1).any(1).all():
            raise ConfigError("column `mask`: some rows observe no pixel")
    elif kind == "projection":
        d = math.prod(event)
        if len(row_p) != 2 or row_p[1] != d:
            raise ConfigError(f"column `matrix`: rows of shape {row_p}, expected (m, {d}) for event_shape {list(event)}")
        if row_y != (row_p[0],):
            raise ConfigError(f"column `y`: rows of shape {row_y}, expected ({row_p[0]},) = the matrix rows")
    else:
        if len(event) != 3 or event[0] != 1 or event[1] != event[2]:
            raise ConfigError(f"operator 'fourier' needs square single-channel images: event_shape [1, S, S], "
                              f"got {list(event)}")
        s = event[-1]
        if row_p != (s,):
            raise ConfigError(f"column `mask`: rows of shape {row_p}, expected ({s},) (the k-space columns)")
        if row_y != (2, s, s):
            raise ConfigError(f"column `y`: rows of shape {row_y}, expected (2, {s}, {s}) (real, imaginary k-space)")
    if "noise_std" in columns:
        sig = np.asarray(columns["noise_std"], dtype=np.float64).reshape(-1)
        if len(sig) not in (1, n):
            raise ConfigError(f"column `noise_std` has {len(sig)} rows, column `y` {n}")
        if not (np.isfinite(sig).all() and (sig > 0).all()):
            raise ConfigError("column `noise_std` must be finite and > 0")
        if sig.max() - sig.min() > 1e-12 * sig.max():  # one per observation
            if "noise_std" in meta:
                raise ConfigError(f"column `noise_std` varies over the rows ({sig.min():g} to {sig.max():g}) and metadata "
                                  f"`noise_std` ({meta['noise_std']}) gives one value: give one or the other")
            noise = torch.from_numpy(sig.copy())
        else:
            noise = float(sig[0])
            if "noise_std" in meta and abs(float(meta["noise_std"]) - noise) > 1e-12 * noise:
                raise ConfigError(f"column `noise_std` ({noise:g}) and metadata `noise_std` ({meta['noise_std']}) disagree")
    elif "noise_std" in meta:
        noise = float(meta["noise_std"])
        if not (math.isfinite(noise) and noise > 0):
            raise ConfigError(f"metadata `noise_std` must be finite and > 0, got {meta['noise_std']!r}")
    else:
        raise ConfigError("no noise level: give a column `noise_std` or metadata `noise_std` (sigma_y > 0)")
    out = CustomObservations(torch.from_numpy(y), torch.from_numpy(np.ascontiguousarray(p)), noise, kind, event,
                             (float(rng[0]), float(rng[1])), str(meta.get("name", Path(source).name or "custom")), source)
    if clean:
        x = _stack("x", columns["x"]).astype(np.float32)
        if x.shape != (n, *event):
            raise ConfigError(f"column `x`: shape {x.shape}, expected {(n, *event)} (one clean signal of the event "
                              f"shape {list(event)} per row)")
        bad = np.flatnonzero(~np.isfinite(x.reshape(n, -1)).all(1))
        if len(bad):
            raise ConfigError(f"column `x` has non-finite values in {len(bad)} row(s), the first: {bad[:5].tolist()}")
        out.x = torch.from_numpy(x)
    return out


def _operator(kind: str, params: Tensor, event_shape: tuple):
    from ..operators import Mask, Projection, SubsampledFourier

    if kind == "mask":
        return Mask(params.bool(), channels=event_shape[0])
    if kind == "projection":
        return Projection(params.float())
    return SubsampledFourier(params.bool())


def to_observation_set(data: CustomObservations):
    r"""The :class:`~diffem.observations.ObservationSet` in diffem's units: the data range
    ``[low, high]`` mapped to ``[-2, 2]``, :math:`x' = s x + c` with :math:`s = 4 / (high - low)`,
    :math:`c = -2 - s \cdot low`, so :math:`y' = s y + c A 1` and :math:`\sigma_y' = s \sigma_y`.
    Rows with their own :math:`\sigma_y` are then whitened (:func:`diffem.observations.whiten`).
    The clean signals of a validation dataset map with :func:`to_model_units`."""
    from ..observations import ObservationSet, whiten

    A = _operator(data.operator, data.params, data.event_shape)
    low, high = data.data_range
    s = 4.0 / (high - low)
    c = -2.0 - s * low
    y = data.y.float() * s
    if c != 0.0:
        y = y + c * A(torch.ones(len(data), *data.event_shape))
    if torch.is_tensor(data.noise_std):
        y, A, noise_std = whiten(y, A, data.noise_std * s)
        return ObservationSet(y, A, noise_std, tuple(data.event_shape))
    return ObservationSet(y, A, float(data.noise_std * s), tuple(data.event_shape))


def to_model_units(x: Tensor, data_range) -> Tensor:
    """Clean signals in the data's units ``[low, high]`` mapped to diffem's ``[-2, 2]`` (:func:`to_observation_set`)."""
    low, high = data_range
    s = 4.0 / (high - low)
    return x.float() * s + (-2.0 - s * low)


def save_observation_dataset(path: str | os.PathLike, y: Tensor, params: Tensor, operator: str, event_shape,
                             data_range, noise_std, name: str | None = None, x: Tensor | None = None) -> Path:
    """Write an observation dataset in the schema (``save_to_disk`` folder, metadata in ``diffem.json``
    and in ``info.description``), validated first.

    Arguments:
        path: The folder to write (replaced if it exists).
        y: Observations ``(N, *out_shape)``; params: the operator column ``(N, ...)`` (module docstring).
        operator, event_shape, data_range, name: The metadata.
        noise_std: sigma_y in data units: a float (written to the metadata) or one per row,
            ``(N,)`` (written as the column ``noise_std``).
        x: The clean signals ``(N, *event_shape)`` of a *validation* dataset (column ``x``); never
            for a training dataset.

    Raises:
        ConfigError: if the arrays and metadata break the schema.
    """
    import shutil

    import datasets

    per_row = np.ndim(noise_std) > 0
    meta = {"operator": operator, "event_shape": list(event_shape), "data_range": list(data_range)}
    meta |= ({} if per_row else {"noise_std": float(noise_std)}) | ({"name": name} if name else {})
    column = OPERATOR_COLUMNS[operator]
    columns = {"y": y.numpy(), column: params.numpy()}
    if per_row:
        columns["noise_std"] = np.asarray(noise_std, dtype=np.float64)
    if x is not None:
        columns["x"] = x.numpy()
    checked = validate(columns, meta, str(path), clean=x is not None)
    columns["y"] = checked.y.numpy()
    ds = datasets.Dataset.from_dict(columns, info=datasets.DatasetInfo(description=json.dumps(meta)))
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    ds.save_to_disk(str(path))
    (path / METADATA_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return path
