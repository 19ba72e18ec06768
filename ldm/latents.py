"""prepare_latents: encode every LR/HR patch to its VAE mean latent, plus one scale factor.

Writes ``<data_dir>/latents/`` (or ``out_dir``):
  meta.json                        scale_factor (1 / std of the train HR latents), latent shape,
                                   and the VAE checkpoint's identity (path, step, sha256 digest)
  {train,val,test}/lr.npy, hr.npy  (N, C, d, h, w) float32 mean latents, NOT scaled
Later phases compare the identity with the VAE they use and refuse latents of another VAE.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ldm.checkpoint import file_digest
from ldm.config import save_config
from ldm.data.dataset import PatchPairs, load_manifest
from ldm.data.prepare import SPLITS
from ldm.distributed import pick_device
from ldm.errors import ConfigError, DataError
from ldm.io import load_json, save_json, staged_dir
from ldm.models import load_vae
from ldm.phase import PhaseResult
from ldm.train_vae import check_patch_size

log = logging.getLogger(__name__)
LATENTS_VERSION = 1


@dataclass(frozen=True)
class PrepareLatentsConfig:
    data_dir: Path = Path("dataset/vessel_phantom")
    vae_checkpoint: Path = Path("checkpoint/vae_denoise/best.pt")
    out_dir: Path | None = None  # default: <data_dir>/latents
    device: str = "auto"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def latents_dir(data_dir: Path, out_dir: Path | None) -> Path:
    return Path(out_dir) if out_dir is not None else Path(data_dir) / "latents"


def vae_identity(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    return {"path": str(path), "step": int(state["step"]), "digest": file_digest(path)}


@torch.no_grad()
def _encode_split(vae, pairs: PatchPairs, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    lr_out, hr_out = [], []
    for i in tqdm(range(0, len(pairs), batch_size), desc=f"encode {pairs.split}", unit="batch"):
        items = [pairs[j] for j in range(i, min(i + batch_size, len(pairs)))]
        lr = torch.stack([p[0] for p in items]).to(device)  # (B, 1, D, H, W)
        hr = torch.stack([p[1] for p in items]).to(device)
        lr_out.append(vae.encode(lr)[0].float().cpu().numpy())  # (B, C, d, h, w) means
        hr_out.append(vae.encode(hr)[0].float().cpu().numpy())
    return np.concatenate(lr_out), np.concatenate(hr_out)


def prepare_latents(cfg: PrepareLatentsConfig, *, overwrite: bool = False) -> PhaseResult:
    t0 = time.perf_counter()
    manifest = load_manifest(cfg.data_dir)
    device = pick_device(cfg.device)
    vae, state = load_vae(cfg.vae_checkpoint, device)
    check_patch_size(manifest["patch_size"], vae.config.downsample_factor, str(cfg.data_dir))
    out_dir = latents_dir(cfg.data_dir, cfg.out_dir)
    counts: dict[str, int] = {}
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        scale = None
        shape = None
        for split in SPLITS:
            pairs = PatchPairs(cfg.data_dir, split)
            (tmp / split).mkdir()
            if len(pairs) == 0:
                lr = hr = np.zeros((0, vae.config.latent_channels, 1, 1, 1), np.float32)
            else:
                lr, hr = _encode_split(vae, pairs, cfg.batch_size, device)
                shape = list(hr.shape[1:])
            if split == "train":
                scale = 1.0 / float(hr.std())
            np.save(tmp / split / "lr.npy", lr)
            np.save(tmp / split / "hr.npy", hr)
            counts[split] = len(pairs)
        meta = {
            "format_version": LATENTS_VERSION,
            "scale_factor": scale,
            "latent_shape": shape,
            "spatial_dims": vae.config.spatial_dims,
            "vae": vae_identity(Path(cfg.vae_checkpoint), state),
            "counts": counts,
        }
        save_json(meta, tmp / "meta.json")
        save_config(cfg, tmp / "config.yaml")
    seconds = time.perf_counter() - t0
    text = (
        f"prepare_latents -> {out_dir}: {counts} patches encoded in {seconds:.1f} s\n"
        f"latent shape {shape}, scale factor {scale:.4f} (1 / std of train HR latents), "
        f"VAE step {state['step']}"
    )
    return PhaseResult(text, f"latents {shape}, scale {scale:.3f}", meta, [out_dir])


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
        folder = Path(latents) / split
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
