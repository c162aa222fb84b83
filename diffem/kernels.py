r"""Kernel options of the networks (``kernels.*`` in the config, :class:`diffem.config.KernelConfig`).

How the same maths runs on a device: TF32 for CUDA matmuls and convolutions, channels_last
weights, ``torch.compile`` of the denoiser, a fused Adam and a multi-tensor (foreach) EMA. The
M-step (:mod:`diffem.em.mstep`) and the E-step (:mod:`diffem.em.estep`) apply them; the default
of every option is off, the plain float32 path.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["set_matmul_precision", "prepare_network", "compiled"]


def set_matmul_precision(cfg) -> None:
    """TF32 on or off for CUDA matmuls and cuDNN convolutions (``kernels.tf32``); the CPU ignores both."""
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
    torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)


def prepare_network(module: nn.Module, cfg) -> nn.Module:
    """``module`` with its 4-D weights in channels_last memory format when ``kernels.channels_last``
    (in place, as :meth:`torch.nn.Module.to` does; other parameters are untouched)."""
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def compiled(module: nn.Module, cfg) -> nn.Module:
    """``torch.compile(module, backend=kernels.compile)``, or ``module`` itself when the option is off.

    The compiled module shares its parameters with ``module``: train and save ``module``.
    """
    if not cfg.compile:
        return module
    return torch.compile(module, backend=cfg.compile)
