"""Reading a prepare_latents folder back: its meta (checked against the VAE) and latent pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.checkpoint import file_digest
from ldm.errors import DataError
from ldm.files import load_json

LATENTS_VERSION = 1


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
    """(scaled LR latent, scaled HR latent) of one split, as (C, d, h, w) tensors."""

    def __init__(self, latents: Path, split: str, scale: float) -> None:
        self.folder = folder = Path(latents) / split
        try:
            self.lr = np.load(folder / "lr.npy", mmap_mode="r")
            self.hr = np.load(folder / "hr.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{folder}: unreadable latents ({e}); rerun prepare_latents") from None
        self.scale = scale

    def __len__(self) -> int:
        return self.hr.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lr = torch.from_numpy(np.array(self.lr[i], dtype=np.float32)) * self.scale
        hr = torch.from_numpy(np.array(self.hr[i], dtype=np.float32)) * self.scale
        return lr, hr
