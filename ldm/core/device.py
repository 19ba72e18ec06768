"""Which device a phase runs on: ``device: auto`` = cuda > mps > cpu."""

from __future__ import annotations

import os

import torch

from ldm.core.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' = cuda > mps > cpu; an unavailable explicit device is a ConfigError.

    ``local_rank`` defaults to torchrun's LOCAL_RANK, so every process of a DDP run uses its own
    GPU wherever it asks for a device.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use device: auto")
    if name == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)
