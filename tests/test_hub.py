"""Publishing priors (diffem.hub, `diffem publish`): repo folders, model cards, loading routes, uploads.

Offline: uploads go to a recording stand-in for ``huggingface_hub.HfApi``; the runs are real
(`diffem train manifold --profile smoke`, and a tiny MNIST run with a U-Net when the offline
MNIST copy exists), built once per module.
"""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from diffem import DiffusionPriorPipeline
from diffem.cli import main as cli
from diffem.config import load_config
from diffem.hub import (
    LEDGER_NAME,
    METRICS,
    PublishError,
    build_model_card,
    check_repo_id,
    load_prior,
    load_published,
    publish,
    push_after_lap,
    read_run,
)

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
FAKE_TOKEN = "hf_FAKEdiffemTOKEN0123456789abcdef"
REPO = "someone/diffem-manifold"


def _train(out: Path, experiment: str, *overrides: str) -> Path:
    """`diffem train <experiment> --profile smoke` through the CLI's entry point (in this process)."""
    args = ["train", experiment, "--profile", "smoke", "--output-dir", str(out), "--no-progress"]
    assert cli(args + (["--set", *overrides] if overrides else [])) == 0
    return out


@pytest.fixture(scope="module")
def manifold_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("manifold") / "run", "manifold", "data.points=256", "mstep.steps=20",
                  "eval.samples=128", "data.eval_points=128")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    if not MNIST.is_dir():
        pytest.skip(f"offline MNIST not found: {MNIST}")
    return _train(tmp_path_factory.mktemp("mnist") / "run", "mnist", "laps=1", "eval.samples=0",
                  "network.kind=unet", "network.preset=tiny")


@pytest.fixture
def run_copy(manifold_run, tmp_path):
    """A private copy of the manifold run (uploads write a ledger into the run folder)."""
    return Path(shutil.copytree(manifold_run, tmp_path / "run"))


