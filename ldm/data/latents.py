"""Reading a prepare_latents folder back: its meta (checked against the VAE) and the pairs
(condition, latent) the diffusion trains on, cropped from each case's whole-volume restorer
output and residual latent (docs/design.md, "Formats", latents/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.core.checkpoint import file_digest
from ldm.core.errors import DataError
from ldm.core.files import load_json
from ldm.data.dataset import PatchArray, VolumeCrops, load_manifest
from ldm.nets.restorer import condition

# 3: whole-volume mu and z per case + the patch index (crops on access); 2: one mu and z per
# patch (a folder of it is refused: rerun prepare_latents --overwrite)
LATENTS_VERSION = 3


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


def load_latent_index(folder: Path) -> list[dict[str, Any]]:
    """``<latents>/<split>/patches.json``: [{"case", "start"}] per patch, ``start`` the image
    corner on the factor's grid (the latent corner is start / f)."""
    return load_json(Path(folder) / "patches.json", "latents patch index",
                     "rerun prepare_latents --overwrite")  # fmt: skip


class CaseCrops(VolumeCrops):
    """Crops of one split's whole-volume arrays ``<case>_<name>.npy`` (C, *grid), memory-mapped:
    item i is the (C, *size / factor) block at ``start / factor`` of patch i (``factor`` 1 for
    mu, f for z); a slice gives them stacked, as the (N, C, ...) array it stands for."""

    def __init__(self, folder: Path, index: list[dict], name: str, size: list[int],
                 factor: int) -> None:  # fmt: skip
        super().__init__(index)
        self.folder, self.name, self.factor = Path(folder), name, factor
        self.size = tuple(s // factor for s in size)

    def _load(self, case: str) -> np.ndarray:
        path = self.folder / f"{case}_{self.name}.npy"
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable latents ({e}); rerun prepare_latents "
                            "--overwrite") from None  # fmt: skip

    def _crop(self, vol: np.ndarray, entry: dict) -> np.ndarray:
        lo = [int(s) // self.factor for s in entry["start"]]
        crop = vol[(slice(None), *(slice(a, a + s) for a, s in zip(lo, self.size)))]
        if crop.shape[1:] != self.size:
            raise DataError(f"{self.folder}: {entry['case']}_{self.name}.npy {vol.shape} does not "
                            f"hold the patch at {entry['start']}; rerun prepare_latents "
                            "--overwrite")  # fmt: skip
        return crop


class LatentPairs(Dataset):
    """(condition, scaled residual latent) of one split, cropped on access from each case's
    whole-volume arrays at the patch's corner: the condition is space-to-depth of (mu, LR),
    (2 f^3, d, h, w), the latent (C, d, h, w). ``mu``, ``z``, ``lr`` and ``hr`` index like the
    per-patch arrays (N, C, ...) they stand for; ``images`` gives (LR, HR) tensors like
    :class:`PatchPairs`, at the same corners."""

    def __init__(self, latents: Path, split: str, scale: float, data_dir: Path,
                 factor: int) -> None:  # fmt: skip
        self.folder = folder = Path(latents) / split
        manifest = load_manifest(data_dir)
        index = load_latent_index(folder)
        n = manifest["splits"].get(split, {}).get("num_patches")
        if len(index) != n or "index" not in manifest["splits"][split]:
            raise DataError(f"{folder}: {len(index)} latent patches for {n} patches of "
                            f"{data_dir}; rerun prepare_latents --overwrite")  # fmt: skip
        size = manifest["patch_size"]
        self.mu = CaseCrops(folder, index, "mu", size, 1)  # (1, *patch)
        self.z = CaseCrops(folder, index, "z", size, factor)  # (C, *patch / f)
        self.lr = PatchArray(data_dir, manifest, index, "lr")  # (*patch)
        self.hr = PatchArray(data_dir, manifest, index, "hr")
        self.images = _ImagePairs(self.lr, self.hr)
        self.scale, self.factor = scale, factor

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        mu = torch.from_numpy(np.array(self.mu[i], dtype=np.float32))[None]  # (1, 1, *sp)
        lr = torch.from_numpy(np.array(self.lr[i], dtype=np.float32)).reshape(mu.shape)
        cond = condition(mu, lr, self.factor)[0]
        z = torch.from_numpy(np.array(self.z[i], dtype=np.float32)) * self.scale
        return cond, z


class _ImagePairs(Dataset):
    """(LR, HR) patch tensors (1, *patch) at the latents' corners (train_diffusion's
    validation images)."""

    def __init__(self, lr: PatchArray, hr: PatchArray) -> None:
        self.lr, self.hr = lr, hr

    def __len__(self) -> int:
        return len(self.lr)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.array(self.lr[i], dtype=np.float32))[None],
                torch.from_numpy(np.array(self.hr[i], dtype=np.float32))[None])  # fmt: skip
