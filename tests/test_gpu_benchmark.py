"""benchmarks/gpu.py --smoke: the GPU benchmark's code path on the CPU (its numbers are for a GPU)."""

import json

from conftest import load_script

from diffem.config import load_config
from diffem.tasks import get_task


def test_gpu_benchmark_smoke_times_the_profiles_own_network(tmp_path, capsys):
    from pathlib import Path

    bench = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py", "gpu_benchmark")
    out = tmp_path / "gpu.json"
    assert bench.main(["--smoke", "--experiments", "cifar10", "mri", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == printed
    assert [(r["experiment"], r["variant"]) for r in rows] == [("cifar10", "fp32"), ("cifar10", "bf16"),
                                                               ("mri", "fp32"), ("mri", "bf16")]
    for r in rows:
        net = get_task(load_config(r["experiment"], "smoke")).backbone(0)
        assert r["parameters_m"] == sum(p.numel() for p in net.parameters()) / 1e6  # the profile's own network
        assert r["mstep_batch"] == r["estep_batch"] == 4 and r["smoke"] is True
        assert r["estep_maxiter"] == load_config(r["experiment"], "smoke").estep.maxiter
