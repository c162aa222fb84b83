"""Shared test settings.

Caches: the suite writes nothing outside temporary folders. Before any test module is
imported, every cache folder that diffem or its libraries use is pointed into one fresh
session folder (removed at the end): diffem's own cache (``DIFFEM_CACHE``: dataset
builds, converted Inception weights, FID statistics), Hugging Face (``HF_HOME``,
``HF_DATASETS_CACHE``, ``HF_HUB_CACHE``), torch hub (``TORCH_HOME``), matplotlib
(``MPLCONFIGDIR``) and any other XDG cache (``XDG_CACHE_HOME``). So every session builds
the CIFAR-10 dataset (~10 s) and converts the Inception weights (~1 s) itself, and a
broken set-up step cannot hide behind a cached file. The session folder is
:data:`SESSION_CACHE_ROOT` (fixture ``session_cache``); ``DIFFEM_TEST_KEEP_CACHE=1`` keeps it.

Threads: the test machines have 2 shared CPU cores: intra-op parallelism on tiny tensors
spends most of its time waiting for a busy sibling thread (10-40x slower elementwise ops
under load), so tests run single-threaded unless DIFFEM_TEST_THREADS says otherwise.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

#: Environment variables naming cache folders, and their sub-folder in the session folder.
CACHE_VARIABLES = {
    "DIFFEM_CACHE": "diffem",
    "HF_HOME": "huggingface",
    "HF_DATASETS_CACHE": "huggingface/datasets",
    "HF_HUB_CACHE": "huggingface/hub",
    "TORCH_HOME": "torch",
    "XDG_CACHE_HOME": "xdg",
    "MPLCONFIGDIR": "matplotlib",
}
SESSION_CACHE_ROOT = Path(tempfile.mkdtemp(prefix="diffem-test-caches-"))
for _name, _sub in CACHE_VARIABLES.items():
    (SESSION_CACHE_ROOT / _sub).mkdir(parents=True, exist_ok=True)
    os.environ[_name] = str(SESSION_CACHE_ROOT / _sub)

import torch  # noqa: E402  (after the cache variables: libraries read them when imported)

torch.set_num_threads(int(os.environ.get("DIFFEM_TEST_THREADS", "1")))


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="the device of tests/test_device.py's core property tests, e.g. cuda or cuda:1 (default cpu; "
                          "CI stays on the CPU)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device named by ``pytest --device`` (default ``cpu``); a CUDA device that is absent stops the session."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.exit(f"--device {device}: CUDA is not available on this machine", returncode=4)
    return device


def pytest_unconfigure(config):
    if not os.environ.get("DIFFEM_TEST_KEEP_CACHE"):
        shutil.rmtree(SESSION_CACHE_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def session_cache() -> Path:
    """The session's cache root; ``session_cache / "diffem"`` is diffem's default cache folder."""
    return SESSION_CACHE_ROOT


class _PoisonedData(dict):
    """A task's ``data`` options whose evaluation-only keys raise when read."""

    def __init__(self, data: dict, keys):
        super().__init__(data)
        self.poisoned = set(keys)

    def _check(self, key):
        if key in self.poisoned:
            raise AssertionError(f"training read the evaluation-only key `data.{key}`")

    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._check(key)
        return super().get(key, default)


@pytest.fixture
def poison_eval_keys():
    """``poison_eval_keys(trainer)``: from now on, reading any of the trainer's task's evaluation-only
    data keys (``Task.eval_data_keys``, which a resumed run may change) fails the test. Use with
    ``eval.samples=0``: what then runs is training alone."""

    def poison(trainer):
        task = trainer.task
        assert task.eval_data_keys, f"{type(task).__name__} has no evaluation-only keys to poison"
        task.data = _PoisonedData(task.data, task.eval_data_keys)
        return trainer

    return poison


class CliResult:
    """What :func:`run_cli` returns: the exit code and what the command printed."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args: str) -> CliResult:
    """``diffem ARGS`` in this process (:func:`diffem.cli.main`), with its stdout and stderr captured;
    for tests where the process itself is not the point (kill -9, launchers and bash keep theirs)."""
    import contextlib
    import io

    from diffem.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(map(str, args)))
        except SystemExit as e:  # argparse errors
            code = e.code if isinstance(e.code, int) else 2
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    """:func:`run_cli` as a fixture."""
    return run_cli


def load_script(path, name: str):
    """A script (``experiments/<name>/report.py``, ``benchmarks/*.py``) as a module, to call its ``main(argv)``
    in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
