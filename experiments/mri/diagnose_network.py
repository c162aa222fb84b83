"""Diagnostic: how noisy are the samples of an MRI backbone trained for one lap's budget on CLEAN slices?

    OMP_NUM_THREADS=1 python experiments/mri/diagnose_network.py [STEPS] [FACTOR]

Trains the `cpu` profile's network (with `network.factor` = FACTOR) by denoising score matching
on the clean training slices for STEPS steps of batch 32 (the M-step's settings: Adam 1e-3 ->
1e-4, clip 1, EMA 0.999, flips and 1-px shifts), then prints the mean and standard deviation of
8 unconditional samples (DDIM 32 and 128 steps) in their 6x6 corners, where every clean slice
is background (-2, std 0). This separates the network's capacity from EM: if a network cannot
produce a clean background from clean images in this budget, EM cannot either. It reads clean
images, so it is a diagnostic, never part of a run. Measured (2 cores, shared, 480 steps):
4x4 unshuffle: corner std 0.72 (DDIM 32; 6 min); 2x2 unshuffle: 0.21 (DDIM 32), 0.22 (DDIM 128; 15 min),
and its posterior mean on the held-out slices (MMPS, DDPM 32, CG 3, 4 samples) beats the zero-filled
image: R = 6 22.9 dB / SSIM 0.552 vs 21.9 / 0.508; R = 8 23.0 / 0.555 vs 20.9 / 0.484.
"""

import sys
import time

import torch
from diffusers.training_utils import EMAModel
from diffem.config import load_config
from diffem.tasks import get_task
from diffem.denoiser import Denoiser
from diffem.pipeline import DiffusionPriorPipeline
from diffem.scheduler import VEScheduler
from diffem.random import make_generators
torch.set_num_threads(1)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 480
factor = int(sys.argv[2]) if len(sys.argv) > 2 else 4
task = get_task(load_config("mri", "cpu", overrides=["output_dir=runs/mri-diagnose", f"network.factor={factor}"]))
x = task.clean_images("train")
net = task.backbone(0); den = Denoiser(net); net.train()
opt = torch.optim.Adam(net.parameters(), 1e-3); ema = EMAModel(net.parameters(), decay=0.999)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 + (0.1 - 1) * min(s / steps, 1))
g = torch.Generator().manual_seed(0); t0 = time.time()
for s in range(steps):
    idx = torch.randint(0, len(x), (32,), generator=g)
    loss = den.loss(task.augment(x[idx], g), g)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step(); sched.step(); ema.step(net.parameters())
    if s % 120 == 0: print(s, float(loss.detach()), f"{time.time()-t0:.0f}s", flush=True)
ema.copy_to(net.parameters()); net.eval()
pipe = DiffusionPriorPipeline(net, VEScheduler(method="ddim"))

for n in (32, 128):
    p = pipe(8, n, make_generators(0, indices=range(8)), progress=False).samples
    corner = torch.cat([p[:, :, :6, :6].flatten(), p[:, :, -6:, -6:].flatten()])
    print(f"factor {factor}, {steps} steps on clean slices, DDIM {n}: prior corner mean {float(corner.mean()):.2f} std {float(corner.std()):.3f}, range {float(p.min()):.2f} {float(p.max()):.2f}, {time.time()-t0:.0f}s", flush=True)
# The posterior of this clean-trained prior on the held-out slices (the run's evaluation at R = 6 and 8).
task.data["eval_accelerations"] = [6, 8]
out = task.evaluate(pipe, 0, 12345, progress=False)
for R, m in out["accelerations"].items():
    print(f"R = {R}: posterior mean PSNR {m['psnr_posterior_mean']:.2f} SSIM {m['ssim_posterior_mean']:.3f}; "
          f"zero-filled PSNR {m['psnr_zero_filled']:.2f} SSIM {m['ssim_zero_filled']:.3f}", flush=True)
