"""The MRI experiment: pixel-unshuffle U-Net, task, smoke run end to end (CLI), report, `diffem reconstruct`."""

import json
import os
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import load_script, run_cli
import torch

from diffem.config import ConfigError, load_config
from diffem.data.mri import BRAIN_VOLUMES, DEFAULT_MRI_DIR
from diffem.train import make_trainer
from diffem.networks import UNSHUFFLE_PRESETS, PixelUnshuffleUNet, build_unshuffle_unet
from diffem.observations import ObservationSet
from diffem.operators import SubsampledFourier
from diffem.pipeline import DiffusionPriorPipeline, denoiser_of, event_shape_of
from diffem.runs import lap_dir
from diffem.scheduler import VEScheduler
from diffem.tasks import get_task
from diffem.tasks.mri import MriTask, observe_kspace, random_flip_shift

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}
needs_brains = pytest.mark.skipif(
    not all((DEFAULT_MRI_DIR / f).is_file() for f in BRAIN_VOLUMES.values()),
    reason=f"offline brain volumes not found in {DEFAULT_MRI_DIR}",
)
h5py = pytest.importorskip("h5py")


def _main(capsys, *args):
    """`diffem ARGS` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from diffem.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke profile through the command users run."""
    out = tmp_path_factory.mktemp("mri-smoke")
    proc = run_cli("train", "mri", "--profile", "smoke", "--output-dir", str(out), "--no-progress")  # in this process
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# -- network ---------------------------------------------------------------------------------------
def test_unshuffle_unet_shapes_and_save_load(tmp_path):
    net = build_unshuffle_unet("tiny", sample_size=16, seed=3)
    assert isinstance(net, PixelUnshuffleUNet) and event_shape_of(net) == (1, 16, 16)
    assert net.unet.config.sample_size == 8 and net.unet.config.in_channels == 4  # 2x2 unshuffle
    x, c = torch.randn(3, 1, 16, 16), torch.randn(3)
    out = net(x, c)
    assert out.shape == x.shape
    pipe = DiffusionPriorPipeline(net, VEScheduler())
    pipe.save_pretrained(tmp_path / "prior")
    loaded = DiffusionPriorPipeline.from_pretrained(tmp_path / "prior").unet
    assert isinstance(loaded, PixelUnshuffleUNet)
    torch.testing.assert_close(loaded(x, c), out)
    assert denoiser_of(loaded)(x, torch.full((3,), 0.5)).shape == x.shape
    same = build_unshuffle_unet("tiny", sample_size=16, seed=3)
    torch.testing.assert_close(same(x, c), out)  # seeded initialisation


def test_unshuffle_is_a_pure_rearrangement():
    """Pixel (i, j) of the image sits in channel (i % f) f + j % f of cell (i // f, j // f)."""
    net = build_unshuffle_unet("tiny", sample_size=8)
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    h = net.unshuffle(x)
    assert h.shape == (1, 4, 4, 4)
    assert h[0, 1, 2, 3] == x[0, 0, 4, 7] and h[0, 2, 1, 0] == x[0, 0, 3, 0]
    torch.testing.assert_close(net.shuffle(h), x)


def test_paper_preset_matches_the_authors_network():
    spec = UNSHUFFLE_PRESETS["paper"]
    assert spec["factor"] == 4 and tuple(spec["block_out_channels"]) == (128, 256, 384, 512)
    assert spec["layers_per_block"] == 3 and spec["dropout"] == 0.1
    net = PixelUnshuffleUNet(sample_size=320, **spec)
    cfg = net.unet.config
    assert cfg.sample_size == 80 and cfg.in_channels == 16 and cfg.out_channels == 16
    # attention only at the 4th level: 80 -> 40 -> 20 -> 10
    assert list(cfg.down_block_types) == ["DownBlock2D"] * 3 + ["AttnDownBlock2D"]
    with pytest.raises(ValueError, match="divide"):
        PixelUnshuffleUNet(sample_size=30, factor=4)
    with pytest.raises(ValueError, match="preset"):
        build_unshuffle_unet("huge")


# -- observations ----------------------------------------------------------------------------------
def test_observations_are_replayable_and_zero_off_the_mask():
    x = torch.rand(6, 1, 16, 16) * 4 - 2
    y, mask = observe_kspace(x, 6, 0.01, seed=2, stream=0, indices=range(6))
    y2, mask2 = observe_kspace(x[3:], 6, 0.01, seed=2, stream=0, indices=range(3, 6))
    torch.testing.assert_close(y[3:], y2, rtol=0, atol=0)
    assert torch.equal(mask[3:], mask2)
    assert (y * ~mask[:, None, None, :]).abs().max() == 0  # unobserved columns hold nothing
    noise = y - SubsampledFourier(mask)(x)
    assert 0.008 < noise[mask[:, None, None, :].expand_as(noise)].std() < 0.012  # sigma_y = 0.01 on observed entries
    y3, _ = observe_kspace(x, 6, 0.01, seed=3, stream=0, indices=range(6))
    assert not torch.equal(y, y3)


