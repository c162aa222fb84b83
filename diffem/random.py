"""Explicit, replayable randomness.

Every random draw in diffem comes from a seeded ``torch.Generator``. To make
results independent of batch size and of the number of processes, a batch can
be given a *list* of generators, one per block of consecutive samples (a block
is one sample in the pipeline; a fixed number of observations in the EM
E-step): block ``j`` always draws its noise from its own generator, whatever
batch it lands in. Seeds are derived from integer keys such as
``(run seed, lap, block index)`` with NumPy's ``SeedSequence`` (never Python's
salted ``hash()``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["derive_seed", "make_generators", "randn"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer ``keys`` (well mixed, platform independent)."""
    for k in keys:
        if int(k) != k or k < 0:
            raise ValueError(f"seed keys must be non-negative integers, got {keys!r}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def make_generators(*keys: int, indices: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per index, seeded with ``derive_seed(*keys, index)``."""
    return [torch.Generator(device).manual_seed(derive_seed(*keys, int(i))) for i in indices]


def randn(shape: Sequence[int], generator, dtype=torch.float32, device=None) -> Tensor:
    """Standard normal noise of ``shape`` ``(B, ...)`` from one generator or a list of them.

    Arguments:
        shape: The output shape; ``shape[0]`` is the batch size ``B``.
        generator: A ``torch.Generator``, or a list of ``G`` generators with ``B % G == 0``:
            generator ``j`` fills the block of samples ``[j * B/G, (j+1) * B/G)``.
        dtype, device: Of the output.

    Raises:
        ValueError: if ``generator`` is None, or a list whose length does not divide ``B``.
    """
    shape = tuple(shape)
    if generator is None:
        raise ValueError("`generator` is required: pass a seeded torch.Generator (or a list of them)")
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    generators = list(generator)
    if not generators or shape[0] % len(generators):
        raise ValueError(
            f"`generator` is a list of {len(generators)} generators, which must divide the batch size {shape[0]}"
        )
    block = shape[0] // len(generators)
    parts = [torch.randn((block, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generators]
    if len({p.device for p in parts}) == 1:
        return torch.cat(parts).to(device)  # one copy to `device`, not one per generator
    return torch.cat([p.to(device) for p in parts])
