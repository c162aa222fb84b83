"""Evaluation that raises on one process only (for the multi-process test).

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/eval_failure.py OUT_DIR

Runs :func:`diffem.em.evaluate_lap` three times in one process group with a task whose
evaluation gathers twice, as the image tasks do (prior samples, then Inception features):
process 1 raises between the two gathers, then process 0 raises before the first, then
nobody raises. Each process writes what every call returned to OUT_DIR/rank-R.json and
finishes with one more gather, which only succeeds if the processes' collectives stayed
paired. The process-group timeout is 1 minute (``timeout_minutes``), so a process left
waiting in a gather its peer never makes ends the run instead of idling.
"""

import json
import sys
from pathlib import Path

import torch

from diffem.config import load_config
from diffem.distributed import sharded_gather
from diffem.em import make_accelerator
from diffem.em.evaluation import evaluate_lap
from diffem.tasks import get_task

out_dir = Path(sys.argv[1])
config = load_config("manifold", "smoke", overrides=[f"output_dir={out_dir / 'run'}", "timeout_minutes=1"])
acc = make_accelerator(config)
task = get_task(config)
unet = task.backbone(0)


class FailingTask:
    """Two sharded gathers; process ``rank`` raises at ``where`` (0: before the first, 1: between)."""

    def __init__(self, rank, where):
        self.rank, self.where = rank, where

    def evaluate(self, pipeline, lap, seed, progress=False):
        mine = torch.full((3, 2), float(acc.process_index))
        for k in range(2):
            if acc.process_index == self.rank and k == self.where:
                raise RuntimeError(f"injected failure on process {self.rank} before gather {k}")
            gathered = sharded_gather(acc, mine)
        return {"total": float(gathered.sum())}


results = []
for rank, where in [(1, 1), (0, 0), (None, None)]:
    results.append(evaluate_lap(acc, config, FailingTask(rank, where), 0, unet, out_dir))
final = sharded_gather(acc, torch.tensor([acc.process_index + 1.0]))
(out_dir / f"rank-{acc.process_index}.json").write_text(json.dumps({"results": results, "final": final.tolist()}))
acc.end_training()