def test_augmentation_pads_with_background():
    x = torch.rand(64, 1, 8, 8)
    out = random_flip_shift(x, torch.Generator().manual_seed(0), shift=2)
    again = random_flip_shift(x, torch.Generator().manual_seed(0), shift=2)
    assert torch.equal(out, again) and out.shape == x.shape
    assert ((out == -2) | torch.isin(out, x)).all()  # nothing new but the background
    assert (out == -2).any()


# -- the smoke run -----------------------------------------------------------------------------------
@needs_brains
def test_smoke_run_end_to_end(smoke_run):
    out = smoke_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lap"] for r in records] == [0, 1, 2]
    for k in range(3):
        assert (lap_dir(out, k) / "model_index.json").exists()
    unet = json.loads((lap_dir(out, 2) / "unet" / "config.json").read_text())
    assert unet["_class_name"] == "PixelUnshuffleUNet" and unet["sample_size"] == 16
    evaluated = [r for r in records if "accelerations" in r]
    assert [r["lap"] for r in evaluated] == [0, 2]
    for r in evaluated:
        assert sorted(r["accelerations"], key=float) == ["4", "6", "8", "16", "32"]
        for R, m in r["accelerations"].items():
            for key in ("psnr", "ssim", "nmse"):
                for est in ("zero_filled", "posterior_sample", "posterior_mean"):
                    assert np.isfinite(m[f"{key}_{est}"])
            # conjugate symmetry: the effective acceleration is milder than the nominal one
            assert 1 <= m["effective_acceleration"] <= 1 / m["kept_fraction"] + 1e-9
            assert m["data_consistency_zero_filled"] < 0.05  # A A+ y = y up to the noise of y
        # fewer measurements leave more uncertainty: the posterior spreads more at R = 32 than at R = 4
        assert r["accelerations"]["4"]["posterior_std"] < r["accelerations"]["32"]["posterior_std"]
        # The fixed evaluation masks: the same zero-filled images at every lap.
        assert r["accelerations"]["8"]["psnr_zero_filled"] == evaluated[0]["accelerations"]["8"]["psnr_zero_filled"]
        art = torch.load(out / "eval" / f"lap_{r['lap']:02d}.pt", weights_only=False)
        assert art["truth"].shape == (2, 1, 16, 16) and art["accelerations"]["8"]["samples"].shape == (2, 2, 1, 16, 16)
    assert not (out / "work" / "lap_02").exists()


@needs_brains
def test_observation_set_holds_only_y_and_mask(smoke_run):
    out = smoke_run
    ds = datasets.load_from_disk(str(out / "observations"))
    assert sorted(ds.column_names) == ["mask", "y"]
    config = load_config("mri", "smoke", overrides=[f"output_dir={out}"])
    obs = get_task(config).observations(out)
    assert isinstance(obs, ObservationSet) and set(vars(obs)) == {"y", "operator", "noise_std", "event_shape"}
    assert obs.y.shape == (48, 2, 16, 16) and obs.noise_std == 0.01 and obs.event_shape == (1, 16, 16)
    assert isinstance(obs.operator, SubsampledFourier) and obs.operator.mask.shape == (48, 16)


@needs_brains
def test_ground_truth_never_enters_training(smoke_run, tmp_path, monkeypatch, poison_eval_keys):
    """Once the observations exist, laps run with every path to clean images cut."""
    config = load_config("mri", "smoke", overrides=[f"output_dir={tmp_path}", "laps=2", "eval.samples=0"])
    get_task(config).observations(tmp_path)  # built from the clean images, once

    def forbidden(*args, **kwargs):
        raise AssertionError("a clean image was read during training")

    import diffem.data.mri as data_mri

    monkeypatch.setattr(MriTask, "clean_images", forbidden)
    monkeypatch.setattr(MriTask, "_slices", forbidden)
    for name in ("load_brain_slices", "load_fastmri", "brain_volume_slices", "read_fastmri_file"):
        monkeypatch.setattr(data_mri, name, forbidden)
    records = poison_eval_keys(make_trainer(config, progress=False)).run()  # nor an evaluation-only key
    assert [r["lap"] for r in records] == [0, 1, 2]
    with pytest.raises(AssertionError, match="clean image"):
        get_task(config).clean_images("train")


@needs_brains
def test_report_on_the_smoke_run(smoke_run, tmp_path):
    table, figure, results = tmp_path / "mri.md", tmp_path / "mri.png", tmp_path / "results"
    report = load_script(ROOT / "experiments" / "mri" / "report.py", "mri_report")
    assert report.main([str(smoke_run), "--table", str(table), "--figure", str(figure), "--results-dir", str(results),
                        "--slice", "1"]) == 0
    text = table.read_text()
    assert "published no MRI numbers" in text and "conjugate-symmetric" in text
    for R in ("4", "6", "8", "16", "32"):
        assert f"\n| {R} |" in text and f"### R = {R}" in text
    assert "| 0 | Gaussian (EM fit) |" in text and "| 2 | diffusion (U-Net) |" in text
    assert figure.stat().st_size > 0 and (tmp_path / "mri_laps.png").stat().st_size > 0
    assert not results.exists()  # smoke runs are not copied to the results folder


def _last_evaluated(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("accelerations")][-1]


