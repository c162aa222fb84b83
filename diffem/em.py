r"""Expectation-maximization for diffusion priors, on accelerate.

Given observations :math:`y_i = A_i x_i + e_i` only, each lap :math:`k` updates the prior

.. math:: \theta_{k+1} = \arg\max_\theta \; \frac{1}{N}\sum_i
   \mathbb{E}_{q_{\theta_k}(x \mid y_i)} \big[\log q_\theta(x)\big]

in two steps: the **E-step** draws one posterior sample per observation under the
lap :math:`k-1` prior with MMPS (:func:`diffem.sampling.sample_posterior`); the
**M-step** trains the diffusion model on those samples by denoising score matching,
fine-tuned from the previous lap's EMA weights with a fresh optimizer and a fresh
EMA (lap 1 starts from a freshly initialised network). Lap 0 is a Gaussian prior
fitted to the observations by EM (:func:`diffem.gaussian.fit_gaussian_em`).

Run layout (``config.run_dir``)::

    config.yaml           the resolved configuration
    observations/         the observation set (y and operator parameters; no x)
    metrics.jsonl         one JSON line per finished lap
    lap_KK/               the prior after lap KK, a DiffusionPriorPipeline (EMA weights)
    work/lap_KK/estep/    E-step chunks (removed once the lap is saved)
    work/lap_KK/mstep/    the last M-step checkpoint (removed once the lap is saved)

Resume: rerunning the same command continues from the last complete unit of work
(a finished lap, an E-step chunk, an M-step checkpoint); since every random draw is
derived from ``(seed, lap, index)``, a resumed run ends with the same prior as an
uninterrupted one. E-step chunks are sharded over processes; each block of
``estep.block`` observations draws its noise from its own generator, so samples do
not depend on the batch size nor on the number of processes.

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", NeurIPS 2024, arXiv:2405.13712, Algorithm 1.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .config import EMConfig, config_to_dict
from .denoiser import Denoiser, DenoisingLoss
from .gaussian import GaussianPrior, fit_gaussian_em
from .pipeline import DiffusionPriorPipeline, denoiser_of
from .random import derive_seed, make_generators
from .sampling import sample_posterior
from .scheduler import VEScheduler
from .tasks import ObservationSet, Task, get_task

__all__ = ["EMTrainer", "run_em", "lap_dir"]

logger = get_logger(__name__)

# Stream tags of derived seeds.
_LAP0, _ESTEP, _MSTEP, _INIT, _EVAL = 0, 1, 2, 3, 4


def lap_dir(run_dir: Path, lap: int) -> Path:
    """The pipeline folder of a lap: ``run_dir/lap_KK``."""
    return Path(run_dir) / f"lap_{lap:02d}"


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _is_complete(folder: Path) -> bool:
    return (folder / "model_index.json").exists()


def describe_hardware(num_processes: int = 1) -> str:
    """One line naming the machine a run is measured on, stored in every lap's record.

    Wall times are only comparable on the same hardware: U-Net training steps were seen
    to take 2-3x longer on one 2-core "AMD EPYC" host than on another of the same name, so
    the CPU line also names the instruction set PyTorch dispatches to
    (``torch.backends.cpu.get_cpu_capability``, e.g. AVX2 or AVX512).

    Args:
        num_processes: processes of the run (``accelerate launch --num_processes``).

    Returns:
        e.g. ``"1 process(es) on 4 x NVIDIA H100 80GB HBM3"`` or
        ``"1 process(es) on CPU only: AMD EPYC, 2 cores, AVX2, 2 torch threads"``.
    """
    if torch.cuda.is_available():
        machine = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        model = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        machine = (f"CPU only: {model}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, "
                   f"{torch.get_num_threads()} torch threads")
    return f"{num_processes} process(es) on {machine}"


class EMTrainer:
    """Runs the laps of one configured experiment; see the module docstring.

    Arguments:
        config: A validated :class:`EMConfig`.
        accelerator: An ``accelerate.Accelerator`` (default: a new one).
        progress: Show progress bars (main process only).
    """

    def __init__(self, config: EMConfig, accelerator: Accelerator | None = None, progress: bool = True):
        self.config = config
        self.task: Task = get_task(config)
        self.accelerator = accelerator or Accelerator()
        self.progress = progress and self.accelerator.is_main_process
        self.run_dir = config.run_dir
        self.work_dir = self.run_dir / "work"

    # -- bookkeeping ---------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resolved = yaml.safe_dump(config_to_dict(self.config), sort_keys=False)
            path = self.run_dir / "config.yaml"
            if path.exists() and path.read_text() != resolved:
                old = yaml.safe_load(path.read_text())
                new = config_to_dict(self.config)
                # Laps may be extended; anything else must match to resume.
                old.pop("laps", None), new.pop("laps", None)
                if old != new:
                    raise ValueError(
                        f"{path} holds a different configuration; resume with the same settings "
                        "or choose another `output_dir`"
                    )
            path.write_text(resolved)
        acc.wait_for_everyone()

    def _log_metrics(self, record: dict) -> None:
        record.setdefault("hardware", describe_hardware(self.accelerator.num_processes))
        if self.accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        logger.info(json.dumps(record), main_process_only=True)

    def laps_done(self) -> list[int]:
        """Laps whose pipeline folder is complete."""
        return [k for k in range(self.config.laps + 1) if _is_complete(lap_dir(self.run_dir, k))]

    def observations(self) -> ObservationSet:
        acc = self.accelerator
        if acc.is_main_process:
            self.task.observations(self.run_dir)
        acc.wait_for_everyone()
        return self.task.observations(self.run_dir)

    def _save_lap(self, lap: int, unet) -> None:
        if self.accelerator.is_main_process:
            final = lap_dir(self.run_dir, lap)
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            DiffusionPriorPipeline(unet, VEScheduler(method=self.config.eval.method)).save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.accelerator.wait_for_everyone()

    def load_lap(self, lap: int) -> DiffusionPriorPipeline:
        """The saved prior of a finished lap."""
        folder = lap_dir(self.run_dir, lap)
        if not _is_complete(folder):
            raise FileNotFoundError(f"lap {lap} has no saved prior at {folder}")
        return DiffusionPriorPipeline.from_pretrained(folder).to(self.accelerator.device)

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Run (or resume) every lap; returns the metric records written."""
        self._prepare_run_dir()
        obs = self.observations()
        # Decided once, after a barrier, so that every process runs the same laps (and the
        # same sequence of barriers).
        done = set(self.laps_done())
        self.accelerator.wait_for_everyone()
        records = []
        for lap in range(self.config.laps + 1):
            if lap in done:
                continue
            records.append(self.lap0(obs) if lap == 0 else self.lap(lap, obs))
        return records

    def _evaluate(self, lap: int, unet) -> dict:
        cfg = self.config
        last = lap == cfg.laps
        scheduled = (lap & (lap - 1) == 0) if cfg.eval.powers_of_two else lap % cfg.eval.every == 0
        if cfg.eval.samples == 0 or not (lap == 0 or last or scheduled):
            return {}
        if not self.accelerator.is_main_process:
            return {}
        pipe = DiffusionPriorPipeline(unet, VEScheduler(method=cfg.eval.method)).to(self.accelerator.device)
        start = time.perf_counter()
        metrics = self.task.evaluate(pipe, lap, derive_seed(cfg.seed, _EVAL), progress=self.progress)
        metrics["eval_time_s"] = time.perf_counter() - start
        artifacts = getattr(self.task, "artifacts", None)
        if artifacts is not None:  # small tensors for figures (samples of this lap)
            (self.run_dir / "eval").mkdir(exist_ok=True)
            _atomic_torch_save(artifacts, self.run_dir / "eval" / f"lap_{lap:02d}.pt")
        return metrics

    def lap0(self, obs: ObservationSet) -> dict:
        """Fit the Gaussian prior to (the first ``lap0.observations``) observations by EM."""
        cfg = self.config.lap0
        start = time.perf_counter()
        n = min(cfg.observations, len(obs))
        sub = obs[:n]
        d = math.prod(obs.event_shape)
        rank = min(cfg.rank, d)
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, _LAP0))
        prior = fit_gaussian_em(
            sub.y.to(self.accelerator.device), sub.operator.to(self.accelerator.device), obs.noise_std, rank,
            cfg.iterations, obs.event_shape, estep=cfg.estep, generator=generator, sampler_steps=cfg.steps,
            maxiter=cfg.maxiter, batch_size=self.config.estep.batch_size, progress=self.progress,
        )
        prior = GaussianPrior.from_parameters(
            prior.mean.float(), prior.factor.float(), prior.diag.float(), prior.event_shape
        )
        fit_time = time.perf_counter() - start
        metrics = self._evaluate(0, prior)
        self._save_lap(0, prior)
        record = {"lap": 0, "estep_time_s": fit_time, "mstep_time_s": 0.0, "observations": n} | metrics
        self._log_metrics(record)
        return record

    # -- E-step ----------------------------------------------------------------------------------
    def estep(self, lap: int, obs: ObservationSet) -> torch.Tensor:
        """One posterior sample per observation under the lap ``lap - 1`` prior, ``(N, *event_shape)``.

        Chunks of ``estep.batch_size`` observations are sharded over processes
        (chunk ``c`` on process ``c % P``) and saved as they finish; existing chunks are
        reused on resume.
        """
        acc, cfg = self.accelerator, self.config.estep
        folder = self.work_dir / f"lap_{lap:02d}" / "estep"
        if acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        n = len(obs)
        chunks = list(range(math.ceil(n / cfg.batch_size)))
        mine = [c for c in chunks if c % acc.num_processes == acc.process_index]
        todo = [c for c in mine if not (folder / f"chunk_{c:05d}.pt").exists()]
        if todo:
            prior = self.load_lap(lap - 1)
            denoiser = denoiser_of(prior.unet)
            denoiser.eval()
            for c in tqdm(todo, desc=f"lap {lap} E-step", disable=not self.progress):
                i, j = c * cfg.batch_size, min((c + 1) * cfg.batch_size, n)
                first, last = i // cfg.block, math.ceil(j / cfg.block)
                # Blocks are aligned with chunks (batch_size % block == 0); a short last block is
                # padded by drawing its full block of noise from its own generator and slicing.
                gens = make_generators(self.config.seed, _ESTEP, lap, indices=range(first, last))
                x = self._sample_chunk(denoiser, obs[i:j], gens, (last - first) * cfg.block)
                _atomic_torch_save(x.cpu(), folder / f"chunk_{c:05d}.pt")
        acc.wait_for_everyone()
        return torch.cat([torch.load(folder / f"chunk_{c:05d}.pt") for c in chunks])

    def _sample_chunk(self, denoiser, obs: ObservationSet, gens, padded: int) -> torch.Tensor:
        cfg = self.config.estep
        m = len(obs)
        if padded != m:  # pad the last, partial block by repeating its last observation
            idx = torch.cat([torch.arange(m), torch.full((padded - m,), m - 1)])
            obs = obs[idx]
        device = self.accelerator.device
        scheduler_kwargs = dict(method=cfg.method)
        x = sample_posterior(
            denoiser, obs.y.to(device), obs.operator.to(device), obs.noise_std, obs.event_shape,
            steps=cfg.steps, maxiter=cfg.maxiter, generator=gens, batch_size=padded, tol=cfg.tol,
            device=device, **scheduler_kwargs,
        )
        return x[:m]

    # -- M-step ----------------------------------------------------------------------------------
    def mstep_steps(self, n: int) -> int:
        cfg = self.config.mstep
        return math.ceil(cfg.epochs * n / cfg.batch_size) if cfg.epochs > 0 else cfg.steps

    def mstep(self, lap: int, samples: torch.Tensor) -> tuple[torch.nn.Module, dict]:
        """Train on the posterior samples; returns the EMA backbone and training statistics."""
        acc, cfg = self.accelerator, self.config.mstep
        folder = self.work_dir / f"lap_{lap:02d}" / "mstep"
        seed = self.config.seed
        if lap == 1:
            backbone = self.task.backbone(derive_seed(seed, _INIT))
        else:
            backbone = self.load_lap(lap - 1).unet
        backbone.train()
        objective = DenoisingLoss(Denoiser(backbone))
        optimizer = torch.optim.Adam(backbone.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = self.mstep_steps(len(samples))
        lr_end = cfg.lr if cfg.lr_end is None else cfg.lr_end
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 1 + (lr_end / cfg.lr - 1) * min(s / max(total, 1), 1.0)
        )
        ema = EMAModel(backbone.parameters(), decay=cfg.ema_decay)
        objective, optimizer, schedule = acc.prepare(objective, optimizer, schedule)
        ema.to(acc.device)

        step, losses = 0, []
        state_file = folder / "state.json"
        if state_file.exists():
            saved = json.loads(state_file.read_text())
            acc.load_state(str(folder / saved["checkpoint"]))
            ema.load_state_dict(torch.load(folder / saved["checkpoint"] / "ema.pt", weights_only=False))
            step, losses = saved["step"], saved["losses"]

        samples = samples.to(acc.device)
        n = len(samples)
        per_process = cfg.batch_size // acc.num_processes
        if per_process < 1:
            raise ValueError(f"`mstep.batch_size` ({cfg.batch_size}) is smaller than the number of processes")
        bar = tqdm(total=total, initial=step, desc=f"lap {lap} M-step", disable=not self.progress)
        running = []
        while step < total:
            g = torch.Generator().manual_seed(derive_seed(seed, _MSTEP, lap, step, acc.process_index))
            torch.manual_seed(derive_seed(seed, _MSTEP, lap, step, acc.process_index, 1))  # dropout
            idx = torch.randint(0, n, (per_process,), generator=g)
            x = self.task.augment(samples[idx.to(samples.device)], g)
            loss = objective(x, g)
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            if cfg.grad_clip > 0:
                acc.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
            optimizer.step()
            schedule.step()
            ema.step(backbone.parameters())
            step += 1
            running.append(float(loss.detach()))
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                losses.append([step, sum(running) / len(running)])
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
                running = []
            if step % cfg.checkpoint_every == 0 and step < total:
                self._checkpoint(folder, step, losses, ema)
        bar.close()
        model = backbone
        ema.copy_to(model.parameters())
        model.eval()
        tail = [l for _, l in losses[-max(1, len(losses) // 10):]]
        stats = {"mstep_steps": total, "train_loss": sum(tail) / max(len(tail), 1)}
        acc.free_memory()
        return model, stats

    def _checkpoint(self, folder: Path, step: int, losses, ema: EMAModel) -> None:
        acc = self.accelerator
        tmp = folder / "checkpoint.tmp"
        if acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            torch.save(ema.state_dict(), tmp / "ema.pt")
            # Versioned folders: state.json is replaced atomically and always names a complete
            # checkpoint, so a kill at any point leaves a loadable state.
            name = f"checkpoint-{step:08d}"
            shutil.rmtree(folder / name, ignore_errors=True)
            os.replace(tmp, folder / name)
            (folder / "state.json.tmp").write_text(json.dumps({"step": step, "losses": losses, "checkpoint": name}))
            os.replace(folder / "state.json.tmp", folder / "state.json")
            for old in folder.glob("checkpoint-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def lap(self, lap: int, obs: ObservationSet) -> dict:
        """E-step then M-step; saves ``lap_KK`` and appends its metrics line."""
        start = time.perf_counter()
        samples = self.estep(lap, obs)
        estep_time = time.perf_counter() - start
        kept = torch.isfinite(samples).flatten(1).all(dim=1)
        bound = self.config.estep.discard_outside
        if bound is not None:  # the authors drop far-out posterior samples (manifold: |x_i| >= 3)
            kept &= (samples.abs() < bound).flatten(1).all(dim=1)
        discarded = int((~kept).sum())
        samples = samples[kept]
        start = time.perf_counter()
        model, stats = self.mstep(lap, samples)
        mstep_time = time.perf_counter() - start
        metrics = self._evaluate(lap, model)
        self._save_lap(lap, model)
        if self.accelerator.is_main_process:
            shutil.rmtree(self.work_dir / f"lap_{lap:02d}", ignore_errors=True)
        record = {
            "lap": lap,
            "estep_time_s": estep_time,
            "mstep_time_s": mstep_time,
            "estep_samples_per_s": len(obs) / max(estep_time, 1e-9),
            "observations": len(obs),
            "discarded_samples": discarded,
            "processes": self.accelerator.num_processes,
        } | stats | metrics
        self._log_metrics(record)
        return record


def run_em(config: EMConfig, progress: bool = True) -> list[dict]:
    """Run (or resume) an EM experiment under a new ``Accelerator``."""
    accelerator = Accelerator()
    set_seed(config.seed)
    records = EMTrainer(config, accelerator, progress=progress).run()
    accelerator.end_training()
    return records
