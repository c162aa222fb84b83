"""Run lap 0 and the lap-1 E-step of a config, save the samples (for the multi-process test).

    [accelerate launch --multi_gpu --num_processes 2] python tests/scripts/estep_only.py OUT_DIR SAMPLES_FILE [key=value ...]

The accelerator is the CLI's (:func:`diffem.em.make_accelerator`): gloo on CPU under a launcher.
"""

import sys

import torch

from diffem.config import load_config
from diffem.em import EMTrainer, make_accelerator

out_dir, samples_file, *overrides = sys.argv[1:]
config = load_config("manifold", "smoke", overrides=[f"output_dir={out_dir}", "eval.samples=0", *overrides])
accelerator = make_accelerator(config)
trainer = EMTrainer(config, accelerator, progress=False)
trainer._prepare_run_dir()
obs = trainer.observations()
done = trainer.laps_done()
accelerator.wait_for_everyone()  # every process decides before any of them writes
if 0 not in done:
    trainer.lap0(obs)
samples = trainer.estep(1, obs)
if accelerator.is_main_process:
    torch.save({"samples": samples, "processes": accelerator.num_processes}, samples_file)
accelerator.end_training()