def _fake_cs(path: Path, run: Path, profile: str, offsets: dict, images: bool = True) -> dict:
    """A `compressed_sensing.py` output for the run's held-out slices at `path` (and its .pt): at each R of
    `offsets` ({R: {method: (lambda, PSNR - EM's, SSIM - EM's)}}), numbers set relative to the last lap's
    posterior mean."""
    last = _last_evaluated(run)
    n = last["eval_slices"]
    entries = {}
    for R, methods in offsets.items():
        m = last["accelerations"][R]
        entries[R] = {method: {"lambda": lam, "validation_psnr": {f"{lam:g}": 30.0},
                               "psnr": m["psnr_posterior_mean"] + dp, "ssim": m["ssim_posterior_mean"] + ds,
                               "nmse": 0.05, "data_consistency": 0.01}
                      for method, (lam, dp, ds) in methods.items()}
    cs = {"run": str(run), "profile": profile, "test_slices": list(range(n)), "validation_slices": [n, n + 1, n + 2],
          "lambdas": [1e-3, 3e-3, 0.3], "max_iter": 7, "library": "sigpy 9.9-test", "accelerations": entries,
          "time_s": 1.0}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cs))
    if images:
        size = 16
        torch.save({R: {method: torch.full((n, 1, size, size), -1.0 + 0.1 * k).half()
                        for k, method in enumerate(methods)} for R, methods in offsets.items()}, path.with_suffix(".pt"))
    return cs


@needs_brains
def test_report_shows_compressed_sensing(smoke_run, tmp_path):
    """The compressed-sensing columns and the "beat compressed sensing?" verdicts follow the file's numbers;
    without the file they say "not run"."""
    from matplotlib.image import imread

    report = load_script(ROOT / "experiments" / "mri" / "report.py", "mri_report")
    fmt = report.fmt
    last = _last_evaluated(smoke_run)
    # R = 4: L1-wavelet beats EM's PSNR (and is the better one; TV's higher SSIM is not the one compared);
    # R = 8: both lose on PSNR, TV the better one and above EM's SSIM; R = 16: TV missing, L1-wavelet loses.
    offsets = {"4": {"l1_wavelet": (3e-3, 1.0, -0.05), "total_variation": (0.3, -2.0, 0.1)},
               "8": {"l1_wavelet": (1e-3, -2.0, -0.2), "total_variation": (0.3, -0.5, 0.05)},
               "16": {"l1_wavelet": (3e-3, -1.0, -0.1)}}
    results = tmp_path / "results"
    cs = _fake_cs(results / "smoke-cs.json", smoke_run, "smoke", offsets)  # the default place: <results-dir>/<profile>-cs.json

    def run(name, results_dir):
        table, figure = tmp_path / f"{name}.md", tmp_path / f"{name}.png"
        assert report.main([str(smoke_run), "--table", str(table), "--figure", str(figure),
                            "--results-dir", str(results_dir), "--slice", "1"]) == 0
        return table.read_text(), imread(figure).shape[1]

    text, width = run("with", results)
    a = cs["accelerations"]
    em = {R: (last["accelerations"][R]["psnr_posterior_mean"], last["accelerations"][R]["ssim_posterior_mean"])
          for R in ("4", "8", "16")}
    # the summary: PSNR and SSIM of both methods beside EM's, and the lambdas
    l1, tv = a["4"]["l1_wavelet"], a["4"]["total_variation"]
    assert f"| {fmt(l1['psnr'])} | {fmt(tv['psnr'])} |" in text and f"| {fmt(l1['ssim'])} | {fmt(tv['ssim'])} |" in text
    assert "| 0.003 / 0.3 |" in text.split("\n| 4 |")[1].splitlines()[0]
    row16 = text.split("\n| 16 |")[1].splitlines()[0]
    assert f"| {fmt(a['16']['l1_wavelet']['psnr'])} | not run |" in row16 and "| 0.003 / not run |" in row16
    assert "\n| 6 |" in text and "not run" in text.split("\n| 6 |")[1].splitlines()[0]  # R absent from the file
    assert "sigpy 9.9-test" in text and "7 iterations" in text
    assert "validation set of 3 clean held-out slices, disjoint from the test slices and from training" in text
    assert "an advantage the EM prior" in text
    # the verdicts: against the better method by PSNR, SSIM against that same method
    section = text.split("## Does the EM prior beat compressed sensing")[1].split("\n## ")[0]
    t8, l16 = a["8"]["total_variation"], a["16"]["l1_wavelet"]
    vs = lambda mine, ref: f"({fmt(mine)} vs {fmt(ref)})"  # noqa: E731
    assert f"| 4 | L1-wavelet (0.003) | no {vs(em['4'][0], l1['psnr'])} | yes {vs(em['4'][1], l1['ssim'])} |" in section
    assert f"| 8 | TV (0.3) | yes {vs(em['8'][0], t8['psnr'])} | no {vs(em['8'][1], t8['ssim'])} |" in section
    assert f"| 16 | L1-wavelet (0.003) | yes {vs(em['16'][0], l16['psnr'])} | yes {vs(em['16'][1], l16['ssim'])} |" in section
    assert "| 4 | L1-wavelet (0.003) |" in section and section.count("| not run | not run |") == 3  # no oracle run
    assert sorted(p.name for p in results.iterdir()) == ["smoke-cs.json", "smoke-cs.pt"]  # left alone, nothing copied

    # without the file: "not run", never a number; the figure loses its two compressed-sensing columns
    bare, bare_width = run("without", tmp_path / "no-results")
    for R in ("4", "8", "16", "32"):
        row = bare.split(f"\n| {R} |")[1].splitlines()[0].split(" | ")
        assert row[3:5] == ["not run", "not run"] and row[8:10] == ["not run", "not run"] and row[-1] == "not run |"
    section = bare.split("## Does the EM prior beat compressed sensing")[1].split("\n## ")[0]
    for R in ("4", "8", "16"):
        assert f"| {R} | not run | not run | not run |" in section
    assert "L1-wavelet and TV (compressed sensing): not run (no `" in bare and "smoke-cs.json" in bare
    assert width > bare_width
    # a file of another profile is refused
    other = _fake_cs(tmp_path / "other-cs.json", smoke_run, "cpu", offsets, images=False)
    with pytest.raises(SystemExit, match="'cpu' profile"):
        report.main([str(smoke_run), "--table", str(tmp_path / "x.md"), "--cs", str(tmp_path / "other-cs.json")])
    assert other["profile"] == "cpu" and not (tmp_path / "x.md").exists()


