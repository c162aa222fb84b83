r"""The operator protocol: :class:`LinearOperator`, :class:`FunctionOperator`, :class:`Identity`,
the Gaussian observation model :class:`GaussianObservation`, and the argument checks shared by
the operators.

Batching rule (every operator): parameters carry a batch shape ``()`` (one operator, shared by
any leading shape of ``x``) or ``(B,)`` (one operator per sample: ``x`` must have exactly ``B``
samples); nothing else is broadcast, and a mismatch raises a :class:`ValueError` naming the
argument. ``A(x)`` is the forward map, ``A.T(y)`` its adjoint for the real Euclidean inner
products (:math:`\langle A x, y \rangle = \langle x, A^T y \rangle`), ``A.pinv(y)`` the
Moore-Penrose pseudo-inverse :math:`A^+ = A^T (A A^T)^+` where ``A.has_pinv``.

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
    "GaussianObservation",
    "check_finite",
    "check_batch",
    "check_mask",
    "check_noise_std",
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


class Scaled(LinearOperator):
    r"""An operator scaled by one positive number per observation: :math:`A'_i = w_i A_i`.

    Its use is whitening heteroscedastic observations (:func:`diffem.observations.whiten`):
    :math:`y_i = A_i x + \sigma_i e` is the same likelihood as
    :math:`w_i y_i = w_i A_i x + \sigma_0 e` with :math:`w_i = \sigma_0 / \sigma_i`, so one
    :math:`\sigma_0` serves every observation. Adjoint :math:`A'^T_i = w_i A_i^T`; pseudo-inverse
    :math:`A'^+_i = A_i^+ / w_i` (exact since :math:`w_i` is a scalar), when ``operator`` has one.

    Arguments:
        operator: The operator :math:`A`, batch shape ``(B,)`` or ``()`` (shared).
        scale: :math:`w`, shape ``(B,)`` (or ``()`` for one scale), finite and > 0.

    Raises:
        TypeError: if ``operator`` is not a :class:`LinearOperator` or ``scale`` not a float tensor.
        ValueError: if ``scale`` is not finite and positive, or its batch disagrees with ``operator``'s.
    """

    def __init__(self, operator: LinearOperator, scale: Tensor):
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"`operator` must be a LinearOperator, got {type(operator).__name__}")
        if not torch.is_tensor(scale) or not scale.is_floating_point():
            raise TypeError(f"`scale` must be a floating-point tensor, got {type(scale).__name__}")
        if scale.dim() > 1:
            raise ValueError(f"`scale` must have shape (B,) or (), got {tuple(scale.shape)}")
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError("`scale` must be finite and > 0")
        batch = tuple(scale.shape)
        if tuple(operator.batch_shape) not in ((), batch):
            raise ValueError(f"`scale` has batch shape {batch}, the operator {tuple(operator.batch_shape)}")
        self.operator, self.scale, self.batch_shape = operator, scale, batch
        self.in_shape, self.out_shape = operator.in_shape, operator.out_shape

    def _weight(self, t: Tensor) -> Tensor:
        return self.scale.to(t.dtype).reshape(*self.scale.shape, *([1] * (t.dim() - self.scale.dim())))

    def _forward(self, x: Tensor) -> Tensor:
        y = self.operator(x)
        return self._weight(y) * y

    def _adjoint(self, y: Tensor) -> Tensor:
        return self.operator.T(self._weight(y) * y)

    def _pinv(self, y: Tensor) -> Tensor:
        return self.operator.pinv(y / self._weight(y))

    @property
    def has_pinv(self) -> bool:
        return self.operator.has_pinv

    def parameters(self) -> dict[str, Tensor]:
        """``scale`` and the inner operator's parameters (prefixed ``operator.``)."""
        return {"scale": self.scale} | {f"operator.{k}": v for k, v in self.operator.parameters().items()}

    def __getitem__(self, index) -> "Scaled":
        if self.scale.dim() == 0:  # shared by every sample, like any () operator
            return self
        return Scaled(self.operator[index], self.scale[index])

    def to(self, *args, **kwargs) -> "Scaled":
        return Scaled(self.operator.to(*args, **kwargs), self.scale.to(*args, **kwargs))

    def __repr__(self) -> str:
        return f"Scaled({self.operator!r}, scale of shape {tuple(self.scale.shape)})"


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


def check_mask(name: str, mask: Tensor, min_dim: int) -> None:
    """Raise unless ``mask`` is a boolean tensor with ``min_dim`` (unbatched) or ``min_dim + 1``
    (batched) dimensions that observes something in every sample.

    Raises:
        TypeError: if ``mask`` is not a tensor.
        ValueError: naming ``name``, for another dtype, another number of dimensions, or a sample
            whose mask is all ``False``.
    """
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


def check_noise_std(noise_std) -> float:
    """``noise_std`` as a float: :math:`\\sigma_y`, positive and finite (data units).

    Raises:
        TypeError: if it is not a number.
        ValueError: if it is not positive and finite.
    """
    try:
        value = float(noise_std)
    except (TypeError, ValueError):
        raise TypeError(f"`noise_std` must be a positive float, got {noise_std!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"`noise_std` must be a positive finite float, got {noise_std!r}")
    return value


#: The former private name of :func:`check_noise_std` (still imported by some modules).
_check_noise_std = check_noise_std


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
        self.noise_std = check_noise_std(noise_std)

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
