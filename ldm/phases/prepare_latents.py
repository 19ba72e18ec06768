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
from tqdm import tqdm

from ldm.checkpoint import file_digest
from ldm.config import save_config
from ldm.data.dataset import SPLITS, PatchPairs, check_patch_size, load_manifest
from ldm.data.latents import LATENTS_VERSION, latents_dir
from ldm.distributed import pick_device
from ldm.files import save_json, staged_dir
from ldm.nets.loading import load_vae
from ldm.pipeline import PhaseResult
from ldm.validate import check_min

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareLatentsConfig:
    data_dir: Path = Path("dataset/vessel_phantom")
    vae_checkpoint: Path = Path("checkpoint/vae_denoise/best.pt")
    out_dir: Path | None = None  # default: <data_dir>/latents
    device: str = "auto"
    batch_size: int = 16

    def __post_init__(self) -> None:
        check_min("batch_size", self.batch_size, 1)


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
