"""The paper's low-dimensional manifold experiment as a task (Rozet et al. 2024, Section 5.1)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..operators import Projection
from . import ObservationSet, Task, draw_prior_samples, load_or_build

__all__ = ["ManifoldTask"]


class ManifoldTask(Task):
    """The paper's low-dimensional manifold experiment (Section 5.1).

    data: ``points`` (observations, 65,536 in the paper), ``features`` (5),
    ``noise_std`` (1e-2), ``eval_points`` (ground-truth points for the Sinkhorn
    divergence), ``curve_seed``. network: MLP ``hidden`` widths, ``emb_features``.
    """

    name = "manifold"
    data_defaults = dict(points=65536, features=5, noise_std=1e-2, eval_points=4096, curve_seed=0, sinkhorn_reg=1e-3, sinkhorn_maxiter=1024)
    network_defaults = dict(hidden=[256, 256, 256], emb_features=64)
    eval_data_keys = ("eval_points", "sinkhorn_reg", "sinkhorn_maxiter")

    @classmethod
    def card_facts(cls, data: dict, observations, fmt) -> dict:
        """The model card's description of the manifold experiment (:meth:`Task.card_facts <diffem.tasks.Task.card_facts>`)."""
        d, sigma = data.get("features", 5), data.get("noise_std")
        return dict(
            datasets=[], pipeline_tag="other", task_type="unconditional-generation",
            dataset_type="synthetic-manifold",
            dataset_name=f"Random smooth 1-D manifold in R^{d} (diffem, curve seed {data.get('curve_seed', 0)})",
            dataset_split="eval", kind="vector", event=f"({d},) vectors in about [-2, 2]",
            corruption=(f"{observations} points of a random smooth 1-D manifold in R^{d}, each observed through its own "
                        f"random 2x{d} projection matrix A_i (unit-norm rows) as y_i = A_i x_i + sigma_y e_i, "
                        f"noise std sigma_y = {fmt(sigma)}"),
            operator="`diffem.Projection` (one 2x5 matrix per observation)",
            posterior=("from diffem import Projection\n"
                       "g = torch.Generator().manual_seed(0)\n"
                       f"matrix = torch.randn(4, 2, {d}, generator=g)\n"
                       "A = Projection(matrix / matrix.norm(dim=-1, keepdim=True))  # one 2x5 matrix per observation\n"
                       f"y = A(x[:4]) + {fmt(sigma)} * torch.randn(4, 2, generator=g)  # stand-ins for real y"),
        )

    def check(self):
        for key in ("points", "features", "eval_points"):
            if int(self.data[key]) < 1:
                raise ConfigError(f"config key `data.{key}` must be >= 1")
        if not float(self.data["noise_std"]) > 0:
            raise ConfigError("config key `data.noise_std` must be > 0")

    def observations(self, cache_dir: Path) -> ObservationSet:
        from ..data import manifold

        d = self.data

        def build():
            curve = manifold.ManifoldCurve(d["curve_seed"], features=d["features"])
            x = manifold.manifold_points(d["points"], d["curve_seed"], "train", curve=curve)
            A = manifold.random_projections(d["points"], self.config.seed)
            return manifold.make_observations(x, A, d["noise_std"], seed=self.config.seed)

        ds = load_or_build(Path(cache_dir) / "observations", build).with_format("torch")
        return ObservationSet(ds["y"][:], Projection(ds["matrix"][:]), float(d["noise_std"]), (int(d["features"]),))

    def clean_signals(self) -> Tensor:
        """The clean points behind the observations, ``(points, features)``."""
        from ..data import manifold

        d = self.data
        return manifold.manifold_points(d["points"], d["curve_seed"], "train", features=d["features"])

    def ground_truth(self, n: int, split: str = "eval") -> Tensor:
        """Ground-truth points for evaluation only (never given to the trainer)."""
        from ..data import manifold

        return manifold.manifold_points(n, self.data["curve_seed"], split, features=self.data["features"])

    def backbone(self, seed: int) -> nn.Module:
        from ..networks import MLP

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MLP(self.data["features"], tuple(self.net["hidden"]), self.net["emb_features"])

    def divergence(self, samples: Tensor) -> tuple[float, int]:
        """The paper's Sinkhorn divergence of ``samples`` against the held-out truth, and how many
        samples it dropped (outside (-3, 3))."""
        from ..ot import entropic_ot, manifold_divergence

        m = self.data["eval_points"]
        truth = self.ground_truth(2 * m, "eval")
        options = dict(reg=float(self.data["sinkhorn_reg"]), maxiter=int(self.data["sinkhorn_maxiter"]))
        if getattr(self, "_baseline", None) is None:
            self._baseline = entropic_ot(truth[:m], truth[m:], **options)
        return manifold_divergence(samples, truth[:m], truth[m:], baseline=self._baseline, return_dropped=True, **options)

    def evaluate(self, pipeline, lap: int, generator_seed: int, progress: bool = True) -> dict:
        """Sinkhorn divergence of ``eval.samples`` prior samples against the held-out truth."""
        cfg = self.config.eval
        n = cfg.samples
        x = draw_prior_samples(pipeline, n, cfg, generator_seed, progress)
        value, dropped = self.divergence(x)
        return {"sinkhorn": float(value), "sinkhorn_baseline": self._baseline, "eval_samples": n,
                "eval_points": self.data["eval_points"], "eval_dropped": dropped}

    def estep_metrics(self, samples: Tensor, lap: int) -> dict:
        """The authors' logged metric (``experiments/manifold/train.py``): the Sinkhorn divergence of
        the E-step's posterior samples (after its (-3, 3) filter), the first ``eval.samples`` of
        them, against the same held-out truth as the prior samples."""
        n = min(self.config.eval.samples, len(samples))
        if n == 0:
            return {}
        value, _ = self.divergence(samples[:n])
        return {"sinkhorn_posterior": float(value), "sinkhorn_posterior_samples": n}