@needs_brains
def test_report_regenerates_from_its_results_folder(smoke_run, tmp_path):
    """A non-smoke copy of the run: the results folder alone regenerates the same table."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    cfg = (run / "config.yaml").read_text().replace("profile: smoke", "profile: cpu")
    (run / "config.yaml").write_text(cfg)
    results = tmp_path / "results"
    _fake_cs(results / "cpu-cs.json", run, "cpu", {"8": {"l1_wavelet": (1e-3, -1.0, -0.1)}})  # beside results/cpu

    def report(source, name):
        script = load_script(ROOT / "experiments" / "mri" / "report.py", "mri_report")
        assert script.main([str(source), "--table", str(tmp_path / f"{name}.md"), "--figure", str(tmp_path / f"{name}.png"),
                            "--results-dir", str(results)]) == 0
        return (tmp_path / f"{name}.md").read_text()

    first = report(run, "a")
    assert sorted(p.name for p in (results / "cpu").iterdir()) == ["config.yaml", "figure_data.pt", "metrics.jsonl"]
    assert sorted(p.name for p in results.iterdir()) == ["cpu", "cpu-cs.json", "cpu-cs.pt"]  # not deleted
    assert "| 8 | L1-wavelet (0.001) |" in first
    # What users run: reproduce.sh without training, from the committed result files.
    out = tmp_path / "out"
    env = ENV | {"REPORT_ONLY": "1", "RUN_DIR": str(tmp_path / "no-run"), "RESULTS_DIR": str(results),
                 "TABLES_DIR": str(out), "FIGURES_DIR": str(out)}
    proc = subprocess.run(["bash", "reproduce.sh", "mri", "--profile", "cpu"], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report from the committed results" in proc.stdout
    strip = lambda text: [line for line in text.splitlines() if not line.startswith("Run: ")]  # noqa: E731
    assert strip(first) == strip((out / "mri.md").read_text())  # the compressed-sensing rows too
    assert sorted(p.name for p in results.iterdir()) == ["cpu", "cpu-cs.json", "cpu-cs.pt"]
    assert (out / "mri.png").stat().st_size > 0 and (out / "mri_laps.png").stat().st_size > 0


# -- compressed-sensing references ---------------------------------------------------------------------
def _slices(n: int = 2, size: int = 16) -> torch.Tensor:
    """Real test images in data units: background -2, a textured rectangle."""
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, 1, size, size), -2.0)
    x[:, :, 3:13, 4:12] = -2 + 4 * (0.5 + 0.5 * torch.rand(n, 1, 10, 8, generator=g))
    return x


def test_compressed_sensing_reproduces_a_fully_sampled_slice():
    """Every column observed, lambda -> 0: both methods give back the image (the intensity shift, the FFT
    convention and the units of diffem's operator match sigpy's)."""
    pytest.importorskip("sigpy")
    cs = load_script(ROOT / "experiments" / "mri" / "compressed_sensing.py", "mri_cs")
    x = _slices()
    mask = torch.ones(len(x), x.shape[-1], dtype=torch.bool)
    y = SubsampledFourier(mask)(x)
    for method in cs.METHODS:
        est = cs.reconstruct(method, y, mask, 1e-6, max_iter=50)
        assert est.shape == x.shape and est.dtype == torch.float32
        assert (est - x).abs().max() < 0.05, method
        scores = cs.scores(est, x, y, mask)
        assert scores["data_consistency"] < 0.01 and scores["psnr"] > 35, (method, scores)
    with pytest.raises(ValueError, match="method"):
        cs.reconstruct("wavelet", y, mask, 1e-3)


def test_compressed_sensing_is_data_consistent_as_lambda_vanishes():
    pytest.importorskip("sigpy")
    cs = load_script(ROOT / "experiments" / "mri" / "compressed_sensing.py", "mri_cs")
    x = _slices()
    y, mask = observe_kspace(x, 4, 0.01, seed=0, stream=0, indices=range(len(x)))
    assert cs.scores(SubsampledFourier(mask).pinv(y), x, y, mask)["data_consistency"] < 0.05  # A+ y is data-consistent
    assert cs.scores(cs.reconstruct("total_variation", y, mask, 1e-6), x, y, mask)["data_consistency"] < 0.05


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("data.kind=knee", "data.kind"),
    ("data.acceleration=0.5", "data.acceleration"),
    ("data.noise_std=0", "data.noise_std"),
    ("data.eval_accelerations=[]", "data.eval_accelerations"),
    ("data.holdout=[0.7,0.6]", "data.holdout"),
    ("data.size=17", "data.size"),
    ("data.path=/no/such/folder", "data.path"),
    ("data.bogus=1", "data.bogus"),
    ("network.preset=huge", "network.preset"),
])
def test_bad_config_fails_before_work(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        get_task(load_config("mri", "smoke", overrides=[f"output_dir={tmp_path}", override]))
    assert not any(tmp_path.iterdir())


def test_profiles_resolve():
    paper = load_config("mri", "paper", overrides=["data.path=/tmp"])
    assert paper.laps == 16 and paper.network["preset"] == "paper"
    assert (paper.mstep.epochs, paper.mstep.batch_size, paper.mstep.lr, paper.mstep.ema_decay) == (64, 256, 1e-4, 0.999)
    assert (paper.estep.method, paper.estep.steps, paper.estep.maxiter) == ("ddpm", 64, 3)
    assert (paper.lap0.rank, paper.lap0.observations) == (64, 4096)
    assert paper.data["acceleration"] == 6 and paper.data["noise_std"] == 0.01 and paper.data["size"] == 320
    assert paper.data["duplicate"] == 2 and paper.data["shift"] == 4
    cpu = get_task(load_config("mri", "cpu"))
    assert cpu.data["acceleration"] == 6 and cpu.data["eval_accelerations"] == [4, 6, 8, 16, 32]
    assert cpu.data["posterior_samples"] >= 4


def test_paper_profile_needs_a_fastmri_folder(tmp_path, capsys):
    code, _, err = _main(capsys, "train", "mri", "--profile", "paper", "--output-dir", tmp_path / "run", "--dry-run")
    assert code == 2 and "data.path" in err


def _knee_folder(root: Path, files: int = 3, side: int = 32) -> Path:
    from test_data_mri import write_fastmri

    folder = root / "knee"
    folder.mkdir()
    for i in range(files):
        write_fastmri(folder / f"file{i}.h5", slices=13, side=side, seed=i)
    return folder


def test_paper_profile_runs_one_step(tmp_path, capsys):
    """The `paper` profile's own network, sampler and fastMRI loader on synthetic .h5 files, shrunk to one step."""
    folder = _knee_folder(tmp_path)
    common = [f"data.path={folder}", "data.eval_volumes=1", f"data.cache_dir={tmp_path / 'cache'}"]
    code, out, err = _main(capsys, "train", "mri", "--profile", "paper", "--output-dir", tmp_path / "run", "--dry-run",
                           "--set", *common)
    assert code == 0, err[-2000:]
    assert "kind: fastmri" in out and "preset: paper" in out
    overrides = common + [
        f"output_dir={tmp_path / 'run'}", "laps=1", "data.size=32", "data.eval_slices=1", "data.posterior_samples=1",
        "data.posterior_steps=1", "data.posterior_maxiter=1", "data.eval_accelerations=[8]",
        "lap0.observations=6", "lap0.iterations=1", "lap0.steps=2", "lap0.rank=2", "lap0.maxiter=1",
        "estep.steps=1", "estep.batch_size=6", "mstep.epochs=0", "mstep.steps=1", "mstep.batch_size=2",
        "mstep.checkpoint_every=1", "eval.samples=1", "eval.steps=1", "eval.batch_size=1",
    ]
    config = load_config("mri", "paper", overrides=overrides)
    records = make_trainer(config, progress=False).run()
    assert [r["lap"] for r in records] == [0, 1]
    assert records[1]["observations"] == 2 * 6  # 2 training files x 3 kept slices, each observed twice
    unet = json.loads((lap_dir(tmp_path / "run", 1) / "unet" / "config.json").read_text())
    assert unet["factor"] == 4 and list(unet["block_out_channels"]) == [128, 256, 384, 512]
    assert all(np.isfinite(r["accelerations"]["8"]["psnr_posterior_mean"]) for r in records)


