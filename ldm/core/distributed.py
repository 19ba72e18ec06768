"""Device choice and torchrun (DDP) plumbing: RANK/WORLD_SIZE from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ldm.core.errors import ConfigError, UserError

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


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    device = pick_device(device_name, info.local_rank)
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def raise_on_all_ranks(info: DistInfo, error: Exception | None) -> None:
    """Rank 0's error (or None), raised on every rank: a check only rank 0 makes stops all."""
    message = [str(error) if error is not None else None]
    if info.enabled and dist.is_initialized():
        dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise UserError(f"{message[0]} (rank 0's error)")
