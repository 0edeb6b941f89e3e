"""Where and in which precision a model runs: the ``runtime.device`` and ``runtime.precision`` choice, made once."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from training.config import ConfigError


@dataclass(frozen=True)
class Device:
    """Where and in which precision local training runs."""

    device: torch.device
    dtype: torch.dtype | None = None  # autocast dtype; None = full fp32

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def pick_device(device: str, precision: str) -> Device:
    """``auto`` uses CUDA when present, with bf16 autocast where the GPU supports it (else fp16)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device='cuda' but no CUDA device is visible; use runtime.device=auto or cpu")
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if dev.type == "cuda" else "fp32"
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError("runtime.precision='fp16' needs CUDA; use fp32 or bf16 on the CPU")
    return Device(dev, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision])