# -- diffem reconstruct ------------------------------------------------------------------------------
@needs_brains
def test_reconstruct_from_npy_nifti_and_h5(smoke_run, tmp_path, capsys):
    import nibabel as nib

    rng = np.random.default_rng(0)
    image = np.zeros((24, 24), np.float32)
    image[4:20, 6:18] = rng.uniform(0.5, 1.0, (16, 12))
    np.save(tmp_path / "slice.npy", image)
    nib.save(nib.Nifti1Image(np.stack([image.T] * 5, axis=-1), np.eye(4)), tmp_path / "vol.nii.gz")
    from test_data_mri import write_fastmri

    write_fastmri(tmp_path / "knee.h5", slices=3, side=16)
    for flag, path in (("--npy", "slice.npy"), ("--nifti", "vol.nii.gz"), ("--h5", "knee.h5")):
        out = tmp_path / f"out{flag}"
        code, stdout, err = _main(capsys, "reconstruct", smoke_run, flag, tmp_path / path, "--acceleration", "8",
                                  "--samples", "2", "--steps", "2", "--maxiter", "1", "--output-dir", out)
        assert code == 0, err[-3000:]
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["prior"].endswith("lap_02") and summary["samples"] == 2
        mean, std = np.load(out / "posterior_mean.npy"), np.load(out / "posterior_std.npy")
        assert mean.shape == std.shape == (16, 16) and (std >= 0).all() and std.max() > 0
        assert np.load(out / "mask.npy").dtype == bool and (out / "reconstruction.png").stat().st_size > 0
        assert summary["zero_filled"]["psnr"] > 15  # A+ y keeps the observed k-space