@pytest.fixture(autouse=True)
def no_stored_login(tmp_path, monkeypatch):
    """No token unless a test gives one: no $HF_TOKEN, no login file, not offline."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _samples(pipe, n=6, seed=0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(n, 8, gens, progress=False).samples


def _records(run: Path) -> dict:
    return {r["lap"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


class RecordingApi:
    """An offline stand-in for ``huggingface_hub.HfApi``: records calls and the files of every revision.

    ``fail_at``: the number (1-based) of the ``upload_folder`` call that raises, with a message quoting
    the token as a careless HTTP error could.
    """

    instances: list = []

    def __init__(self, token=None, fail_at=None):
        self.token, self.fail_at = token, fail_at
        self.calls, self.revisions, self.uploads = [], {}, 0
        RecordingApi.instances.append(self)

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        self.revisions.setdefault("main", {})
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, *, branch, exist_ok=False, repo_type=None, **kwargs):
        self.calls.append(("create_branch", repo_id, branch, exist_ok))
        if branch in self.revisions and not exist_ok:
            raise ValueError(f"branch {branch} exists")
        self.revisions.setdefault(branch, dict(self.revisions.get("main", {})))

    def upload_folder(self, *, repo_id, folder_path, revision=None, delete_patterns=None, **kwargs):
        self.uploads += 1
        revision = revision or "main"
        self.calls.append(("upload_folder", repo_id, revision))
        if self.uploads == self.fail_at:
            raise OSError(f"503 Server Error: Service Unavailable (Authorization: Bearer {self.token})")
        root = Path(folder_path)
        files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        old = {} if delete_patterns == ["*"] else self.revisions.get(revision, {})
        self.revisions[revision] = old | files
        digest = hashlib.sha1(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()
        return SimpleNamespace(oid=digest)


# -- the repo folder ---------------------------------------------------------------------------------
def test_output_dir_folder_loads_with_same_samples(manifold_run, tmp_path, capsys):
    out = tmp_path / "repo"
    assert cli(["publish", str(manifold_run), "--repo-id", REPO, "--output-dir", str(out)]) == 0
    assert "lap-02" in capsys.readouterr().out
    for name in ("model_index.json", "config.yaml", "metrics.json", "README.md", "diffem_pipeline.py",
                 "unet/diffem_networks.py", "scheduler/diffem_scheduler.py"):
        assert (out / name).is_file(), name
    assert (out / "config.yaml").read_text() == (manifold_run / "config.yaml").read_text()
    assert json.loads((out / "metrics.json").read_text()) == _records(manifold_run)[2]
    assert "_name_or_path" not in (out / "unet" / "config.json").read_text()  # no local paths published

    source = DiffusionPriorPipeline.from_pretrained(manifold_run / "lap_02")
    published = load_prior(out)
    assert isinstance(published, DiffusionPriorPipeline)
    torch.testing.assert_close(_samples(published), _samples(source), rtol=0, atol=0)
    torch.testing.assert_close(_samples(load_published(out, trust_remote_code=False)), _samples(source), rtol=0, atol=0)
    # diffem's own class loads a published folder as it is, with no trust_remote_code
    torch.testing.assert_close(_samples(DiffusionPriorPipeline.from_pretrained(out)), _samples(source), rtol=0, atol=0)
    assert load_published(manifold_run / "lap_02") is None  # not a published folder: diffusers' loader handles it
    assert load_published(out, device_map="cpu") is None  # options only diffusers' loader knows
    # the lap folder's other files (the E-step sampler settings, ...) travel with it; its training record
    # is metrics.json (with the evaluation), not a second copy
    extra = {p.relative_to(manifold_run / "lap_02") for p in (manifold_run / "lap_02").rglob("*") if p.is_file()}
    assert Path("lap_record.json") in extra and not (out / "lap_record.json").exists()
    assert all((out / p).is_file() for p in extra if p.name != "lap_record.json")


_NATIVE = textwrap.dedent("""
    import json, sys, torch
    from diffusers import DiffusionPipeline, UNet2DModel
    from diffem import DiffusionPriorPipeline
    g = lambda: [torch.Generator().manual_seed(i) for i in range(4)]
    out = {}
    for repo, revision, source in json.loads(sys.argv[2]):  # by Hub repo id and revision (offline, from the cache)
        pipe = DiffusionPipeline.from_pretrained(repo, revision=revision, trust_remote_code=True)
        ref = DiffusionPriorPipeline.from_pretrained(source)
        out["hub:" + revision] = bool(torch.equal(pipe(4, 8, g(), progress=False).samples,
                                                  ref(4, 8, g(), progress=False).samples))
    for name, folder, source in json.loads(sys.argv[1]):
        try:
            DiffusionPipeline.from_pretrained(folder)
            out[name + ":no_trust"] = "loaded"
        except ValueError as e:
            out[name + ":no_trust"] = "refused: trust_remote_code" if "trust_remote_code" in str(e) else str(e)
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        ref = DiffusionPriorPipeline.from_pretrained(source)
        out[name + ":class"] = type(pipe).__module__ + "." + type(pipe).__name__
        out[name + ":same_samples"] = bool(torch.equal(pipe(4, 8, g(), progress=False).samples,
                                                       ref(4, 8, g(), progress=False).samples))
        own = DiffusionPriorPipeline.from_pretrained(folder, trust_remote_code=True)
        out[name + ":own_class"] = type(own).__name__
        out[name + ":own_same_samples"] = bool(torch.equal(own(4, 8, g(), progress=False).samples,
                                                           ref(4, 8, g(), progress=False).samples))
        if name == "image":
            unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
            out["image:unet"] = all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(),
                                                                      ref.unet.state_dict().values()))
    print(json.dumps(out))
""")


def _as_hub_cache(api: RecordingApi, repo_id: str, cache: Path) -> None:
    """Lay the stand-in's revisions out as huggingface_hub's cache does (refs/<branch> -> snapshots/<commit>/)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for revision, files in api.revisions.items():
        commit = hashlib.sha1(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()
        for name, data in files.items():
            path = repo / "snapshots" / commit / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)


def test_hub_download_check_accepts_the_published_layout(manifold_run, tmp_path):
    """diffusers refuses a repo id whose components live outside diffusers, unless the repo holds their files."""
    from diffusers.pipelines.pipeline_loading_utils import _get_custom_components_and_folders

    out = tmp_path / "repo"
    publish(manifold_run, REPO, output_dir=out)
    files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    custom, _ = _get_custom_components_and_folders(REPO, json.loads((out / "model_index.json").read_text()), files)
    assert custom == {"unet": "diffem_networks", "scheduler": "diffem_scheduler"}
    raw = manifold_run / "lap_02"
    with pytest.raises(ValueError, match="does not exist"):
        _get_custom_components_and_folders(REPO, json.loads((raw / "model_index.json").read_text()),
                                           [str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file()])


