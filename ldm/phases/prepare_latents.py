"""prepare_latents: the restorer's output and the residual latent of every patch pair.

Writes ``<data_dir>/latents/`` (or ``out_dir``):
  meta.json                      scale_factor (1 / std of the train latents), latent shape,
                                 and the first stage's identity (path, step, sha256 digest)
  {train,val,test}/mu.npy        (N, 1, D, H, W) float32 restorer outputs mu(LR) (the condition,
                                 with the dataset's LR patches)
  {train,val,test}/z.npy         (N, C, d, h, w) float32 mean latents of HR - mu, NOT scaled
Later phases compare the identity with the checkpoint they use and refuse latents of another.
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

from ldm.core.checkpoint import file_digest
from ldm.core.config import save_config
from ldm.core.distributed import pick_device
from ldm.core.files import save_json, staged_dir
from ldm.core.pipeline import PhaseResult
from ldm.core.validate import check_min
from ldm.data.dataset import SPLITS, PatchPairs, check_patch_size, load_manifest
from ldm.data.latents import LATENTS_VERSION, latents_dir
from ldm.nets.loading import load_vae

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
    """(mu, z): restorer outputs (N, 1, D, H, W) and mean latents of HR - mu (N, C, d, h, w)."""
    mu_out, z_out = [], []
    for i in tqdm(range(0, len(pairs), batch_size), desc=f"encode {pairs.split}", unit="batch"):
        items = [pairs[j] for j in range(i, min(i + batch_size, len(pairs)))]
        lr = torch.stack([p[0] for p in items]).to(device)  # (B, 1, D, H, W)
        hr = torch.stack([p[1] for p in items]).to(device)
        mu = vae.restore(lr)
        mu_out.append(mu.float().cpu().numpy())
        z_out.append(vae.encode(hr - mu)[0].float().cpu().numpy())
    return np.concatenate(mu_out), np.concatenate(z_out)


def prepare_latents(cfg: PrepareLatentsConfig, *, overwrite: bool = False) -> PhaseResult:
    t0 = time.perf_counter()
    manifest = load_manifest(cfg.data_dir)
    device = pick_device(cfg.device)
    vae, state = load_vae(cfg.vae_checkpoint, device)
    check_patch_size(manifest["patch_size"], vae.config.window_multiple, str(cfg.data_dir))
    out_dir = latents_dir(cfg.data_dir, cfg.out_dir)
    counts: dict[str, int] = {}
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        scale = None
        shape = None
        for split in SPLITS:
            pairs = PatchPairs(cfg.data_dir, split)
            (tmp / split).mkdir()
            if len(pairs) == 0:
                mu = np.zeros((0, 1, *manifest["patch_size"]), np.float32)
                z = np.zeros((0, vae.config.latent_channels, 1, 1, 1), np.float32)
            else:
                mu, z = _encode_split(vae, pairs, cfg.batch_size, device)
                shape = list(z.shape[1:])
            if split == "train":
                scale = 1.0 / float(z.std())
            np.save(tmp / split / "mu.npy", mu)
            np.save(tmp / split / "z.npy", z)
            counts[split] = len(pairs)
        meta = {
            "format_version": LATENTS_VERSION,
            "scale_factor": scale,
            "latent_shape": shape,
            "spatial_dims": vae.config.spatial_dims,
            "factor": vae.config.downsample_factor,
            "vae": vae_identity(Path(cfg.vae_checkpoint), state),
            "counts": counts,
        }
        save_json(meta, tmp / "meta.json")
        save_config(cfg, tmp / "config.yaml")
    seconds = time.perf_counter() - t0
    text = (
        f"prepare_latents -> {out_dir}: {counts} patches encoded in {seconds:.1f} s\n"
        f"latent shape {shape}, scale factor {scale:.4f} (1 / std of the train residual latents), "
        f"VAE step {state['step']}"
    )
    return PhaseResult(text, f"latents {shape}, scale {scale:.3f}", meta, [out_dir])