def test_reconstruct_errors(smoke_run, tmp_path, capsys):
    from test_data_mri import write_fastmri

    write_fastmri(tmp_path / "nokspace.h5", slices=3, kspace=None)
    write_fastmri(tmp_path / "flat.h5", slices=3, kspace=np.ones((16, 16), np.complex64))
    bad = np.ones((3, 16, 16), np.complex64)
    bad[1, 2, 3] = np.nan
    write_fastmri(tmp_path / "nan.h5", slices=3, kspace=bad)
    np.save(tmp_path / "four.npy", np.ones((2, 2, 2, 2), np.float32))
    cases = [("--h5", "nokspace.h5", "no 'kspace'"), ("--h5", "flat.h5", "expected (slices, height, width)"),
             ("--h5", "nan.h5", "NaN or inf"), ("--npy", "four.npy", "got shape (2, 2, 2, 2)"),
             ("--npy", "missing.npy", "not found")]
    for flag, name, message in cases:
        code, _, err = _main(capsys, "reconstruct", smoke_run, flag, tmp_path / name, "--output-dir", tmp_path / "o")
        assert code == 2 and message in err, (name, err[-2000:])
    code, _, err = _main(capsys, "reconstruct", tmp_path, "--npy", tmp_path / "four.npy")
    assert code == 2 and "neither a saved prior" in err
    assert not (tmp_path / "o").exists()


