"""Stream tags of the seeds derived from ``(config.seed, tag, ...)`` (:func:`diffem.random.derive_seed`).

Every random draw of a run comes from a generator seeded with one of these streams:

- ``LAP0``: the lap-0 Gaussian EM's sampling E-steps;
- ``ESTEP``: ``(ESTEP, lap, block)``, the E-step's noise per block of observations;
- ``MSTEP``: ``(MSTEP, lap, step, 0)``, the M-step's global batch (indices, augmentation,
  noise levels and noise), drawn alike on every process, each of which trains on its slice;
  ``(MSTEP, lap, step, process, 1)`` seeds the global RNG inside ``torch.random.fork_rng``
  for the backbone's dropout (the only draws that torch modules take from the global RNG,
  and the only M-step draws that depend on the process count), restored afterwards;
- ``INIT``: the lap-1 network's initial weights;
- ``EVAL``: ``(EVAL, sample)``, the evaluation's prior samples (one generator per sample).
"""

LAP0, ESTEP, MSTEP, INIT, EVAL = 0, 1, 2, 3, 4

__all__ = ["LAP0", "ESTEP", "MSTEP", "INIT", "EVAL"]
