r"""The M-step: denoising score matching on the E-step's posterior samples.

The backbone is fine-tuned from the previous lap's EMA weights (lap 1: a fresh network)
with a fresh Adam optimizer and a fresh EMA, for ``mstep_steps`` optimizer steps of a
global batch of ``mstep.batch_size`` samples split over the processes.

- Learning rate: :func:`learning_rate`, a linear decay from ``mstep.lr`` to ``mstep.lr_end``
  over the lap, set on the optimizer before every step. It is a function of the optimizer
  step alone and never goes through ``accelerate.prepare`` (which would step a prepared
  scheduler once per process), so one optimizer step is one schedule step on any number
  of processes.
- Randomness: see :mod:`diffem.em.seeds` (``MSTEP``): the global batch's indices,
  augmentation, noise levels and noise come from one generator per (lap, step), drawn
  alike on every process; process ``k`` of ``P`` trains on the ``k``-th of ``P`` equal
  slices. With gradients averaged over processes, an optimizer step therefore sees the same
  batch and the same gradient (to float round-off) on any number of processes. The one
  exception is dropout, the only draws torch modules take from the global RNG: it runs
  inside ``torch.random.fork_rng`` seeded per (lap, step, process), so its masks depend on
  the process count (networks without dropout train identically), and the caller's
  global RNG is left untouched.
- ``train_on: ambient``: the samples are observations and masks stacked on the channels
  (:meth:`~diffem.tasks.Task.training_signals`), augmented together; each step hides a further
  fraction ``mstep.ambient_delta`` of every sample's observed pixels (drawn after the noise, from
  the same generator) and trains with :class:`~diffem.denoiser.AmbientLoss`.
- Precision: the objective is prepared by the accelerator, so its forward pass runs
  under the run's ``precision`` (autocast); weights, optimizer and EMA stay float32.
- A non-finite loss or gradient norm stops the lap with :class:`NonFiniteLossError`
  naming the step, the lap and the last good checkpoint, which is kept. It is read every
  ``kernels.check_every`` steps (one host-device sync) and always before a checkpoint and at
  the end, so nothing non-finite is ever saved; at 1 (the default) a non-finite step is
  caught before it reaches the weights.
- Kernels (:mod:`diffem.kernels`): ``kernels.tf32``, ``channels_last``, ``compile`` (of the
  denoiser's forward; the backbone itself is trained and saved), ``fused_adam`` and ``foreach_ema``.

References:
    Rozet et al. 2024, arXiv:2405.13712, Algorithm 1 (M-step) and Appendix C.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..config import EMConfig, MStepConfig
from ..denoiser import AmbientLoss, Denoiser, DenoisingLoss
from ..kernels import compiled, prepare_network, set_matmul_precision
from ..random import derive_seed
from .checkpoint import MStepCheckpoint
from .seeds import MSTEP

__all__ = ["NonFiniteLossError", "mstep_steps", "learning_rate", "check_batch_split", "run_mstep"]


class NonFiniteLossError(RuntimeError):
    """The M-step's loss (or gradient norm) became NaN or infinite; the lap stops.

    Attributes: ``lap``, ``step`` (the optimizer step, 1-based, whose loss was not finite) and
    ``checkpoint`` (the last good checkpoint folder, kept, or None).
    """

    def __init__(self, lap: int, step: int, what: str, checkpoint: Path | None, previous: Path):
        self.lap, self.step, self.checkpoint = lap, step, checkpoint
        where = (f"the last good checkpoint is {checkpoint} (kept; rerunning resumes from it)" if checkpoint
                 else f"no M-step checkpoint was saved yet; the last good state is the prior of {previous}")
        super().__init__(
            f"non-finite M-step {what} at step {step} of lap {lap}: the lap is stopped and nothing of it is saved; "
            f"{where}. Lower `mstep.lr`, set `mstep.grad_clip`, or check `precision`."
        )


def mstep_steps(cfg: MStepConfig, n: int) -> int:
    """Optimizer steps of a lap on ``n`` samples: ``ceil(epochs * n / batch_size)`` if ``epochs > 0``, else ``steps``."""
    return math.ceil(cfg.epochs * n / cfg.batch_size) if cfg.epochs > 0 else cfg.steps


def learning_rate(cfg: MStepConfig, step: int, total: int) -> float:
    r"""The learning rate of optimizer step ``step`` (0-based) of ``total``:
    :math:`\eta_0 + (\eta_1 - \eta_0) \min(s / T, 1)` with ``lr`` and ``lr_end`` (constant if None)."""
    end = cfg.lr if cfg.lr_end is None else cfg.lr_end
    return cfg.lr + (end - cfg.lr) * min(step / max(total, 1), 1.0)


def check_batch_split(cfg: MStepConfig, num_processes: int) -> None:
    """Check that ``mstep.batch_size`` splits into equal per-process slices.

    Raises:
        ValueError: if ``cfg.batch_size`` is not a multiple of ``num_processes``.
    """
    if cfg.batch_size % num_processes:
        raise ValueError(f"`mstep.batch_size` ({cfg.batch_size}) must be a multiple of the number of processes "
                         f"({num_processes}): each process trains on an equal slice of the global batch")


def run_mstep(accelerator, config: EMConfig, task, lap: int, samples: torch.Tensor, backbone: torch.nn.Module,
              folder: Path, previous: Path, progress: bool = False) -> tuple[torch.nn.Module, dict]:
    """Train ``backbone`` on ``samples`` ``(n, *event_shape)``; returns the EMA weights and statistics.

    Arguments:
        accelerator: The run's ``Accelerator``.
        config: The run's configuration (``mstep``, ``seed``).
        task: The experiment (its ``augment``).
        lap: The lap (>= 1).
        samples: The E-step's kept posterior samples.
        backbone: The network to fine-tune (float32).
        folder: The lap's M-step checkpoint folder (resumed from if it holds one).
        previous: The previous lap's folder (named in errors).

    Returns:
        ``(model, stats)``: the backbone holding the EMA weights, in eval mode; ``stats`` has
        ``mstep_steps``, ``train_loss`` (mean of the last tenth of the logged losses) and
        ``lr_log`` (``[step, learning rate]`` at each logged step).

    Raises:
        NonFiniteLossError: on a NaN / infinite loss or gradient norm (the checkpoint is kept).
        ValueError: if ``mstep.batch_size`` is not a multiple of the number of processes.
    """
    acc, cfg = accelerator, config.mstep
    n = len(samples)
    check_batch_split(cfg, acc.num_processes)
    per_process = cfg.batch_size // acc.num_processes
    lo = acc.process_index * per_process
    local = slice(lo, lo + per_process)
    kernels = config.kernels
    set_matmul_precision(kernels)
    backbone = prepare_network(backbone, kernels)
    backbone.train()
    ambient = config.train_on == "ambient"
    network = compiled(backbone, kernels)  # shares backbone's parameters: backbone is trained and saved
    objective = AmbientLoss(Denoiser(network)) if ambient else DenoisingLoss(Denoiser(network))
    optimizer = torch.optim.Adam(backbone.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 **({"fused": True} if kernels.fused_adam else {}))
    total = mstep_steps(cfg, n)
    ema = EMAModel(backbone.parameters(), decay=cfg.ema_decay, foreach=kernels.foreach_ema)
    objective, optimizer = acc.prepare(objective, optimizer)
    checkpoint = MStepCheckpoint(folder, acc)
    step, log = checkpoint.load(ema)
    ema.to(acc.device)  # after the load: a resumed EMA must sit on this process's device
    samples = samples.to(acc.device)
    rng_devices = [acc.device] if acc.device.type == "cuda" else []

    bar = tqdm(total=total, initial=step, desc=f"lap {lap} M-step", disable=not progress)
    running, pending = [], []

    def check(pending: list) -> None:
        """Raise on the first non-finite loss or gradient norm among the pending steps (then forget them)."""
        values = torch.stack([g for _, g in pending])  # (k, P, 1 or 2)
        if not bool(torch.isfinite(values).all()):
            k = int((~torch.isfinite(values)).flatten(1).any(1).nonzero()[0])
            bad_step, bad = pending[k]
            what = "loss" if not bool(torch.isfinite(bad[:, 0]).all()) else "gradient norm"
            bar.close()
            raise NonFiniteLossError(lap, bad_step, what, checkpoint.last(), previous)
        pending.clear()

    while step < total:
        # The global batch's draws, alike on every process (the trailing 0 keeps the draws of
        # runs made when this generator was seeded per process: 1-process runs are unchanged).
        g = torch.Generator().manual_seed(derive_seed(config.seed, MSTEP, lap, step, 0))
        lr = learning_rate(cfg, step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(derive_seed(config.seed, MSTEP, lap, step, acc.process_index, 1))  # dropout only
            idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
            x = task.augment(samples[idx.to(samples.device)], g)
            if ambient:  # (y, mask) stacked on the channels; the further corruption drawn per pixel
                c = x.shape[1] // 2
                y, mask = x[:, :c], x[:, c:]
                sigma, z = Denoiser.draw_noise(y, g)
                keep = (torch.rand((len(y), 1, *y.shape[2:]), generator=g) >= cfg.ambient_delta).to(y.device, y.dtype)
                loss = objective(y[local], mask[local], (mask * keep)[local], sigma[local], z[local])
            else:
                sigma, z = Denoiser.draw_noise(x, g)
                loss = objective(x[local], sigma=sigma[local], noise=z[local])
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
        norm = acc.clip_grad_norm_(objective.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        local_checks = [loss.detach().float().reshape(1)]
        if norm is not None:
            local_checks.append(torch.as_tensor(norm).float().reshape(1).to(acc.device))
        gathered = acc.gather(torch.cat(local_checks)).reshape(acc.num_processes, -1)  # one collective a step
        pending.append((step + 1, gathered))
        if kernels.check_every == 1:  # read now, before the step: a non-finite step never reaches the weights
            check(pending)
        optimizer.step()
        ema.step(backbone.parameters())
        step += 1
        running.append(gathered[:, 0].mean())  # (P,) losses: the global batch's loss is their mean
        bar.update(1)
        save = step % cfg.checkpoint_every == 0 and step < total
        if pending and (step % kernels.check_every == 0 or step == total or save):
            check(pending)  # one host-device sync for the steps since the last check, before anything is saved
        if step % cfg.log_every == 0 or step == total:
            log.append([step, sum(float(v) for v in running) / len(running), lr])
            bar.set_postfix(loss=f"{log[-1][1]:.4f}")
            running = []
        if save:
            checkpoint.save(step, log, ema)
    bar.close()
    model = backbone
    ema.copy_to(model.parameters())
    model.eval()
    tail = [entry[1] for entry in log[-max(1, len(log) // 10):]]
    stats = {"mstep_steps": total, "train_loss": sum(tail) / max(len(tail), 1),
             "lr_log": [[entry[0], entry[2]] for entry in log if len(entry) > 2]}
    acc.free_memory()
    return model, stats
