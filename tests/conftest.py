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


def pytest_unconfigure(config):
    if not os.environ.get("DIFFEM_TEST_KEEP_CACHE"):
        shutil.rmtree(SESSION_CACHE_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def session_cache() -> Path:
    """The session's cache root; ``session_cache / "diffem"`` is diffem's default cache folder."""
    return SESSION_CACHE_ROOT