def test_reconstruct_kspace_as_acquired_multi_coil_and_single_coil(smoke_run, tmp_path, capsys):
    """Undersampled k-space as it is: the mask from its nonzero pattern (or --mask), coil maps by ESPIRiT,
    the centred block at the prior's size, the sampler from the prior's sampling.json, a summary with data
    consistency per coil beside sigpy's L1-wavelet reconstruction."""
    pytest.importorskip("sigpy")
    import sigpy.mri

    size, coils = 24, 4
    x = np.zeros((size, size), np.float32)
    x[5:19, 7:17] = np.random.default_rng(0).uniform(0.5, 1.0, (14, 10))
    maps = sigpy.mri.birdcage_maps((coils, size, size)).astype(np.complex64)
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(maps * x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    mask = np.random.default_rng(1).random((size, size)) < 0.4
    mask[size // 2 - 6: size // 2 + 6, size // 2 - 6: size // 2 + 6] = True  # a calibration centre
    k = (k * mask).astype(np.complex64)
    np.save(tmp_path / "ksp.npy", k)
    np.save(tmp_path / "mask.npy", mask)
    for name, extra in (("multi", []), ("given-mask", ["--mask", tmp_path / "mask.npy"])):
        out = tmp_path / name
        code, stdout, err = _main(capsys, "reconstruct", smoke_run, "--kspace", tmp_path / "ksp.npy", "--samples", "2",
                                  "--output-dir", out, *extra)
        assert code == 0, err[-3000:]
        assert "from the prior's E-step" in err  # the sampler defaults to the prior's own, and says so
        summary = json.loads((out / "summary.json").read_text())
        assert summary["coils"] == coils and summary["mask"] == ("the nonzero pattern of the k-space" if not extra
                                                                 else str(tmp_path / "mask.npy"))
        assert "low-resolution" in summary["resolution"] and "16x16" in summary["resolution"]
        dc = summary["data_consistency_per_coil"]
        assert len(dc["posterior_mean"]) == coils
        # the final data-consistency step moves the mean towards the data, coil by coil
        assert all(a < b for a, b in zip(dc["posterior_mean_dc"], dc["posterior_mean"])), dc
        assert np.load(out / "posterior_mean_dc.npy").shape == (16, 16) and "tau" in summary["dc_step"]
        assert np.load(out / "posterior_mean.npy").shape == (16, 16) and (out / "reconstruction.png").stat().st_size > 0
        assert np.load(out / "l1_wavelet.npy").shape == (16, 16) and np.load(out / "samples.npy").shape == (2, 16, 16)
    np.save(tmp_path / "single.npy", k[0])
    code, stdout, err = _main(capsys, "reconstruct", smoke_run, "--kspace", tmp_path / "single.npy", "--samples", "1",
                              "--steps", "2", "--output-dir", tmp_path / "single")
    assert code == 0, err[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["coils"] == 1 and summary["coil_maps"].startswith("one coil") and "--steps" in err


def test_reconstruct_kspace_with_a_complex_prior_keeps_the_phase(tmp_path):
    """A complex prior (2, S, S) on multi-coil k-space: ESPIRiT maps without the phase absorbed, complex SENSE, and
    magnitudes out; the final data-consistency step lowers every coil's residual."""
    pytest.importorskip("sigpy")
    import sigpy.mri
    from diffusers import UNet2DModel

    from diffem.pipeline import DiffusionPriorPipeline
    from diffem.reconstruct import reconstruct_kspace
    from diffem.scheduler import VEScheduler
    from diffem.spec import SamplerSpec

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = DiffusionPriorPipeline(unet, VEScheduler())
    size, coils = 16, 4
    yy, xx = np.mgrid[:size, :size] / size
    image = np.where((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.12, 1.0, 0.0) * np.exp(1j * 2.0 * (xx - 0.5))  # a phase ramp
    maps = sigpy.mri.birdcage_maps((coils, size, size)).astype(np.complex64)
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(maps * image, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    mask = np.random.default_rng(2).random((size, size)) < 0.5
    mask[4:12, 4:12] = True
    out = reconstruct_kspace(pipe, (k * mask).astype(np.complex64), spec=SamplerSpec(method="ddpm", steps=3, maxiter=1),
                             samples=2)
    assert out["complex_prior"] and out["maps_source"].endswith("the image phase left to the complex prior")
    assert out["mean"].shape == (16, 16) and float(out["mean"].min()) >= 0  # magnitudes
    dc = out["data_consistency"]
    assert all(a < b for a, b in zip(dc["posterior_mean_dc"], dc["posterior_mean"])), dc


def test_reconstruct_refuses_misuse_naming_the_file(smoke_run, tmp_path, capsys):
    from test_data_mri import write_fastmri

    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    write_fastmri(tmp_path / "knee.h5", slices=2, side=16)
    import shutil

    shutil.copy(tmp_path / "knee.h5", tmp_path / "knee.npy")  # an .h5 file given to --npy
    write_fastmri(tmp_path / "multi.h5", slices=2, side=16,
                  kspace=np.ones((2, 4, 16, 16), np.complex64))  # multi-coil fastMRI layout
    np.save(tmp_path / "real.npy", np.ones((4, 16, 16), np.float32))
    cases = [("--nifti", "corrupt.nii.gz", "not a readable NIfTI volume"),
             ("--npy", "knee.npy", "an HDF5 file: use --h5 or --kspace"),
             ("--h5", "multi.h5", "multi-coil (slices, coils, H, W)"),
             ("--kspace", "real.npy", "k-space must be complex"),
             ("--kspace", "knee.txt", "not found")]
    for flag, name, message in cases:
        code, _, err = _main(capsys, "reconstruct", smoke_run, flag, tmp_path / name, "--output-dir", tmp_path / "o")
        assert code == 2 and message in err and name.split(".")[0] in err, (name, err[-2000:])
    assert not (tmp_path / "o").exists()
    # a real 3-D array is read as slices, and the summary says so
    code, stdout, _ = _main(capsys, "reconstruct", smoke_run, "--npy", tmp_path / "real.npy", "--samples", "1",
                            "--steps", "2", "--output-dir", tmp_path / "slices")
    assert code == 0 and "(first axis: slices)" in json.loads(stdout.strip().splitlines()[-1])["input"]


# -- complex images and multi-coil k-space ---------------------------------------------------------
def _task(tmp_path, *overrides):
    config = load_config("mri", "smoke", overrides=[f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    return MriTask(config)


@needs_brains
def test_complex_images_keep_the_magnitude_and_break_conjugate_symmetry(tmp_path):
    """data.complex: the same slices with a seeded smooth phase; the k-space has no conjugate symmetry, so the
    effective acceleration is the nominal R and the zero-filled image is data-consistent."""
    from diffem.data.mri import complex_magnitude, to_magnitude

    real, cplx = _task(tmp_path), _task(tmp_path, "data.complex=true")
    x, z = real.clean_images("test"), cplx.clean_images("test")
    assert cplx.event_shape == (2, 16, 16) and z.shape == (len(x), 2, 16, 16)
    torch.testing.assert_close(complex_magnitude(z), to_magnitude(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(cplx.clean_images("test"), z, rtol=0, atol=0)  # seeded: the same every time
    phase = torch.atan2(z[:, 1], z[:, 0])[to_magnitude(x)[:, 0] > 0.2]
    assert phase.std() > 0.3  # not a constant phase
    k = torch.complex(*cplx.operator(torch.ones(len(z), 16, dtype=torch.bool))(z).unbind(1))
    mirror = k.flip(-2, -1).roll((1, 1), (-2, -1)).conj()  # k[-u, -v]* in centred indexing (even size)
    assert (k - mirror).abs().norm() > 0.3 * k.abs().norm()  # far from Hermitian
    y, mask = cplx.evaluation_observations(4)
    A = cplx.operator(mask)
    torch.testing.assert_close(A.effective_acceleration(), 16 / mask.sum(1).double())
    assert ((A(A.pinv(y)) - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1)).max() < 1e-5


@needs_brains
def test_multicoil_observations_are_sense_and_replayable(tmp_path):
    task = _task(tmp_path, "data.complex=true", "data.coils=4")
    maps = task.coil_maps
    assert maps.shape == (4, 16, 16) and maps.is_complex()
    torch.testing.assert_close(maps.abs().square().sum(0), torch.ones(16, 16), rtol=0, atol=1e-5)
    x = task.clean_images("test")
    y, mask = observe_kspace(x, 1, 1e-4, seed=0, stream=1, indices=range(len(x)), maps=maps)
    assert y.shape == (len(x), 4, 2, 16, 16) and bool(mask.all())
    A = task.operator(mask)
    torch.testing.assert_close(A.sense_combination(y), x, rtol=0, atol=1e-3)  # full sampling: SENSE inverts
    y6, mask6 = observe_kspace(x, 6, 0.01, seed=0, stream=0, indices=range(len(x)), maps=maps)
    again, _ = observe_kspace(x[1:], 6, 0.01, seed=0, stream=0, indices=range(1, len(x)), maps=maps)
    torch.testing.assert_close(y6[1:], again, rtol=0, atol=0)
    assert (y6 * ~mask6[:, None, None, None, :]).abs().max() == 0
    obs = task.observations(tmp_path / "run")
    assert obs.y.shape[1:] == (4, 2, 16, 16) and obs.operator.in_shape == (2, 16, 16)
    assert obs.operator.maps.stride(0) == 0  # the shared maps are a view, not a copy per observation
    assert obs.operator.to(torch.float64).maps.stride(0) == 0  # and stay one across a dtype change


@needs_brains
def test_run_sh_trains_the_oracle_and_multicoil_variants_and_reports_them(smoke_run, tmp_path):
    """What users run: experiments/mri/run.sh with VARIANTS trains each variant beside the main run (resumed:
    already done) and the table shows their numbers beside the magnitude prior's."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    out = tmp_path / "out"
    env = ENV | {"RUN_DIR": str(run), "VARIANTS": "oracle multicoil", "TABLES_DIR": str(out), "FIGURES_DIR": str(out),
                 "RESULTS_DIR": str(tmp_path / "results")}
    proc = subprocess.run(["bash", "experiments/mri/run.sh", "smoke", "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    oracle = [json.loads(line) for line in (tmp_path / "run-oracle" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lap"] for r in oracle] == [1, 2] and oracle[0]["train_on"] == "clean" and oracle[0]["estep_time_s"] == 0
    multi = _last_evaluated(tmp_path / "run-multicoil")
    for R, m in multi["accelerations"].items():
        assert m["effective_acceleration"] == pytest.approx(1 / m["kept_fraction"])  # no conjugate symmetry
    text = (out / "mri_smoke.md").read_text()
    section = text.split("## Beside the oracle")[1].split("\n## ")[0]
    o, last = _last_evaluated(tmp_path / "run-oracle"), _last_evaluated(run)
    fmt = load_script(ROOT / "experiments" / "mri" / "report.py", "mri_report").fmt
    row8 = section.split("PSNR (dB):")[1].split("\n| 8 |")[1].splitlines()[0]
    cells = [c.strip() for c in row8.strip(" |").split("|")]
    assert cells[1] == fmt(last["accelerations"]["8"]["psnr_posterior_mean"])
    assert cells[2] == fmt(o["accelerations"]["8"]["psnr_posterior_mean"])
    assert cells[3:5] == ["not run", "not run"]  # complex: not in VARIANTS
    assert cells[6] == fmt(multi["accelerations"]["8"]["psnr_posterior_mean"])
    assert "| oracle: the U-Net trained on the clean slices (no E-step) | the clean slices |" in section
    assert "8 simulated coils" in section
    oracle_row = text.split("how far is it from the oracle?")[1].split("\n| 8 |")[1].splitlines()[0]
    assert fmt(o["accelerations"]["8"]["psnr_posterior_mean"]) in oracle_row


def test_complex_fastmri_training_images_are_the_kspace_images(tmp_path):
    """data.kind fastmri with data.complex: the training images are complex_volume of each file's kspace (the
    scanner's phase, no synthetic one), the operator takes complex images, and the observations round-trip."""
    from test_data_mri import write_fastmri

    from diffem.data.mri import complex_volume

    folder = tmp_path / "knee"
    folder.mkdir()
    for i in range(2):
        write_fastmri(folder / f"file{i}.h5", slices=12, side=16, seed=i)
    task = _task(tmp_path, "data.kind=fastmri", f"data.path={folder}", "data.eval_volumes=1", "data.complex=true",
                 "data.size=16", "data.observations=2")
    x = task.clean_images("train")
    assert task.event_shape == (2, 16, 16) and x.shape == (2, 2, 16, 16)
    import h5py

    with h5py.File(folder / "file0.h5") as f:
        kspace = f["kspace"][()]
    torch.testing.assert_close(x, complex_volume(kspace[10:12], 16))
    obs = task.observations(tmp_path)
    assert obs.operator.complex_images and obs.y.shape == (2, 2, 16, 16)
