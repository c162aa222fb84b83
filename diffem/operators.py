r"""Linear observation operators A and the Gaussian observation model.

An observation is

.. math:: y = A x + e, \qquad e \sim \mathcal{N}(0, \sigma_y^2 I)

where the linear operator :math:`A` may differ per observation (a pixel mask per
image, a k-space mask per MRI slice, a 2x5 projection per manifold point).

Every operator is *batched with per-sample parameters*: its parameters carry a
batch shape, either ``()`` (one operator, shared by every sample: it applies to
``x`` with any leading shape) or ``(B,)`` (one operator per sample: ``x`` must
have exactly ``B`` samples). Nothing else is broadcast: a mismatch raises a
:class:`ValueError` naming the argument.

Each operator implements the forward map ``A(x)`` and its adjoint ``A.T(y)``,
with respect to the real Euclidean inner products of the input and output
spaces, so that :math:`\langle A x, y \rangle = \langle x, A^T y \rangle`.
Most also implement the Moore-Penrose pseudo-inverse ``A.pinv(y)``,
:math:`A^+ = A^T (A A^T)^+` (``A.has_pinv`` says whether one does).

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", NeurIPS 2024, arXiv:2405.13712, Section 3 and Appendix C.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "LinearOperator",
    "FunctionOperator",
    "Identity",
    "Mask",
    "Projection",
    "SubsampledFourier",
    "SuperResolution",
    "GaussianBlur",
    "GaussianObservation",
    "column_mask",
    "column_mask_fraction",
    "check_finite",
    "check_batch",
]


def check_finite(name: str, x: Tensor) -> None:
    """Raise a ValueError naming ``name`` if ``x`` holds a NaN or an infinity."""
    if not torch.is_tensor(x):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not torch.isfinite(x).all():
        raise ValueError(f"`{name}` contains NaN or inf values")


def _check_shape(name: str, x: Tensor, expected: Sequence[int]) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"`{name}` has shape {tuple(x.shape)}, expected {tuple(expected)}")


class LinearOperator:
    r"""A batched linear operator :math:`A : \mathbb{R}^{\text{in}} \to \mathbb{R}^{\text{out}}`.

    **Batching rule.** ``batch_shape`` is ``()`` (one operator) or ``(B,)`` (one
    operator per sample). A ``()`` operator applies to ``x`` of shape
    ``(*lead, *in_shape)`` for *any* leading shape ``lead`` (it is shared by the
    whole batch); a ``(B,)`` operator needs exactly ``(B, *in_shape)``. Any other
    shape raises a :class:`ValueError` naming the argument; nothing else is broadcast.

    **Writing a subclass.**

    * Set ``in_shape`` (the event shape of ``x``) and, if you like, ``out_shape``
      (inferred by one call of ``_forward`` on zeros when left out; ``in_shape``
      likewise from ``_adjoint``). Leaving both out raises a clear
      :class:`ValueError` at the first use: the shape checks are never skipped.
      Only operators that set ``accepts_any_shape = True`` (:class:`Identity`) take
      any event shape.
    * Declare the per-sample tensors once, as a class attribute
      ``params = ("kernel", ...)`` naming instance attributes; their leading
      dimensions are the batch shape (set ``batch_shape`` in ``__init__``).
      ``parameters()``, ``A[index]`` and ``A.to(...)`` then work without more code:
      they copy the operator (keeping every other attribute, e.g. extra constructor
      arguments) and replace the declared tensors. Compute other tensors from the
      parameters inside the methods (or declare them in ``params`` too), so that
      they follow ``.to()`` and indexing.
    * Implement ``_forward`` and ``_adjoint`` (and ``_pinv`` if you can) on
      ``(*lead, *event)`` tensors.

    Or wrap a linear function with :meth:`from_function` (adjoint by ``torch.func.vjp``).
    """

    batch_shape: tuple = ()
    params: tuple = ()
    accepts_any_shape: bool = False

    # -- event shapes: declared, inferred, or refused -----------------------------------
    def _declared(self, name: str):
        attr = getattr(type(self), name, None)
        if not isinstance(attr, property):  # declared as a class attribute by a subclass
            return None if attr is None else tuple(attr)
        value = self.__dict__.get("_" + name)
        return None if value is None else tuple(value)

    def _probe_options(self) -> dict:
        tensors = list(self.parameters().values())
        floats = [t for t in tensors if t.is_floating_point()]
        dtype = floats[0].dtype if floats else torch.get_default_dtype()
        device = tensors[0].device if tensors else torch.device("cpu")
        return {"dtype": dtype, "device": device}

    def _event_shape(self, name: str, other: str, probe) -> tuple | None:
        value = self._declared(name)
        if value is not None or self.accepts_any_shape:
            return value
        known = self._declared(other)
        if known is None:
            raise ValueError(
                f"{type(self).__name__} declares neither `in_shape` nor `out_shape`: set `self.in_shape` "
                "(the event shape of x) in __init__ (or the class attribute `accepts_any_shape = True` for an "
                "operator that takes any shape), or wrap a function with LinearOperator.from_function(f, in_shape)"
            )
        zeros = torch.zeros(*self.batch_shape, *known, **self._probe_options())
        inferred = tuple(probe(zeros).shape[len(self.batch_shape) :])
        self.__dict__["_" + name] = inferred
        return inferred

    @property
    def in_shape(self) -> tuple | None:
        """The event shape of ``x`` (``None`` only for operators that accept any shape)."""
        return self._event_shape("in_shape", "out_shape", self._adjoint)

    @in_shape.setter
    def in_shape(self, value) -> None:
        self.__dict__["_in_shape"] = None if value is None else tuple(int(v) for v in value)

    @property
    def out_shape(self) -> tuple | None:
        """The event shape of ``A(x)`` (inferred by one call when not declared)."""
        return self._event_shape("out_shape", "in_shape", self._forward)

    @out_shape.setter
    def out_shape(self, value) -> None:
        self.__dict__["_out_shape"] = None if value is None else tuple(int(v) for v in value)

    # -- to override -------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement `_forward`")

    def _adjoint(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement `_adjoint`")

    def _pinv(self, y: Tensor) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no pseudo-inverse: implement `_pinv` (A^+ = A^T (A A^T)^+) "
            "to use it with a method that needs one (e.g. PiGDM)"
        )

    @property
    def has_pinv(self) -> bool:
        """Whether this operator implements :meth:`pinv` (an exact pseudo-inverse)."""
        return type(self)._pinv is not LinearOperator._pinv

    def parameters(self) -> dict[str, Tensor]:
        """The per-sample parameters, by name (what a dataset of observations stores).

        By default the attributes named in the class attribute ``params``.

        Raises:
            TypeError: if a declared parameter is not a tensor.
        """
        out = {}
        for name in self.params:
            value = getattr(self, name)
            if not torch.is_tensor(value):
                raise TypeError(
                    f"{type(self).__name__}.{name} is declared in `params` but is a {type(value).__name__}, not a tensor"
                )
            out[name] = value
        return out

    def _replace(self, **new: Tensor) -> "LinearOperator":
        """A copy of the operator with the parameters ``new`` (same names as :meth:`parameters`).

        Every other attribute is kept; the batch shape follows the new parameters.
        """
        old = self.parameters()
        op = copy.copy(self)
        batch = None
        for name, value in new.items():
            if getattr(self, name, None) is not old[name]:
                raise TypeError(
                    f"{type(self).__name__}.parameters() returns {name!r}, which is not the attribute of that "
                    "name: declare the parameters with the class attribute `params` or override `_replace`"
                )
            setattr(op, name, value)
            event_ndim = old[name].dim() - len(self.batch_shape)
            shape = tuple(value.shape[: value.dim() - event_ndim])
            if batch is not None and shape != batch:
                raise ValueError(f"the parameters of {type(self).__name__} have inconsistent batch shapes")
            batch = shape
        if batch is not None:
            op.batch_shape = batch
        return op

    # -- public API ----------------------------------------------------------------
    @staticmethod
    def from_function(function, in_shape: Sequence[int], **kwargs) -> "FunctionOperator":
        """Wrap a linear function of ``x`` as an operator; see :class:`FunctionOperator`."""
        return FunctionOperator(function, in_shape, **kwargs)

    def __call__(self, x: Tensor) -> Tensor:
        """Apply the operator: ``(*batch, *in_shape) -> (*batch, *out_shape)``."""
        self._check_input("x", x, self.in_shape)
        return self._forward(x)

    def T(self, y: Tensor) -> Tensor:
        """Apply the adjoint: ``(*batch, *out_shape) -> (*batch, *in_shape)``."""
        self._check_input("y", y, self.out_shape)
        return self._adjoint(y)

    def pinv(self, y: Tensor) -> Tensor:
        r"""Apply the Moore-Penrose pseudo-inverse :math:`A^+ = A^T (A A^T)^+`.

        ``(*batch, *out_shape) -> (*batch, *in_shape)``. It satisfies
        :math:`A A^+ A = A`, :math:`A^+ A A^+ = A^+` and :math:`A^+ y` is the
        minimum-norm least-squares solution of :math:`A x = y`.

        Raises:
            NotImplementedError: naming the operator class, if it has no pseudo-inverse
                (see :attr:`has_pinv`).
            ValueError / TypeError: if ``y`` has the wrong shape or is not a tensor.
        """
        if not self.has_pinv:
            self._pinv(y)  # raises the NotImplementedError naming the class
        self._check_input("y", y, self.out_shape)
        return self._pinv(y)

    def output_shape(self, in_shape: Sequence[int]) -> tuple:
        """The event shape of ``A(x)`` for an ``x`` of event shape ``in_shape``."""
        if self.in_shape is not None and tuple(in_shape) != tuple(self.in_shape):
            raise ValueError(f"`in_shape` is {tuple(in_shape)}, expected {self.in_shape}")
        return tuple(in_shape) if self.out_shape is None else tuple(self.out_shape)

    def __getitem__(self, index) -> "LinearOperator":
        """Select samples of a batched operator (``index``: int, slice or index tensor).

        An operator with batch shape ``()`` is shared by every sample: indexing returns it.
        """
        if tuple(self.batch_shape) == ():
            return self
        return self._replace(**{k: v[index] for k, v in self.parameters().items()})

    def to(self, *args, **kwargs) -> "LinearOperator":
        """Move the parameters (like :meth:`torch.Tensor.to`); boolean and integer tensors keep their dtype."""
        device = torch.empty(0).to(*args, **kwargs).device  # the target device, whatever the arguments

        def move(v: Tensor) -> Tensor:
            return v.to(*args, **kwargs) if v.is_floating_point() or v.is_complex() else v.to(device)

        return self._replace(**{k: move(v) for k, v in self.parameters().items()})

    def _check_input(self, name: str, x: Tensor, event: tuple | None) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
        if event is None:
            return
        batch, event = tuple(self.batch_shape), tuple(event)
        shape = tuple(x.shape)
        if batch == ():
            ok = len(shape) >= len(event) and shape[len(shape) - len(event) :] == event
            expected = f"(*lead, *{event}) (event shape {event}; batch shape () applies to any leading shape)"
        else:
            ok = shape == batch + event
            expected = f"{batch + event} (batch shape {batch} + event shape {event})"
        if not ok:
            raise ValueError(f"`{name}` has shape {shape}, expected {expected} for {type(self).__name__}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)})"


class FunctionOperator(LinearOperator):
    r"""A linear function of ``x`` as an operator; the adjoint by ``torch.func.vjp``.

    For a linear :math:`f`, the vector-Jacobian product at any point is
    :math:`v \mapsto J^T v = A^T v`, so ``A.T(y)`` is one VJP of ``function`` at
    zero (or ``adjoint(y)`` when given). The operator has batch shape ``()``: it
    applies to ``x`` of shape ``(*lead, *in_shape)`` for the leading shapes that
    ``function`` itself supports. Tensors that ``function`` closes over are not
    moved by ``.to()`` (it returns the operator unchanged): write a
    :class:`LinearOperator` subclass with ``params`` for per-sample parameters.

    Arguments:
        function: A linear map ``(*lead, *in_shape) -> (*lead, *out_shape)``.
        in_shape: The event shape of ``x``.
        out_shape: The event shape of ``function(x)``; inferred by one call on
            zeros of shape ``(1, *in_shape)`` when left out.
        adjoint: Optional exact adjoint ``(*lead, *out_shape) -> (*lead, *in_shape)``.
        pinv: Optional pseudo-inverse, same shapes as ``adjoint``.
        dtype, device: Of the zeros used to infer ``out_shape`` (default: torch's
            default dtype, CPU).

    Raises:
        TypeError: if ``function`` (or ``adjoint`` / ``pinv``) is not callable or
            does not return a tensor.
        ValueError: if ``in_shape`` is not a tuple of positive ints, or ``function``
            does not keep the leading dimension of its input.
    """

    def __init__(
        self,
        function,
        in_shape: Sequence[int],
        out_shape: Sequence[int] | None = None,
        adjoint=None,
        pinv=None,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        for name, fn in (("function", function), ("adjoint", adjoint), ("pinv", pinv)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}")
        if function is None:
            raise TypeError("`function` must be callable, got None")
        self.function = function
        self.adjoint_function = adjoint
        self.pinv_function = pinv
        self.in_shape = _event_tuple("in_shape", in_shape)
        if out_shape is None:
            probe = function(torch.zeros(1, *self.in_shape, dtype=dtype or torch.get_default_dtype(), device=device))
            if not torch.is_tensor(probe):
                raise TypeError(f"`function` must return a tensor, got {type(probe).__name__}")
            if probe.dim() < 1 or probe.shape[0] != 1:
                raise ValueError(
                    f"`function` maps a batch of 1 of shape {(1, *self.in_shape)} to shape {tuple(probe.shape)}: "
                    "it must keep the leading (batch) dimensions"
                )
            out_shape = tuple(probe.shape[1:])
        self.out_shape = _event_tuple("out_shape", out_shape, allow_empty=True)

    @property
    def has_pinv(self) -> bool:
        return self.pinv_function is not None

    def _checked(self, name: str, value, lead: tuple, event: tuple) -> Tensor:
        if not torch.is_tensor(value) or tuple(value.shape) != lead + event:
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"`{name}` returned {got}, expected shape {lead + event}")
        return value

    def _forward(self, x: Tensor) -> Tensor:
        lead = tuple(x.shape[: x.dim() - len(self.in_shape)])
        return self._checked("function", self.function(x), lead, self.out_shape)

    def _adjoint(self, y: Tensor) -> Tensor:
        lead = tuple(y.shape[: y.dim() - len(self.out_shape)])
        if self.adjoint_function is not None:
            return self._checked("adjoint", self.adjoint_function(y), lead, self.in_shape)
        x0 = torch.zeros(*lead, *self.in_shape, dtype=y.dtype, device=y.device)
        _, vjp = torch.func.vjp(self.function, x0)
        return vjp(y)[0]

    def _pinv(self, y: Tensor) -> Tensor:
        if self.pinv_function is None:
            name = getattr(self.function, "__name__", type(self.function).__name__)
            raise NotImplementedError(
                f"FunctionOperator({name}) has no pseudo-inverse: pass `pinv=` to LinearOperator.from_function"
            )
        lead = tuple(y.shape[: y.dim() - len(self.out_shape)])
        return self._checked("pinv", self.pinv_function(y), lead, self.in_shape)

    def __repr__(self) -> str:
        name = getattr(self.function, "__name__", type(self.function).__name__)
        return f"FunctionOperator({name}, in_shape={self.in_shape}, out_shape={self.out_shape})"


def _event_tuple(name: str, value, allow_empty: bool = False) -> tuple:
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a tuple of positive ints, got {value!r}") from None
    if (not shape and not allow_empty) or any(v < 1 for v in shape) or shape != tuple(value):
        raise ValueError(f"`{name}` must be a tuple of positive ints, got {value!r}")
    return shape


class Identity(LinearOperator):
    r"""The identity :math:`A = I`, for any shape of ``x`` (denoising observations)."""

    accepts_any_shape = True

    def _forward(self, x: Tensor) -> Tensor:
        return x

    def _adjoint(self, y: Tensor) -> Tensor:
        return y

    def _pinv(self, y: Tensor) -> Tensor:
        return y

    def __getitem__(self, index) -> "Identity":
        return self


def check_batch(operator: "LinearOperator", n: int, name: str = "operator") -> None:
    """Raise unless ``operator`` serves a batch of ``n`` observations.

    That is: batch shape ``(n,)`` (one operator per observation) or ``()`` (one
    operator shared by all, e.g. :class:`Identity`).

    Raises:
        TypeError: if ``operator`` is not a :class:`LinearOperator`.
        ValueError: for any other batch shape.
    """
    if not isinstance(operator, LinearOperator):
        raise TypeError(f"`{name}` must be a LinearOperator, got {type(operator).__name__}")
    if tuple(operator.batch_shape) not in ((), (n,)):
        raise ValueError(
            f"`{name}` must have batch shape ({n},) (one operator per observation) or () (one operator "
            f"shared by all), got {tuple(operator.batch_shape)}"
        )


def _check_mask(name: str, mask: Tensor, min_dim: int) -> None:
    if not torch.is_tensor(mask):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"`{name}` must have dtype torch.bool (True = observed), got {mask.dtype}")
    if mask.dim() not in (min_dim, min_dim + 1):
        raise ValueError(
            f"`{name}` must have {min_dim} (unbatched) or {min_dim + 1} (batched) dimensions, "
            f"got shape {tuple(mask.shape)}"
        )
    flat = mask.reshape(-1, *mask.shape[mask.dim() - min_dim :]) if mask.dim() > min_dim else mask[None]
    empty = ~flat.flatten(1).any(dim=1)
    if empty.any():
        raise ValueError(
            f"`{name}` observes nothing for sample(s) {empty.nonzero().flatten().tolist()[:8]}: "
            "an all-zero mask is not a valid observation"
        )


class Mask(LinearOperator):
    r"""Pixel mask shared over channels: :math:`A x = m \odot x`, self-adjoint.

    Arguments:
        mask: A boolean tensor of shape ``(*batch, 1, H, W)`` with ``batch`` equal
            to ``()`` or ``(B,)``; ``True`` marks an observed pixel. It acts on
            images of shape ``(*batch, C, H, W)`` for any ``C`` given by ``channels``.
        channels: The number of image channels ``C`` (default 3).

    ``A.pinv = A`` (an orthogonal projection). Box inpainting: :meth:`box` and
    :meth:`random_box`.

    Raises:
        ValueError: if ``mask`` is not boolean, has the wrong number of dimensions,
            has a channel dimension other than 1, or observes nothing in a sample.
    """

    params = ("mask",)

    def __init__(self, mask: Tensor, channels: int = 3):
        _check_mask("mask", mask, 3)
        if mask.shape[-3] != 1:
            raise ValueError(f"`mask` must have shape (*batch, 1, H, W), got {tuple(mask.shape)}")
        if channels < 1:
            raise ValueError(f"`channels` must be >= 1, got {channels}")
        self.mask = mask
        self.channels = int(channels)
        self.batch_shape = tuple(mask.shape[:-3])
        self.in_shape = self.out_shape = (self.channels, *mask.shape[-2:])

    def _forward(self, x: Tensor) -> Tensor:
        return x * self.mask.to(x.dtype)

    _adjoint = _forward
    # A = diag(m) with m in {0, 1} is an orthogonal projection: A^+ = A.
    _pinv = _forward

    @classmethod
    def box(
        cls,
        image_size: Sequence[int],
        box_size: Sequence[int],
        top: int | Tensor,
        left: int | Tensor,
        channels: int = 3,
    ) -> "Mask":
        r"""Box inpainting: every pixel observed except a rectangular hole per sample.

        Arguments:
            image_size: ``(H, W)`` in pixels.
            box_size: ``(h, w)``, the hole's size in pixels, ``1 <= h <= H``, ``1 <= w <= W``
                and not the whole image.
            top, left: The hole's upper-left corner, ints (one operator) or integer tensors
                of shape ``(B,)`` (one hole per sample); the hole must lie inside the image.
            channels: The number of image channels ``C``.

        Returns:
            A :class:`Mask` with mask shape ``(*batch, 1, H, W)``, ``False`` inside the hole.

        Raises:
            ValueError: if a size is not positive, the box covers the image or leaves it,
                or ``top`` / ``left`` have different or unsupported shapes.
        """
        H, W = _pair("image_size", image_size)
        h, w = _pair("box_size", box_size)
        if h > H or w > W or (h == H and w == W):
            raise ValueError(f"`box_size` {(h, w)} must fit inside `image_size` {(H, W)} and leave pixels observed")
        top, left = torch.as_tensor(top), torch.as_tensor(left)
        for name, v, limit in (("top", top, H - h), ("left", left, W - w)):
            if v.is_floating_point() or v.dtype == torch.bool or v.dim() > 1:
                raise ValueError(f"`{name}` must be an int or an integer tensor of shape (B,), got {v!r}")
            if ((v < 0) | (v > limit)).any():
                raise ValueError(f"`{name}` must lie in [0, {limit}] so that the box fits, got {v.tolist()}")
        if top.shape != left.shape:
            raise ValueError(f"`top` and `left` must have the same shape, got {tuple(top.shape)} and {tuple(left.shape)}")
        device = top.device
        rows = torch.arange(H, device=device)
        cols = torch.arange(W, device=device)
        in_rows = (rows >= top[..., None]) & (rows < top[..., None] + h)  # (*batch, H)
        in_cols = (cols >= left[..., None]) & (cols < left[..., None] + w)  # (*batch, W)
        hole = in_rows[..., :, None] & in_cols[..., None, :]
        return cls((~hole)[..., None, :, :], channels=channels)

    @classmethod
    def random_box(
        cls,
        image_size: Sequence[int],
        box_size: Sequence[int],
        generator: torch.Generator,
        batch: int | Sequence[int] = (),
        channels: int = 3,
    ) -> "Mask":
        """Box inpainting with a uniformly placed hole per sample (see :meth:`box`).

        The corners come from ``generator`` (required), one ``(top, left)`` pair per
        sample in order, so sample ``i`` does not depend on the batch size.
        """
        if not isinstance(generator, torch.Generator):
            raise ValueError("`generator` is required: pass a seeded torch.Generator")
        H, W = _pair("image_size", image_size)
        h, w = _pair("box_size", box_size)
        if h > H or w > W:
            raise ValueError(f"`box_size` {(h, w)} must fit inside `image_size` {(H, W)}")
        batch = (int(batch),) if isinstance(batch, int) else tuple(int(b) for b in batch)
        u = torch.rand(*batch, 2, generator=generator, device=generator.device, dtype=torch.float64)
        top = (u[..., 0] * (H - h + 1)).floor().long().clamp(max=H - h)
        left = (u[..., 1] * (W - w + 1)).floor().long().clamp(max=W - w)
        return cls.box((H, W), (h, w), top, left, channels=channels)


def _pair(name: str, value) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a pair of positive ints, got {value!r}") from None
    if a < 1 or b < 1 or (a, b) != tuple(value):
        raise ValueError(f"`{name}` must be a pair of positive ints, got {value!r}")
    return a, b


def _image_shape(name: str, value) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be (C, H, W), positive ints, got {value!r}") from None
    if len(shape) != 3 or min(shape) < 1 or shape != tuple(value):
        raise ValueError(f"`{name}` must be (C, H, W), positive ints, got {value!r}")
    return shape


class SuperResolution(LinearOperator):
    r"""Down-sampling by average pooling over ``factor x factor`` blocks (super-resolution).

    .. math:: (A x)_{c,i,j} = rac{1}{f^2} \sum_{a,b < f} x_{c, f i + a, f j + b}

    Its adjoint spreads each value over its block divided by :math:`f^2`, so
    :math:`A A^T = I / f^2` and :math:`A^+ = f^2 A^T` (nearest-neighbour upsampling).
    It has no per-sample parameters: batch shape ``()``, shared by any leading batch.

    Arguments:
        factor: The down-sampling factor ``f`` >= 1 (4 for the usual x4 task).
        image_shape: ``(C, H, W)`` of ``x``, ``H`` and ``W`` divisible by ``f``;
            ``A(x)`` has shape ``(C, H / f, W / f)``.

    Raises:
        ValueError: if ``factor`` < 1 or does not divide ``H`` and ``W``.

    References:
        Chung et al., "Diffusion Posterior Sampling", ICLR 2023 (SR x4 task);
        Rozet et al. 2024, Appendix E.
    """

    def __init__(self, factor: int, image_shape: Sequence[int]):
        if isinstance(factor, bool) or int(factor) != factor or factor < 1:
            raise ValueError(f"`factor` must be an integer >= 1, got {factor!r}")
        C, H, W = _image_shape("image_shape", image_shape)
        f = int(factor)
        if H % f or W % f:
            raise ValueError(f"`factor` {f} must divide the image height and width {(H, W)}")
        self.factor = f
        self.batch_shape = ()
        self.in_shape = (C, H, W)
        self.out_shape = (C, H // f, W // f)

    def _forward(self, x: Tensor) -> Tensor:
        f = self.factor
        C, h, w = self.out_shape
        return x.reshape(*x.shape[:-3], C, h, f, w, f).mean(dim=(-3, -1))

    def _upsample(self, y: Tensor) -> Tensor:
        f = self.factor
        return y.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._upsample(y) / self.factor**2

    def _pinv(self, y: Tensor) -> Tensor:
        return self._upsample(y)

    def __repr__(self) -> str:
        return f"SuperResolution(factor={self.factor}, image_shape={self.in_shape})"


def _periodic_gaussian(n: int, std: Tensor, images: int = 3) -> Tensor:
    """The Gaussian of ``std`` pixels sampled on Z_n and periodised, normalised to sum 1, ``(*std.shape, n)``."""
    i = torch.arange(n, dtype=std.dtype, device=std.device)
    shifts = n * torch.arange(-images, images + 1, dtype=std.dtype, device=std.device)
    d = i[:, None] - shifts  # (n, 2 images + 1)
    k = torch.exp(-0.5 * (d / std[..., None, None]) ** 2).sum(-1)
    return k / k.sum(-1, keepdim=True)


class GaussianBlur(LinearOperator):
    r"""Gaussian deblurring: circular convolution with a Gaussian kernel, through the FFT.

    .. math:: A x = F^{-1} (\hat k \odot F x)

    per channel, where :math:`k = k_H \otimes k_W` is the separable Gaussian of
    standard deviation ``std`` pixels, periodised on the ``H x W`` torus and
    normalised to sum 1. It is symmetric (:math:`k[-i] = k[i]`), so :math:`\hat k` is real,
    :math:`\hat k(0) = 1 = \max |\hat k|`, and :math:`A^T = A`; its singular values are
    :math:`|\hat k|`.

    **Pseudo-inverse, with a cutoff.** A Gaussian's spectrum decays like
    :math:`\exp(-2 \pi^2 s^2 
u^2)` and reaches round-off at high frequencies, so
    the exact :math:`A^+` would amplify noise there without bound. ``A.pinv`` is the
    truncated-SVD pseudo-inverse

    .. math:: A^+ y = F^{-1} ig( \hat k^{+} \odot F y ig), \quad
              \hat k^{+} = 1 / \hat k 	ext{ where } |\hat k| > 	ext{cutoff}, \; 0 	ext{ elsewhere},

    i.e. the exact pseudo-inverse of :math:`A` with the frequencies where
    :math:`|\hat k| \le` ``cutoff`` removed (as ``torch.linalg.pinv(A, atol=cutoff)``).
    :math:`A^+ A A^+ = A^+` holds exactly; :math:`A A^+ A = A` up to
    ``cutoff * ||x||``, and exactly when ``cutoff`` is below :math:`\min |\hat k|`
    (:meth:`spectrum`).

    Arguments:
        std: The kernel's standard deviation in pixels, > 0: a float or a tensor of
            shape ``()`` (one operator) or ``(B,)`` (one per sample).
        image_shape: ``(C, H, W)`` of ``x`` (and of ``A(x)``).
        cutoff: The spectral cutoff of ``pinv`` in [0, 1), relative to
            :math:`\hat k(0) = 1` (default 1e-3).

    Raises:
        ValueError: if ``std`` is not positive and finite or has more than one
            dimension, or ``cutoff`` is outside [0, 1).

    References:
        Chung et al., "Diffusion Posterior Sampling", ICLR 2023 (Gaussian deblurring task);
        Hansen, Nagy & O'Leary, "Deblurring Images", SIAM 2006 (spectral filtering, Ch. 5).
    """

    params = ("std",)

    def __init__(self, std: float | Tensor, image_shape: Sequence[int], cutoff: float = 1e-3):
        std = torch.as_tensor(std)
        if not std.is_floating_point():
            std = std.to(torch.get_default_dtype())
        if std.dim() > 1:
            raise ValueError(f"`std` must be a float or a tensor of shape (B,), got shape {tuple(std.shape)}")
        if not (torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"`std` must be positive and finite, got {std.tolist()}")
        try:
            cutoff = float(cutoff)
        except (TypeError, ValueError):
            raise ValueError(f"`cutoff` must be a float in [0, 1), got {cutoff!r}") from None
        if not (0 <= cutoff < 1):
            raise ValueError(f"`cutoff` must be a float in [0, 1), got {cutoff!r}")
        self.std = std
        self.cutoff = cutoff
        self.batch_shape = tuple(std.shape)
        self.in_shape = self.out_shape = _image_shape("image_shape", image_shape)

    def spectrum(self, dtype: torch.dtype = torch.float64) -> Tensor:
        r"""The real transfer function :math:`\hat k`, shape ``(*batch, H, W)`` (unshifted FFT order)."""
        _, H, W = self.in_shape
        std = self.std.to(dtype)
        kh = torch.fft.fft(_periodic_gaussian(H, std)).real
        kw = torch.fft.fft(_periodic_gaussian(W, std)).real
        return kh[..., :, None] * kw[..., None, :]

    def _filter(self, x: Tensor, transfer: Tensor) -> Tensor:
        return torch.fft.ifft2(torch.fft.fft2(x) * transfer[..., None, :, :]).real

    def _forward(self, x: Tensor) -> Tensor:
        return self._filter(x, self.spectrum(x.dtype))

    _adjoint = _forward

    def _pinv(self, y: Tensor) -> Tensor:
        k = self.spectrum(y.dtype)
        keep = k.abs() > self.cutoff
        inverse = torch.where(keep, 1 / torch.where(keep, k, torch.ones_like(k)), torch.zeros_like(k))
        return self._filter(y, inverse)



class Projection(LinearOperator):
    r"""Matrix–vector products :math:`A x` with a (per-sample) matrix.

    Arguments:
        matrix: A float tensor of shape ``(*batch, m, d)``, ``batch`` equal to ``()``
            or ``(B,)``. Acts on ``x`` of shape ``(*batch, d)``; ``A.T`` on ``(*batch, m)``.

    ``A.pinv`` is the per-sample Moore-Penrose pseudo-inverse of the matrix
    (:func:`torch.linalg.pinv`, computed in the dtype of ``y``, singular values
    below its default ``rtol`` = max(m, d) * eps treated as zero).

    Raises:
        ValueError: if ``matrix`` is not floating point, not 2-D or 3-D, or not finite.
    """

    params = ("matrix",)

    def __init__(self, matrix: Tensor):
        if not torch.is_tensor(matrix):
            raise TypeError(f"`matrix` must be a torch.Tensor, got {type(matrix).__name__}")
        if not matrix.is_floating_point():
            raise ValueError(f"`matrix` must be floating point, got {matrix.dtype}")
        if matrix.dim() not in (2, 3):
            raise ValueError(f"`matrix` must have shape (m, d) or (B, m, d), got {tuple(matrix.shape)}")
        check_finite("matrix", matrix)
        self.matrix = matrix
        self.batch_shape = tuple(matrix.shape[:-2])
        self.in_shape = (matrix.shape[-1],)
        self.out_shape = (matrix.shape[-2],)

    def _forward(self, x: Tensor) -> Tensor:
        return (self.matrix.to(x.dtype) @ x[..., None])[..., 0]

    def _adjoint(self, y: Tensor) -> Tensor:
        return (self.matrix.to(y.dtype).mT @ y[..., None])[..., 0]

    def _pinv(self, y: Tensor) -> Tensor:
        return (torch.linalg.pinv(self.matrix.to(y.dtype)) @ y[..., None])[..., 0]


class SubsampledFourier(LinearOperator):
    r"""Column-subsampled, orthonormal, centred 2-D Fourier transform (MRI k-space).

    .. math:: A x = M \, S F S' x

    where :math:`F` is the orthonormal 2-D DFT, :math:`S` / :math:`S'` the
    ``fftshift`` / ``ifftshift`` permutations and :math:`M` keeps the sampled
    k-space columns. The complex output is returned as two real channels
    (real, imaginary), so ``A`` maps a real image ``(*batch, 1, H, W)`` to
    ``(*batch, 2, H, W)``. The adjoint is the real part of the centred inverse
    DFT of the masked k-space.

    **Pseudo-inverse.** Write :math:`F_c = S F S'` and :math:`k = y_0 + i y_1`.
    In the centred indexing the DC column is :math:`c_0 = \lfloor W/2 \rfloor`
    and column :math:`v` mirrors to :math:`\bar v = (2 c_0 - v) \bmod W`
    (likewise for rows). Let :math:`(P k)[u, v] = \overline{k[\bar u, \bar v]}`,
    a real-linear, orthogonal and symmetric involution. Since
    :math:`\overline{F_c^H k} = F_c^H P k`,

    .. math:: A A^T k = M F_c \operatorname{Re}(F_c^H M k)
              = \tfrac12 (M k + M P M k).

    This splits over the sampled columns:

    * a column :math:`v` whose mirror :math:`\bar v` is sampled too (DC always, and
      the Nyquist column :math:`v = 0` at even ``W``, which are their own mirrors):
      :math:`A A^T = \tfrac12 (I + P)`, the orthogonal projection onto
      Hermitian-symmetric k-space, eigenvalues 1 and 0 (the anti-Hermitian part,
      e.g. the imaginary part at the self-mirrored points, is never produced by a
      real image);
    * a column whose mirror is not sampled: :math:`M P M = 0` there, so
      :math:`A A^T = \tfrac12 I`;
    * an unsampled column: 0.

    Hence :math:`(A A^T)^+ = \tfrac12(I + P) M_2 + 2 M_1` (:math:`M_2`, :math:`M_1`:
    the sampled columns with / without their mirror), and since
    :math:`A^T P k = A^T k` for ``k`` supported on :math:`M_2`,

    .. math:: A^+ y = A^T \big( (M_2 + 2 M_1) \, y \big),

    i.e. the zero-filled reconstruction with the k-space columns whose mirror is
    missing counted twice. :math:`A^+ \ne A^T` unless the mask is symmetric.

    **Consequence.** A real image's spectrum is conjugate-symmetric, so column
    :math:`v` also tells column :math:`\bar v`: the rank of ``A`` (real degrees of
    freedom observed) is :math:`H` per sampled self-mirrored column plus
    :math:`2H` per sampled pair :math:`\{v, \bar v\}` (whether one or both are
    sampled). With random columns the effective acceleration
    :math:`HW / \operatorname{rank} A` (:meth:`effective_acceleration`) is
    therefore milder than the nominal ``R`` = W / (sampled columns), by up
    to a factor 2.

    Arguments:
        mask: A boolean tensor of shape ``(*batch, W)``, ``batch`` equal to ``()``
            or ``(B,)``; ``True`` marks a sampled k-space column (centred indexing,
            DC at ``W // 2``; see :func:`column_mask`).
        height: The image height ``H`` (default: ``W``, square images).

    References:
        Zbontar et al., "fastMRI", arXiv:1811.08839; Rozet et al. 2024, Section 5.3.
    """

    params = ("mask",)

    def __init__(self, mask: Tensor, height: int | None = None):
        _check_mask("mask", mask, 1)
        self.mask = mask
        width = mask.shape[-1]
        self.height = int(width if height is None else height)
        self.batch_shape = tuple(mask.shape[:-1])
        self.in_shape = (1, self.height, width)
        self.out_shape = (2, self.height, width)

    def _forward(self, x: Tensor) -> Tensor:
        k = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x[..., 0, :, :], dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
        k = k * self.mask[..., None, :].to(x.dtype)
        return torch.stack((k.real, k.imag), dim=-3)

    def _adjoint(self, y: Tensor) -> Tensor:
        k = torch.complex(y[..., 0, :, :], y[..., 1, :, :]) * self.mask[..., None, :].to(y.dtype)
        x = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
        return x.real[..., None, :, :]

    def mirrored_mask(self) -> Tensor:
        r"""The mask of the mirror columns, ``(*batch, W)``: entry ``v`` is ``mask[(2 (W//2) - v) % W]``."""
        width = self.mask.shape[-1]
        mirror = (2 * (width // 2) - torch.arange(width, device=self.mask.device)) % width
        return self.mask[..., mirror]

    def _pinv(self, y: Tensor) -> Tensor:
        # A^+ y = A^T((M_2 + 2 M_1) y): weight 1 where the mirror column is sampled, 2 where not.
        weight = 2.0 - self.mirrored_mask().to(y.dtype)
        return self._adjoint(y * weight[..., None, None, :])

    def rank(self) -> Tensor:
        r"""The rank of ``A`` on real images, per sample, ``(*batch,)`` (int64).

        :math:`H` per sampled self-mirrored column (DC; Nyquist at even ``W``) plus
        :math:`2H` per distinct sampled pair :math:`\{v, \bar v\}`; see the class docstring.
        """
        m, mm = self.mask, self.mirrored_mask()
        width = m.shape[-1]
        mirror = (2 * (width // 2) - torch.arange(width, device=m.device)) % width
        self_mirrored = mirror == torch.arange(width, device=m.device)
        pairs = (m | mm) & ~self_mirrored  # each distinct pair {v, v̄} is counted at both v and v̄
        return self.height * ((m & self_mirrored).sum(-1) + pairs.sum(-1))

    def effective_acceleration(self) -> Tensor:
        r"""``H W / rank(A)`` per sample, ``(*batch,)``: the acceleration seen by a real image.

        Milder than the nominal ``W / mask.sum(-1)`` (down to half of it), because a
        real image's spectrum is conjugate-symmetric.
        """
        return self.height * self.mask.shape[-1] / self.rank().double()


def _column_mask_parameters(width: int, acceleration: float) -> tuple[int, float]:
    """Half the number of centre columns and the keep probability of the others."""
    if isinstance(width, bool) or int(width) != width or width < 2:
        raise ValueError(f"`width` must be an integer >= 2, got {width!r}")
    try:
        R = float(acceleration)
    except (TypeError, ValueError):
        raise TypeError(f"`acceleration` must be a number >= 1, got {acceleration!r}") from None
    if not (R >= 1 and math.isfinite(R)):
        raise ValueError(f"`acceleration` must be a finite number >= 1, got {acceleration!r}")
    width = int(width)
    # The authors' mask at width 320: ceil(60 / R) columns either side of DC, the others kept
    # with probability 200 / (320 R - 120); its expected kept fraction is
    half_320 = math.ceil(60 / R)
    p_320 = 200 / (320 * R - 120)
    fraction = (2 * half_320 + p_320 * (320 - 2 * half_320)) / 320  # = 1 / R when R divides 60
    if width == 320:
        return half_320, p_320
    # At another width: the centre scaled (ceil(60 W / (320 R)) either side, at least 1) and the
    # keep probability chosen so that the expected kept fraction is the same.
    half = min(math.ceil(60 * width / (320 * R)), width // 2)
    rest = width - 2 * half
    p = 0.0 if rest == 0 else min(max((fraction * width - 2 * half) / rest, 0.0), 1.0)
    return half, p


def column_mask_fraction(width: int, acceleration: float) -> float:
    """The expected fraction of columns that :func:`column_mask` keeps (about ``1 / acceleration``).

    Exactly the fraction of the authors' 320-wide mask, unless the centre alone
    (rounded up to whole columns) exceeds it at a small ``width``.
    """
    half, p = _column_mask_parameters(width, acceleration)
    return (2 * half + p * (width - 2 * half)) / width


def column_mask(
    width: int,
    acceleration: float,
    generator: torch.Generator,
    batch: int | Sequence[int] = (),
) -> Tensor:
    r"""The fastMRI random column mask for :class:`SubsampledFourier`, seeded and replayable.

    At ``width`` 320 this is the authors' mask (their ``make_mask``, after Jalal et
    al. 2021): the :math:`2 \lceil 60/R \rceil` centre columns
    ``[W//2 - c, W//2 + c)`` (DC at ``W // 2``, one more column below it than
    above), and every other column kept independently with probability
    :math:`200 / (320 R - 120)`; the expected kept fraction is :math:`1/R` when
    ``R`` divides 60 (e.g. 80 columns at R = 4), slightly more otherwise. At another
    width the centre is :math:`c = \lceil 60 W / (320 R) \rceil` either side and the
    probability is rescaled so that the expected kept fraction is the same as at
    320 (:func:`column_mask_fraction`). The authors drew from numpy's global RNG;
    here every draw comes from ``generator``, one row of ``width`` uniforms per
    sample in order, so sample ``i`` does not depend on the batch size.

    Arguments:
        width: The number of k-space columns ``W`` (>= 2).
        acceleration: The nominal acceleration ``R`` >= 1.
        generator: A seeded :class:`torch.Generator` (required); the mask is on its device.
        batch: The batch shape, an int ``B`` or a tuple (default ``()``: one mask).

    Returns:
        A boolean tensor of shape ``(*batch, width)``, ``True`` = sampled column.

    Raises:
        ValueError: if ``width`` < 2, ``acceleration`` < 1 or not finite, or ``generator`` is missing.

    References:
        Rozet et al. 2024, Section 5.3 and their ``experiments/fastmri/utils.py``;
        Jalal et al., "Robust Compressed Sensing MRI with Deep Generative Priors", 2021.
    """
    half, p = _column_mask_parameters(width, acceleration)
    if not isinstance(generator, torch.Generator):
        raise ValueError("`generator` is required: pass a seeded torch.Generator")
    batch = (int(batch),) if isinstance(batch, int) else tuple(int(b) for b in batch)
    u = torch.rand(*batch, int(width), generator=generator, device=generator.device, dtype=torch.float64)
    mask = u < p
    centre = int(width) // 2
    mask[..., centre - half : centre + half] = True
    return mask


def _check_noise_std(noise_std) -> float:
    try:
        value = float(noise_std)
    except (TypeError, ValueError):
        raise TypeError(f"`noise_std` must be a positive float, got {noise_std!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"`noise_std` must be a positive finite float, got {noise_std!r}")
    return value


class GaussianObservation:
    r"""The observation model :math:`y = A x + \sigma_y e`, :math:`e \sim \mathcal{N}(0, I)`.

    Arguments:
        operator: The linear operator :math:`A`.
        noise_std: :math:`\sigma_y > 0`, in data units (data in [-2, 2]).

    Raises:
        ValueError: if ``noise_std`` is not a positive finite number.
    """

    def __init__(self, operator: LinearOperator, noise_std: float):
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"`operator` must be a LinearOperator, got {type(operator).__name__}")
        self.operator = operator
        self.noise_std = _check_noise_std(noise_std)

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``y = A(x) + noise_std * e`` with an explicit ``generator``.

        Arguments:
            x: The clean signal, shape ``(*batch, *in_shape)``.
            generator: The source of randomness; required (pass a seeded generator).

        Returns:
            ``y`` of shape ``(*batch, *out_shape)``. Masked-out entries are noise too
            (``A x`` is zero there, and so is their contribution to the likelihood
            since ``A.T`` removes them).
        """
        if generator is None:
            raise ValueError("`generator` is required: pass a seeded torch.Generator")
        mean = self.operator(x)
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        return mean + self.noise_std * noise.to(mean.device)

    def __repr__(self):
        return f"GaussianObservation({self.operator!r}, noise_std={self.noise_std:g})"
