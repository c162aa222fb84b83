"""Collectives of work sharded over the processes of an ``accelerate.Accelerator``.

Within :func:`sharded_over`, code that can split its work (prior samples, Inception features)
asks :func:`sharding_accelerator` for the accelerator and shards over its processes; every
process then calls it with the same arguments. Collectives must pair up across processes, so
a gather of sharded work is preceded by a flag gather (:func:`all_ok`): a process whose work
failed answers it with ``False`` instead of leaving the others waiting until the group's
timeout, and they raise :class:`PeerFailure` (:func:`sharded_gather`).

With one process (or outside :func:`sharded_over`) nothing is gathered.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import Tensor

__all__ = ["sharded_over", "sharding_accelerator", "all_ok", "sharded_gather", "PeerFailure"]

_SHARDING: contextvars.ContextVar = contextvars.ContextVar("diffem_sharding", default=None)


@contextlib.contextmanager
def sharded_over(accelerator):
    """Within this context, :func:`diffem.tasks.draw_prior_samples` splits its samples over the processes of
    ``accelerator`` and gathers them (every process must then call it with the same arguments)."""
    token = _SHARDING.set(accelerator)
    try:
        yield
    finally:
        _SHARDING.reset(token)


def sharding_accelerator():
    """The accelerator of the innermost :func:`sharded_over`, or ``None`` outside one (no sharding)."""
    return _SHARDING.get()


class PeerFailure(RuntimeError):
    """Raised by :func:`sharded_gather` on every process when another process's sharded work failed."""


def all_ok(accelerator, ok: bool) -> bool:
    """Whether ``ok`` holds on every process of ``accelerator`` (one all-gather of a flag; none
    with one process)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return bool((accelerator.gather(flag) > 0).all())


def sharded_gather(accelerator, tensor: Tensor) -> Tensor:
    """Every process's ``tensor`` ``(m, ...)`` (same shape on each) as ``(P m, ...)`` on the CPU, in process order.

    Collectives must pair up across processes: a process whose sharded work raised before
    this gather must not leave the others waiting in it until the group's timeout. So the
    gather is preceded by :func:`all_ok` with ``True``; a process that failed calls
    ``all_ok(accelerator, False)`` instead (as :func:`diffem.em.evaluation.evaluate_lap`
    does), which pairs with that flag gather.

    Raises:
        PeerFailure: on every process that reached this gather, if another process failed.
    """
    if not all_ok(accelerator, True):
        raise PeerFailure("the sharded work failed on another process")
    return accelerator.gather(tensor.to(accelerator.device).contiguous()).cpu()