def test_diffusers_native_loading_routes(manifold_run, image_run, tmp_path):
    m, i = tmp_path / "manifold", tmp_path / "image"
    publish(manifold_run, REPO, output_dir=m)
    publish(image_run, "someone/diffem-mnist", lap=1, output_dir=i)
    api = RecordingApi()
    publish(shutil.copytree(manifold_run, tmp_path / "run"), REPO, all_laps=True, token=FAKE_TOKEN, api=api)
    _as_hub_cache(api, REPO, tmp_path / "hf" / "hub")
    by_id = load_prior(REPO, revision="lap-01", cache_dir=tmp_path / "hf" / "hub", local_files_only=True)
    source = DiffusionPriorPipeline.from_pretrained(manifold_run / "lap_01")
    torch.testing.assert_close(_samples(by_id), _samples(source), rtol=0, atol=0)
    again = load_published(REPO, revision="lap-01", cache_dir=tmp_path / "hf" / "hub", local_files_only=True)
    torch.testing.assert_close(_samples(again), _samples(source), rtol=0, atol=0)
    assert json.loads((i / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    assert not list((i / "unet").glob("*.py"))  # a diffusers network needs no re-export
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("HF_MODULES_CACHE", None)
    args = json.dumps([["manifold", str(m), str(manifold_run / "lap_02")], ["image", str(i), str(image_run / "lap_01")]])
    repos = json.dumps([[REPO, "lap-01", str(manifold_run / "lap_01")], [REPO, "main", str(manifold_run / "lap_02")]])
    proc = subprocess.run([sys.executable, "-c", _NATIVE, args, repos], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("manifold", "image"):
        assert result[f"{name}:no_trust"] == "refused: trust_remote_code"
        assert result[f"{name}:class"] == "diffem.pipeline.DiffusionPriorPipeline"
        assert result[f"{name}:same_samples"] is True
        assert result[f"{name}:own_class"] == "DiffusionPriorPipeline" and result[f"{name}:own_same_samples"] is True
    assert result["image:unet"] is True
    assert result["hub:lap-01"] is True and result["hub:main"] is True
    assert (tmp_path / "hf" / "modules").is_dir()  # diffusers' module cache stayed inside tmp_path


# -- the model card ----------------------------------------------------------------------------------
def _metric_values(card) -> dict:
    names = {name: key for key, (_, name) in METRICS.items()}
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    return {names[r.metric_name]: r.metric_value for r in results}


def test_card_metadata_and_metrics_equal_the_run(manifold_run, tmp_path):
    out = tmp_path / "repo"
    publish(manifold_run, REPO, lap=2, output_dir=out)
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    for key in ("library_name", "pipeline_tag", "tags", "license", "datasets", "model-index"):
        assert key in meta, key
    assert meta["library_name"] == "diffusers"
    assert {"diffem", "diffusion", "expectation-maximization", "inverse-problems", "manifold"} <= set(meta["tags"])
    record = _records(manifold_run)[2]
    values = _metric_values(card)
    assert values == {k: record[k] for k in METRICS if k in record}
    assert values["sinkhorn"] == record["sinkhorn"]
    text = card.text
    assert "lap 2 of 2" in text and "`smoke`" in text and record["hardware"] in text
    assert f'revision="lap-02"' in text and "trust_remote_code=True" in text and "noise_std=0.01" in text
    assert "only from corrupted observations" in text and "2405.13712" in text


def _code_blocks(text: str) -> list[str]:
    return [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("python")]


def test_card_sampling_code_runs(manifold_run, image_run, tmp_path):
    """The card's unconditional and posterior snippets run on the published prior and give finite samples."""
    for run, lap in ((manifold_run, 2), (image_run, 1)):
        out = tmp_path / run.parent.name
        publish(run, REPO, lap=lap, output_dir=out)
        blocks = _code_blocks((out / "README.md").read_text())
        sampling = [b for b in blocks if "pipe(" in b and "from_pretrained" not in b and "load_prior" not in b]
        assert len(sampling) == 2
        scope = {"torch": torch, "pipe": load_prior(out)}
        for block in sampling:
            exec(block.replace("num_inference_steps=64", "num_inference_steps=4"), scope)
        assert scope["x_post"].shape[0] == 4 and torch.isfinite(scope["x_post"]).all()
        assert scope["x"].shape[0] == 16


@pytest.mark.parametrize("level", ["cpu-p25", "cpu-p75"])
def test_cifar10_card_from_committed_results(level):
    """The card of a real CIFAR-10 run's last lap: FID / PSNR values as in its metrics.jsonl."""
    run = read_run(ROOT / "experiments" / "cifar10" / "results" / level)
    last = max(run.records)
    card = ModelCard(str(build_model_card("someone/diffem-cifar10", last, run)))
    meta = card.data.to_dict()
    assert meta["pipeline_tag"] == "unconditional-image-generation" and meta["datasets"] == ["uoft-cs/cifar10"]
    values = _metric_values(card)
    assert {"fid", "psnr_posterior_mean"} <= set(values)
    assert values == {k: run.records[last][k] for k in METRICS if isinstance(run.records[last].get(k), float)}
    drop = run.config["data"]["drop_prob"]
    assert f"probability {drop:.4g}" in card.text
    assert "not comparable with the paper's" in card.text and "JPEG" in card.text


# -- uploads -------------------------------------------------------------------------------------------
def _expected_files(run: Path, lap: int, tmp: Path) -> dict:
    folder = tmp / f"expected-{lap}"
    publish(run, REPO, lap=lap, output_dir=folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_all_laps_upload_to_lap_branches_and_main(run_copy, tmp_path):
    api = RecordingApi(token=FAKE_TOKEN)
    results = publish(run_copy, REPO, all_laps=True, private=True, token=FAKE_TOKEN, api=api, echo=lambda s: None)
    assert [r["revision"] for r in results] == ["lap-00", "lap-01", "lap-02", "main"]
    assert api.calls[0] == ("create_repo", REPO, True, True)
    assert [c[2] for c in api.calls if c[0] == "create_branch"] == ["lap-00", "lap-01", "lap-02"]
    assert [c[2] for c in api.calls if c[0] == "upload_folder"] == ["lap-00", "lap-01", "lap-02", "main"]
    assert all(c[1] == REPO for c in api.calls)
    for lap in (0, 1, 2):
        assert api.revisions[f"lap-{lap:02d}"] == _expected_files(run_copy, lap, tmp_path)
    assert api.revisions["main"] == api.revisions["lap-02"]
    assert "unet/diffem_gaussian.py" in api.revisions["lap-00"]  # lap 0 is the Gaussian prior
    ledger = json.loads((run_copy / LEDGER_NAME).read_text())[REPO]
    assert sorted(ledger) == ["lap-00", "lap-01", "lap-02", "main"] and ledger["main"]["lap"] == 2

    again = RecordingApi(token=FAKE_TOKEN)
    results = publish(run_copy, REPO, all_laps=True, token=FAKE_TOKEN, api=again, echo=lambda s: None)
    assert {r["status"] for r in results} == {"skipped"} and again.uploads == 0
    older = publish(run_copy, REPO, lap=1, token=FAKE_TOKEN, api=again, echo=lambda s: None)
    assert [r["revision"] for r in older] == ["lap-01"]  # main keeps the newest lap


def test_failed_all_laps_resumes_and_skips_uploaded(run_copy, capsys):
    broken = RecordingApi(token=FAKE_TOKEN, fail_at=2)
    with pytest.raises(RuntimeError) as err:
        publish(run_copy, REPO, all_laps=True, token=FAKE_TOKEN, api=broken)
    assert "503" in str(err.value) and FAKE_TOKEN not in str(err.value) and "rerun" in str(err.value)
    assert list(json.loads((run_copy / LEDGER_NAME).read_text())[REPO]) == ["lap-00"]

    api = RecordingApi(token=FAKE_TOKEN)
    results = publish(run_copy, REPO, all_laps=True, token=FAKE_TOKEN, api=api)
    assert [(r["revision"], r["status"]) for r in results] == [
        ("lap-00", "skipped"), ("lap-01", "uploaded"), ("lap-02", "uploaded"), ("main", "uploaded")]
    assert [c[2] for c in api.calls if c[0] == "upload_folder"] == ["lap-01", "lap-02", "main"]
    assert FAKE_TOKEN not in capsys.readouterr().out


def test_changed_lap_is_uploaded_again(run_copy):
    publish(run_copy, REPO, lap=2, token=FAKE_TOKEN, api=RecordingApi(), echo=lambda s: None)
    with open(run_copy / "metrics.jsonl", "a") as f:  # a re-evaluation appends a newer record of lap 2
        f.write(json.dumps(_records(run_copy)[2] | {"sinkhorn": 0.125}) + "\n")
    api = RecordingApi()
    publish(run_copy, REPO, lap=2, token=FAKE_TOKEN, api=api, echo=lambda s: None)
    assert [c[2] for c in api.calls if c[0] == "upload_folder"] == ["lap-02", "main"]
    assert json.loads(api.revisions["main"]["metrics.json"])["sinkhorn"] == 0.125


def test_dry_run_prints_the_plan_and_uploads_nothing(run_copy, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.instances.clear()
    assert cli(["publish", str(run_copy), "--repo-id", REPO, "--all-laps", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lap-00 (lap 0): would upload" in out and "main (lap 2): would upload" in out
    assert "unet/diffusion_pytorch_model.safetensors" in out and "found (not shown)" in out
    assert FAKE_TOKEN not in out and not RecordingApi.instances and not (run_copy / LEDGER_NAME).exists()


# -- push as you train ------------------------------------------------------------------------------
def test_push_after_lap_logs_failures_and_retries(run_copy, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    config = load_config("manifold", "smoke", overrides=[f"output_dir={run_copy}", f"hub.repo_id={REPO}"])
    caplog.set_level(logging.INFO, logger="diffem.hub")
    assert push_after_lap(config, api=RecordingApi(token=FAKE_TOKEN, fail_at=1)) == []  # never raises
    assert "failed" in caplog.text and "503" in caplog.text and FAKE_TOKEN not in caplog.text

    api = RecordingApi(token=FAKE_TOKEN)
    done = push_after_lap(config, api=api)  # the next lap retries everything not uploaded
    assert [r["revision"] for r in done] == ["lap-00", "lap-01", "lap-02", "main"]
    assert api.revisions["main"]["metrics.json"] == api.revisions["lap-02"]["metrics.json"]

    assert api.calls[0] == ("create_repo", REPO, False, True)

    # hub.private and hub.license reach the upload and the card
    (run_copy / LEDGER_NAME).unlink()
    other = load_config("manifold", "smoke", overrides=[f"output_dir={run_copy}", f"hub.repo_id={REPO}",
                                                        "hub.private=true", "hub.license=apache-2.0"])
    text = (run_copy / "config.yaml").read_text()
    (run_copy / "config.yaml").write_text(text + "hub:\n  repo_id: " + REPO + "\n  private: true\n  license: apache-2.0\n")
    api = RecordingApi(token=FAKE_TOKEN)
    assert push_after_lap(other, api=api)
    assert api.calls[0] == ("create_repo", REPO, True, True)
    card = ModelCard(api.revisions["main"]["README.md"].decode())
    assert card.data.license == "apache-2.0"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert push_after_lap(config, api=RecordingApi()) == [] and "HF_HUB_OFFLINE" in caplog.text
    off = load_config("manifold", "smoke", overrides=[f"output_dir={run_copy}"])
    assert off.hub.repo_id == "" and push_after_lap(off, api=RecordingApi()) == []


def test_training_pushes_each_lap_and_survives_failed_uploads(tmp_path, monkeypatch, caplog):
    """`hub.repo_id` set: the trainer pushes after every saved lap; a failed push neither stops the run
    nor is lost (retried at the next lap), and records updated by the evaluation are pushed again."""
    from diffem.train import make_trainer

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    shared = RecordingApi(token=FAKE_TOKEN, fail_at=1)  # the push after lap 0 fails
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: shared)
    caplog.set_level(logging.INFO, logger="diffem.hub")
    overrides = [
        f"output_dir={tmp_path / 'run'}", "data.points=128", "lap0.iterations=2",
        "estep.batch_size=64", "estep.steps=4", "mstep.steps=6", "mstep.batch_size=32", "eval.samples=32",
        "eval.steps=4", "data.eval_points=32", "data.sinkhorn_maxiter=10"]
    config = load_config("manifold", "smoke", overrides=[*overrides, f"hub.repo_id={REPO}"])
    make_trainer(config, progress=False).run()
    records = _records(config.run_dir)
    assert sorted(records) == [0, 1, 2]  # the run finished despite the failed push
    assert "503" in caplog.text and FAKE_TOKEN not in caplog.text
    uploads = [c[2] for c in shared.calls if c[0] == "upload_folder"]
    assert uploads[0] == "lap-00" and uploads.count("lap-00") >= 2  # failed, then retried
    assert set(shared.revisions) == {"main", "lap-00", "lap-01", "lap-02"}
    assert json.loads(shared.revisions["lap-00"]["metrics.json"]) == records[0]  # with its evaluation
    assert "sinkhorn" in records[0]
    assert json.loads(shared.revisions["main"]["metrics.json"])["lap"] == 2
    # the last lap is pushed again once evaluated (the end of the run), so its card has the metric
    assert json.loads(shared.revisions["lap-02"]["metrics.json"]) == records[2] and "sinkhorn" in records[2]
    # the hub section may change on resume (publishing does not change the prior)
    off = load_config("manifold", "smoke", overrides=[*overrides, "hub.repo_id=", "hub.private=true"])
    assert make_trainer(off, progress=False).run() == []


# -- errors before any upload -----------------------------------------------------------------------
@pytest.mark.parametrize("repo_id", ["diffem-manifold", "a/b/c", "some one/x", "someone/x--y", "/x", "someone/"])
def test_bad_repo_id(repo_id):
    with pytest.raises(PublishError, match="bad format"):
        check_repo_id(repo_id)
    with pytest.raises(Exception, match="hub.repo_id"):
        load_config("manifold", "smoke", overrides=[f"hub.repo_id={repo_id}"])


def test_errors_before_any_upload(run_copy, monkeypatch, capsys):
    api = RecordingApi()
    cases = [
        (dict(lap=7, token=FAKE_TOKEN), "has no lap 7"),
        (dict(token=None), "no Hugging Face token"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PublishError, match=message):
            publish(run_copy, REPO, api=api, **kwargs)
    with pytest.raises(PublishError, match="bad format"):
        publish(run_copy, "not-a-repo-id", token=FAKE_TOKEN, api=api)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        publish(run_copy, REPO, token=FAKE_TOKEN, api=api)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    (run_copy / "lap_01" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(PublishError, match="lap_01.*incomplete.*weights"):
        publish(run_copy, REPO, all_laps=True, token=FAKE_TOKEN, api=api)
    assert api.calls == []  # nothing reached the Hub

    assert cli(["publish", str(run_copy), "--repo-id", REPO, "--lap", "9", "--token", FAKE_TOKEN]) == 2
    err = capsys.readouterr().err
    assert "has no lap 9" in err and FAKE_TOKEN not in err


# -- secrets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["flag", "env", "login"])
def test_token_never_appears_in_outputs(run_copy, tmp_path, monkeypatch, capsys, caplog, source):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.instances.clear()
    args = ["publish", str(run_copy), "--repo-id", REPO, "--all-laps"]
    if source == "flag":
        args += ["--token", FAKE_TOKEN]
    elif source == "env":
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    else:
        login = tmp_path / "login" / "token"
        login.parent.mkdir()
        login.write_text(FAKE_TOKEN)
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(login))
    assert cli(args) == 0
    (api,) = RecordingApi.instances
    assert api.token == FAKE_TOKEN  # the token was used ...
    captured = capsys.readouterr()
    texts = [captured.out, captured.err, caplog.text]
    texts += [p.read_text(errors="replace") for p in run_copy.rglob("*") if p.is_file() and p.suffix != ".arrow"]
    texts += [v.decode(errors="replace") for files in api.revisions.values() for v in files.values()]
    assert not [t for t in texts if FAKE_TOKEN in t]  # ... and written nowhere


def test_folder_holding_the_token_is_refused(run_copy):
    text = (run_copy / "config.yaml").read_text()
    (run_copy / "config.yaml").write_text(f"# pasted by mistake: {FAKE_TOKEN}\n" + text)
    api = RecordingApi()
    with pytest.raises(PublishError, match="contains the Hub token") as err:
        publish(run_copy, REPO, token=FAKE_TOKEN, api=api)
    assert FAKE_TOKEN not in str(err.value) and not any(c[0] == "upload_folder" for c in api.calls)
