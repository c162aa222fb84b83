"""benchmarks/posterior.py: its metrics, its network-evaluation count, and both parts end to end (tiny)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_posterior", ROOT / "benchmarks" / "posterior.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_cov(d, g, rank=None):
    f = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return f @ f.mT / (rank or d) + 0.1 * torch.eye(d, dtype=torch.float64)


def sqrtm_psd(a):
    lam, q = torch.linalg.eigh((a + a.mT) / 2)
    return (q * lam.clamp_min(0).sqrt()) @ q.mT


@pytest.mark.parametrize("n", [5, 40])  # fewer and more samples than dimensions
def test_gaussian_w2_matches_the_dense_formula(bench, n):
    g = torch.Generator().manual_seed(0)
    d = 8
    S, m = random_cov(d, g), torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.3 + 0.2
    C = torch.cov(x.T)
    root = sqrtm_psd(S)
    w2sq = (x.mean(0) - m).square().sum() + C.trace() + S.trace() - 2 * sqrtm_psd(root @ C @ root).trace()
    assert bench.gaussian_w2(x, m, S) == pytest.approx(math.sqrt(w2sq), rel=1e-6)


def test_covariance_error_is_unbiased(bench):
    g = torch.Generator().manual_seed(1)
    d, n = 30, 20  # n < d, as in the benchmark
    S = random_cov(d, g, rank=5)
    L = torch.linalg.cholesky(S)
    exact, shrunk = [], []
    for _ in range(400):
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        exact.append(bench.covariance_error_squared(z @ L.mT, S))
        shrunk.append(bench.covariance_error_squared(0.5 * z @ L.mT, S))
    exact, shrunk = torch.tensor(exact), torch.tensor(shrunk)
    # unbiased: mean 0 for exact samples, ||S/4 - S||^2 / ||S||^2 = 0.5625 for samples of covariance S / 4
    assert exact.mean().abs() < 4 * exact.std() / math.sqrt(len(exact))
    assert (shrunk.mean() - 0.5625).abs() < 4 * shrunk.std() / math.sqrt(len(shrunk))
    assert shrunk.std() < 0.2  # and informative: the two are told apart by one draw
    assert bench.covariance_error(0.5 * z @ L.mT, S) == pytest.approx(math.sqrt(max(shrunk[-1].item(), 0)))


def test_counting_denoiser_counts_forwards_and_vjps(bench):
    from diffem.edm import network_evaluations
    from diffem.gaussian import GaussianPrior
    from diffem.operators import Mask

    prior = GaussianPrior.from_parameters(torch.zeros(3 * 8 * 8), torch.randn(192, 4), torch.tensor(0.5), (3, 8, 8))
    counting = bench.CountingDenoiser(prior)
    mask = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    A = Mask(mask)
    y = A(torch.randn(4, 3, 8, 8))
    for method, steps in [("mmps", 5), ("mmps_edm_dpmpp", 5), ("dps", 3), ("diffpir", 4)]:
        x, info = bench.run_sampler(counting, y, A, 0.01, (3, 8, 8), method, steps, seed=0, batch_size=2)
        sampler = bench.METHODS[method][2]
        assert x.shape == (4, 3, 8, 8) and torch.isfinite(x).all()
        # EDM samplers run steps + 1 steps: as many forwards as DDPM's steps (+ final denoise)
        assert info["forwards"] == info["expected_forwards"] == network_evaluations("ddpm", steps)
        assert info["sampler_steps"] == (steps + 1 if sampler.startswith("edm") else steps)
        expected_vjps = {"mmps": steps + 1, "mmps_edm_dpmpp": steps + 1, "dps": steps, "diffpir": 0}[method]
        assert info["vjps"] == expected_vjps
        assert info["nfe"] == info["forwards"] + info["vjps"]


def tiny_images(path, size=8):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(80, 3, size // 2, size // 2, generator=g)
    images = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False).clamp(-2, 2)
    torch.save({"fit": images[:70], "test": images[70:]}, path)
    return path


def test_exact_part_end_to_end(bench, tmp_path):
    images = tiny_images(tmp_path / "images.pt")
    out = dict(results=tmp_path / "results", table=tmp_path / "table.md", figure=tmp_path / "figure.png")
    argv = ["--images-file", str(images), "--observations", "2", "--samples", "16", "--steps", "1", "2", "5",
            "--rank", "4", "--fit-images", "70", "--methods", "mmps", "dps", "mmps_edm_dpmpp",
            "--long-methods", "mmps", "--threads", "1",
            "--results-dir", str(out["results"]), "--table", str(out["table"]), "--figure", str(out["figure"])]
    assert bench.main(argv) == 0
    data = json.loads((out["results"] / "posterior_exact.json").read_text())
    rows = {(r["task"], r["method"], r["steps"]) for r in data["results"]}
    for task in bench.TASKS:
        for method in ("mmps", "dps", "mmps_edm_dpmpp"):
            for steps in (1, 2):
                assert (task, method, steps) in rows
        assert (task, "mmps", 5) in rows and (task, "dps", 5) not in rows  # --long-methods
    for r in data["results"]:
        assert r["finite"]
        if r["steps"] == 1:  # one sampler step is far from exact: above the finite-sample floor of exact samples
            floor = data["floors"][r["task"]]
            assert r["w2"] > floor["w2"] and r["mean_rel_error"] > floor["mean_rel_error"], r
    table = out["table"].read_text()
    assert all(label in table for label in bench.TASK_LABELS.values())
    assert "not run" in table.lower() and "Appendix E" in table
    assert out["figure"].stat().st_size > 0
    # the table is a function of the JSON alone
    out["table"].unlink()
    assert bench.main(argv + ["--report-only"]) == 0
    assert out["table"].read_text() == table
    # --append merges another method's rows into the same results
    extra = ["--images-file", str(images), "--observations", "2", "--samples", "16", "--steps", "2", "--rank", "4",
             "--fit-images", "70", "--methods", "tmpd", "--tasks", "sr4", "--threads", "1", "--append",
             "--results-dir", str(out["results"]), "--table", str(out["table"]), "--figure", str(out["figure"])]
    assert bench.main(extra) == 0
    merged = json.loads((out["results"] / "posterior_exact.json").read_text())
    keys = {(r["task"], r["method"], r["steps"]) for r in merged["results"]}
    assert keys == rows | {("sr4", "tmpd", 2)}
    assert "TMPD" in out["table"].read_text()


def test_diverged_rows(bench):
    assert bench.diverged({"finite": True, "mean_rel_error": 3e7})
    assert bench.diverged({"finite": False, "mean_rel_error": 0.1})
    assert bench.diverged({"finite": True, "mean_rel_error": float("nan")})
    assert not bench.diverged({"finite": True, "mean_rel_error": 0.2})


def test_learned_part_on_a_tiny_saved_pipeline(bench, tmp_path):
    from diffusers import UNet2DModel

    from diffem.pipeline import DiffusionPriorPipeline
    from diffem.scheduler import VEScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DiffusionPriorPipeline(unet, VEScheduler()).save_pretrained(tmp_path / "lap")
    images = tiny_images(tmp_path / "images.pt", size=16)  # SSIM's 11-pixel window needs >= 11 pixels
    argv = ["--prior", str(tmp_path / "lap"), "--images-file", str(images), "--observations", "2", "--samples", "2",
            "--steps", "2", "--methods", "mmps", "mmps_edm_euler", "--tasks", "inpaint75", "sr4", "--threads", "1",
            "--results-dir", str(tmp_path / "results"), "--table", str(tmp_path / "table.md"),
            "--figure", str(tmp_path / "figure.png")]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "results" / "posterior_learned.json").read_text())
    assert len(data["results"]) == 4
    for r in data["results"]:
        assert math.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1 and r["nfe"] > 0
    table = (tmp_path / "table.md").read_text()
    assert "## Learned prior" in table and "LPIPS" in table and "PSNR" in table
    # a second prior under its own label (the oracle beside the EM prior): its own file, then a side-by-side table
    assert bench.main([*argv, "--label", "oracle (clean images)", "--methods", "mmps"]) == 0
    oracle = json.loads((tmp_path / "results" / "posterior_learned_oracle-clean-images.json").read_text())
    assert oracle["config"]["label"] == "oracle (clean images)" and len(oracle["results"]) == 2
    table = (tmp_path / "table.md").read_text()
    assert "## Learned prior: EM prior" in table and "## Learned prior: oracle (clean images)" in table
    rows = [line for line in table.splitlines() if line.startswith("| inpaint75 | MMPS") and line.count("/") == 2]
    em = next(r for r in data["results"] if r["task"] == "inpaint75" and r["method"] == "mmps")
    ours = next(r for r in oracle["results"] if r["task"] == "inpaint75")
    assert len(rows) == 1 and rows[0].endswith(f"| {em['psnr_of_mean'] - ours['psnr_of_mean']:+.2f} |")


def test_bad_arguments(bench):
    for argv in (["--samples", "1"], ["--steps", "0"], ["--noise-std", "0"], ["--methods", "nope"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
