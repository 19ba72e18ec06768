"""prepare_latents: the restorer's output and the residual latent of every case, whole volumes.

Writes ``<data_dir>/latents/`` (or ``out_dir``):
  meta.json                      scale_factor (1 / std of the train latents inside the patches),
                                 latent shape of a patch, window, and the first stage's identity
                                 (path, step, sha256 digest)
  {train,val,test}/patches.json  [{"case", "start"}] the dataset's patches, each start on the
                                 factor f's grid (rounded down where it was not): latent at start/f
  {train,val,test}/<case>_mu.npy (1, D, H, W) float32 restorer output mu(LR) of the whole volume
                                 (sliding windows, as evaluate_psnr and predict_ldm)
  {train,val,test}/<case>_z.npy  (C, D/f, H/f, W/f) float32 mean latent of HR - mu, NOT scaled
data.latents.LatentPairs crops (mu, LR) and z of a patch on access, so the folder grows with the
volumes, not with the patches (docs/design.md, "Formats"). Later phases compare the identity
with the checkpoint they use and refuse latents of another.
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
from ldm.core.device import pick_device
from ldm.core.errors import ConfigError, DataError
from ldm.core.files import save_json, staged_dir
from ldm.core.outdir import check_out_dir, config_inputs
from ldm.core.registry import PhaseResult
from ldm.core.validate import check_min, check_range
from ldm.data.dataset import SPLITS, PatchPairs, check_patch_size, load_manifest
from ldm.data.latents import LATENTS_VERSION, latents_dir
from ldm.evaluate.volume_latents import case_arrays
from ldm.nets.loading import load_vae

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareLatentsConfig:
    data_dir: Path = Path("dataset/vessel_phantom")
    vae_checkpoint: Path = Path("checkpoint/vae_denoise/best.pt")
    out_dir: Path | None = None  # default: <data_dir>/latents
    device: str = "auto"
    batch_size: int = 4  # windows per batch
    # the sliding windows over each whole volume (shrunk to smaller volumes): predict_ldm's
    # defaults, so that mu is the condition inference computes
    window: tuple[int, int, int] = (64, 64, 64)
    overlap: float = 0.0

    def __post_init__(self) -> None:
        check_min("batch_size", self.batch_size, 1)
        check_range("overlap", self.overlap, 0, 1, hi_open=True)
        if len(self.window) != 3 or min(self.window) < 1:
            raise ConfigError(f"window must be 3 sizes >= 1, got {tuple(self.window)}")


def vae_identity(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    return {"path": str(path), "step": int(state["step"]), "digest": file_digest(path)}


@torch.no_grad()
def _encode_split(
    vae, pairs: PatchPairs, cfg: PrepareLatentsConfig, device, folder: Path
) -> tuple[list[dict], int, np.ndarray]:
    """Write ``<case>_mu.npy`` and ``<case>_z.npy`` of every case with patches in the split into
    ``folder``. Returns the patch index on the f grid, how many starts were rounded down to it,
    and (count, sum, sum of squares) of the latent values inside the patches (each cell as often
    as patches hold it: the moments of the per-patch latents, for the scale)."""
    index = getattr(pairs.lr, "index", None)
    if index is None:
        raise DataError(f"{cfg.data_dir}: a dataset of the earlier layout (patch arrays); rerun "
                        "prepare_data --overwrite")  # fmt: skip
    f = vae.config.downsample_factor
    ls = [p // f for p in pairs.lr.size]
    lat_index = [{"case": e["case"], "start": [int(s) // f * f for s in e["start"]]}
                 for e in index]  # fmt: skip
    moved = sum(a["start"] != list(b["start"]) for a, b in zip(lat_index, index))
    stats = np.zeros(3)
    starts: dict[str, list[list[int]]] = {}
    for e in lat_index:
        starts.setdefault(e["case"], []).append(e["start"])
    for case in tqdm(starts, desc=f"encode {pairs.split}", unit="case"):
        lr, hr = pairs.lr.volume(case), pairs.hr.volume(case)
        mu, z = case_arrays(vae, lr, hr, cfg.window, overlap=cfg.overlap,
                            batch_size=cfg.batch_size, device=device)  # fmt: skip
        np.save(folder / f"{case}_mu.npy", mu[None])
        np.save(folder / f"{case}_z.npy", z)
        cover = np.zeros(z.shape[1:], np.float64)  # patches holding each latent cell
        for start in starts[case]:
            cover[tuple(slice(s // f, s // f + n) for s, n in zip(start, ls))] += 1
        z64 = z.astype(np.float64)
        stats += [cover.sum() * z.shape[0], (z64 * cover).sum(), (z64**2 * cover).sum()]
    return lat_index, moved, stats


def prepare_latents(cfg: PrepareLatentsConfig, *, overwrite: bool = False) -> PhaseResult:
    t0 = time.perf_counter()
    out_dir = latents_dir(cfg.data_dir, cfg.out_dir)
    inputs = config_inputs(cfg)
    check_out_dir(out_dir, "prepare_latents", overwrite, inputs)
    manifest = load_manifest(cfg.data_dir)
    device = pick_device(cfg.device)
    vae, state = load_vae(cfg.vae_checkpoint, device)
    check_patch_size(manifest["patch_size"], vae.config.window_multiple, str(cfg.data_dir))
    window = tuple(cfg.window)
    if any(w % vae.config.window_multiple for w in window):
        raise ConfigError(f"window {window} must be 3 sizes divisible by "
                          f"{vae.config.window_multiple} (the first stage's factor); change "
                          "window")  # fmt: skip
    out_dir = latents_dir(cfg.data_dir, cfg.out_dir)
    counts: dict[str, int] = {}
    with staged_dir(out_dir, overwrite, phase="prepare_latents", inputs=inputs) as tmp:
        f = vae.config.downsample_factor
        shape = [vae.config.latent_channels, *(p // f for p in manifest["patch_size"])]
        moved, stats = 0, np.zeros(3)
        for split in SPLITS:
            pairs = PatchPairs(cfg.data_dir, split)
            (tmp / split).mkdir()
            index, n_moved, split_stats = _encode_split(vae, pairs, cfg, device, tmp / split)
            save_json(index, tmp / split / "patches.json")
            if split == "train":
                stats = split_stats
            counts[split], moved = len(index), moved + n_moved
        if stats[0] == 0:
            raise DataError(f"{cfg.data_dir}: no training patches to encode; rerun prepare_data "
                            "with more cases or a lower patches.min_foreground")  # fmt: skip
        mean = stats[1] / stats[0]
        scale = 1.0 / float(np.sqrt(max(stats[2] / stats[0] - mean**2, 1e-30)))
        meta = {
            "format_version": LATENTS_VERSION,
            "scale_factor": scale,
            "latent_shape": shape,
            "spatial_dims": vae.config.spatial_dims,
            "factor": f,
            "vae": vae_identity(Path(cfg.vae_checkpoint), state),
            "counts": counts,
            "window": list(window),
            "overlap": cfg.overlap,
            "starts_rounded": moved,  # patch starts moved down onto the f grid
        }
        save_json(meta, tmp / "meta.json")
        save_config(cfg, tmp / "config.yaml")
    seconds = time.perf_counter() - t0
    rounded = f", {moved} patch starts rounded down to multiples of {f}" if moved else ""
    text = (
        f"prepare_latents -> {out_dir}: whole volumes encoded in {seconds:.1f} s "
        f"(windows of up to {'x'.join(map(str, window))}, overlap {cfg.overlap}), cropped per "
        f"patch: {counts}{rounded}\n"
        f"latent shape {shape}, scale factor {scale:.4f} (1 / std of the train residual latents), "
        f"VAE step {state['step']}"
    )
    return PhaseResult(text, f"latents {shape}, scale {scale:.3f}", meta, [out_dir])
