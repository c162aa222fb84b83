"""The test suite writes nothing outside temporary folders (tests/conftest.py).

Issue 12: the suite used to fill the user's default cache folder (a CIFAR-10 dataset build,
Inception weights, FID statistics), so a cached file could hide a broken set-up step.
"""

import os
import subprocess
import sys
from pathlib import Path

from conftest import CACHE_VARIABLES, SESSION_CACHE_ROOT

ROOT = Path(__file__).resolve().parents[1]


def _inside(path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def test_every_cache_variable_points_into_the_session_folder(session_cache):
    import datasets
    import matplotlib
    import torch

    from diffem.metrics import default_cache_dir

    assert session_cache == SESSION_CACHE_ROOT and session_cache.is_dir()
    assert not _inside(session_cache, Path.home())
    for name in CACHE_VARIABLES:
        assert _inside(os.environ[name], session_cache), name
    for path in (default_cache_dir(), torch.hub.get_dir(), datasets.config.HF_DATASETS_CACHE,
                 datasets.config.HF_CACHE_HOME, matplotlib.get_cachedir()):
        assert _inside(path, session_cache), path


def test_a_suite_run_leaves_the_default_caches_untouched(tmp_path):
    # A pytest session with none of the cache variables set and HOME in a temporary folder:
    # every write to a default location (~/.cache/diffem, ~/.cache/huggingface, ...) would
    # land in that home. The session converts Inception weights, caches FID statistics,
    # builds a dataset and draws a figure (tests/scripts/cache_probe.py).
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES and k != "PYTEST_ADDOPTS"}
    env |= {"HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/scripts/cache_probe.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    used = dict(line.split(" ", 2)[1:] for line in proc.stdout.splitlines() if line.startswith("CACHE "))
    assert set(used) == {"diffem", "inception", "fid_stats", "torch_hub", "hf_datasets", "matplotlib"}
    sessions = set()
    for name, path in used.items():
        assert not _inside(path, home), f"{name} cache in the default location {path}"
        found = [parent for parent in Path(path).parents if parent.name.startswith("diffem-test-caches-")]
        assert found, f"{name} cache outside the session folder: {path}"
        sessions.add(found[0])
    assert len(sessions) == 1 and not sessions.pop().exists()  # one session folder, removed at the end
    assert list(home.rglob("*")) == []  # nothing written to the default locations
