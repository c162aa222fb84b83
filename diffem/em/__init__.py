r"""Expectation-maximization for diffusion priors, on accelerate.

Given observations :math:`y_i = A_i x_i + e_i` only, each lap :math:`k` updates the prior

.. math:: \theta_{k+1} = \arg\max_\theta \; \frac{1}{N}\sum_i
   \mathbb{E}_{q_{\theta_k}(x \mid y_i)} \big[\log q_\theta(x)\big]

in two steps: the **E-step** draws one posterior sample per observation under the
lap :math:`k-1` prior with MMPS; the **M-step** trains the diffusion model on those
samples by denoising score matching, fine-tuned from the previous lap's EMA weights with
a fresh optimizer and a fresh EMA (lap 1 starts from a freshly initialised network).
Lap 0 is a Gaussian prior fitted to the observations by EM.

The phases, each short and testable alone:

- :mod:`diffem.em.lap0`: the lap-0 Gaussian EM (:func:`fit_gaussian_em`, :func:`run_lap0`);
- :mod:`diffem.em.estep`: posterior samples sharded over processes, saved in chunks;
- :mod:`diffem.em.mstep`: training, learning-rate schedule, non-finite guard;
- :mod:`diffem.em.evaluation`: the experiment's metric, shared by every process, after the save;
- :mod:`diffem.em.checkpoint`: lap folders, M-step checkpoints, lap records, resume checks
  (its docstring shows the run folder's layout);
- :mod:`diffem.em.seeds`: the seed streams of every random draw;
- :mod:`diffem.em.trainer`: :class:`EMTrainer`, the driver, and :func:`run_em`.

Resume: rerunning the same command continues from the last complete unit of work
(a finished lap, an E-step chunk, an M-step checkpoint); since every random draw is
derived from ``(seed, stream, lap, index)``, a resumed run ends with the same prior as an
uninterrupted one. A resumed run may change ``laps`` and ``eval.*``, nothing else.

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", NeurIPS 2024, arXiv:2405.13712, Algorithm 1.
"""

from .checkpoint import lap_dir
from .lap0 import fit_gaussian_em
from .mstep import NonFiniteLossError
from .trainer import EMTrainer, describe_hardware, make_accelerator, run_em

__all__ = ["EMTrainer", "run_em", "lap_dir", "describe_hardware", "make_accelerator", "fit_gaussian_em",
           "NonFiniteLossError"]
