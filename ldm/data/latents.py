"""Reading a prepare_latents folder back: its meta (checked against the VAE) and the pairs
(condition, latent) the diffusion trains on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.core.checkpoint import file_digest
from ldm.core.errors import DataError
from ldm.core.files import load_json
from ldm.data.dataset import PatchPairs
from ldm.nets.restorer import condition

LATENTS_VERSION = 2  # 2: restorer outputs + residual latents


def latents_dir(data_dir: Path, out_dir: Path | None) -> Path:
    return Path(out_dir) if out_dir is not None else Path(data_dir) / "latents"


def load_latents_meta(latents: Path, vae_checkpoint: Path) -> dict[str, Any]:
    """meta.json of a latents folder, checked against the VAE checkpoint in use."""
    path = Path(latents) / "meta.json"
    if not path.is_file():
        raise DataError(f"latents not found: {path} is missing; run prepare_latents first")
    meta = load_json(path, "latents meta", "rerun prepare_latents --overwrite")
    if meta.get("format_version") != LATENTS_VERSION:
        raise DataError(f"{path}: unsupported latents format; rerun prepare_latents --overwrite")
    vae_checkpoint = Path(vae_checkpoint)
    if not vae_checkpoint.is_file():
        raise DataError(f"VAE checkpoint not found: {vae_checkpoint}; run train_vae_pair first")
    if file_digest(vae_checkpoint) != meta["vae"]["digest"]:
        raise DataError(
            f"{path}: latents were made by another VAE checkpoint ({meta['vae']['path']}, step "
            f"{meta['vae']['step']}) than {vae_checkpoint}; rerun prepare_latents --overwrite"
        )
    return meta


class LatentPairs(Dataset):
    """(condition, scaled residual latent) of one split: the condition is space-to-depth of
    (mu, LR), (2 f^3, d, h, w), the latent (C, d, h, w)."""

    def __init__(self, latents: Path, split: str, scale: float, data_dir: Path,
                 factor: int) -> None:  # fmt: skip
        self.folder = folder = Path(latents) / split
        try:
            self.mu = np.load(folder / "mu.npy", mmap_mode="r")
            self.z = np.load(folder / "z.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{folder}: unreadable latents ({e}); rerun prepare_latents") from None
        self.lr = PatchPairs(data_dir, split).lr
        n = self.z.shape[0]
        if self.lr.shape[0] != n or tuple(self.mu.shape[2:]) != tuple(self.lr.shape[1:]):
            raise DataError(
                f"{folder}: {self.z.shape[0]} latents for {self.lr.shape[0]} patches of "
                f"{data_dir}; rerun prepare_latents --overwrite"
            )
        self.scale, self.factor = scale, factor

    def __len__(self) -> int:
        return self.z.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        mu = torch.from_numpy(np.array(self.mu[i], dtype=np.float32))[None]  # (1, 1, *sp)
        lr = torch.from_numpy(np.array(self.lr[i], dtype=np.float32)).reshape(mu.shape)
        cond = condition(mu, lr, self.factor)[0]
        z = torch.from_numpy(np.array(self.z[i], dtype=np.float32)) * self.scale
        return cond, z
