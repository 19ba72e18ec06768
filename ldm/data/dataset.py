"""Reading a prepare_data folder back: the manifest, patch pairs, whole test volumes."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.core.errors import ConfigError, DataError
from ldm.core.files import load_json
from ldm.data.io import VolumeMeta

MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")


def load_manifest(dataset_dir: Path) -> dict[str, Any]:
    """The dataset's manifest.json; a missing or foreign folder says to run prepare_data."""
    path = Path(dataset_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(
            f"dataset not found: {path} is missing; run prepare_data first "
            f"(or point data_dir at a prepared dataset)"
        )
    manifest = load_json(path, "manifest", "rerun prepare_data --overwrite")
    if not isinstance(manifest, dict):
        raise DataError(
            f"{path}: not a dataset manifest (a JSON {type(manifest).__name__}, not an object); "
            f"rerun prepare_data --overwrite"
        )
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise DataError(
            f"{path}: dataset format {manifest.get('format_version')} but this version reads "
            f"{MANIFEST_VERSION}; rerun prepare_data --overwrite"
        )
    return manifest


def check_patch_size(patch: list[int], f: int, where: str) -> None:
    if any(p % f for p in patch):
        raise ConfigError(
            f"{where}: patch size {tuple(patch)} is not divisible by the VAE downsampling factor "
            f"{f}; change model.channels or the patch size in prepare_data"
        )


def _load_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} is missing from the dataset; rerun prepare_data --overwrite")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: corrupt array ({e}); rerun prepare_data --overwrite") from None


class VolumeCrops(abc.ABC):
    """Crops of per-case whole volumes, taken on access: indexes like the stacked (N, ...)
    array it stands for (an int gives one crop, a slice a stacked copy). ``index`` lists each
    crop's case and start; a subclass loads a case's (memory-mapped) volume and cuts one crop
    from it. Each volume is loaded once."""

    def __init__(self, index: list[dict]) -> None:
        self.index = index
        self._vols: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    def volume(self, case: str) -> np.ndarray:
        """The whole memory-mapped volume of ``case``."""
        if case not in self._vols:
            self._vols[case] = self._load(case)
        return self._vols[case]

    def __getitem__(self, i: int | slice) -> np.ndarray:
        if isinstance(i, slice):  # a stacked copy, as the array would give
            return np.stack([self[j] for j in range(*i.indices(len(self)))])
        entry = self.index[int(i)]
        return self._crop(self.volume(entry["case"]), entry)

    @abc.abstractmethod
    def _load(self, case: str) -> np.ndarray:
        """The whole volume of ``case`` (memory-mapped)."""

    @abc.abstractmethod
    def _crop(self, vol: np.ndarray, entry: dict) -> np.ndarray:
        """The crop of index ``entry`` out of its case's volume."""


class PatchArray(VolumeCrops):
    """The patches of one split and side (lr or hr), cropped on access from the memory-mapped
    whole (D, H, W) volumes of their cases (prepare_latents encodes those whole).

    prepare_data keeps each normalised volume once plus the patch positions (patches.json), so
    the dataset grows with the volumes, not with volume / stride^3 (docs/design.md, "Formats").
    """

    def __init__(self, dataset_dir: Path, manifest: dict, index: list[dict], side: str) -> None:
        super().__init__(index)
        self.dir, self.side = Path(dataset_dir), side
        self.size = tuple(manifest["patch_size"])
        self.cases = manifest["cases"]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.size)

    def _load(self, case: str) -> np.ndarray:
        info = self.cases.get(case, {}).get("volume")
        if info is None:
            raise DataError(f"{self.dir}: case {case!r} has no volume in the manifest; "
                            "rerun prepare_data --overwrite")  # fmt: skip
        return _load_array(self.dir / info[self.side])

    def _crop(self, vol: np.ndarray, entry: dict) -> np.ndarray:
        return vol[tuple(slice(a, a + s) for a, s in zip(entry["start"], self.size))]


class PatchPairs(Dataset):
    """(lr, hr) patch pairs of one split as float tensors (1, *patch): cropped from the
    memory-mapped volumes (or, in datasets written before that, memory-mapped patch arrays)."""

    def __init__(self, dataset_dir: Path, split: str) -> None:
        dataset_dir = Path(dataset_dir)
        manifest = load_manifest(dataset_dir)
        if split not in manifest["splits"]:
            raise DataError(f"{dataset_dir}: no split {split!r} in the manifest")
        info = manifest["splits"][split]
        if "lr" in info:  # patch arrays of the earlier layout
            self.lr = _load_array(dataset_dir / info["lr"])
            self.hr = _load_array(dataset_dir / info["hr"])
        else:
            index = load_json(dataset_dir / info["index"], "patch index",
                              "rerun prepare_data --overwrite")  # fmt: skip
            self.lr = PatchArray(dataset_dir, manifest, index, "lr")
            self.hr = PatchArray(dataset_dir, manifest, index, "hr")
        if self.lr.shape != self.hr.shape:
            raise DataError(
                f"{dataset_dir}/{split}: LR patches {self.lr.shape} != HR {self.hr.shape}"
            )
        self.split = split

    def __len__(self) -> int:
        return self.lr.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lr = torch.from_numpy(np.array(self.lr[i], dtype=np.float32))[None]  # (1, D, H, W)
        hr = torch.from_numpy(np.array(self.hr[i], dtype=np.float32))[None]
        return lr, hr


@dataclass
class VolumeCase:
    """One whole test volume pair, normalised, with the map back to original units."""

    name: str
    lr: np.ndarray  # (D, H, W) normalised
    hr: np.ndarray | None  # None: an input without a reference (predict_ldm --input)
    low: float
    high: float
    meta: VolumeMeta

    def to_original(self, x: np.ndarray) -> np.ndarray:
        """Normalised -> original intensity units (inverse of the LR percentile map)."""
        return x * (self.high - self.low) + self.low

    def to_model(self, x: np.ndarray) -> np.ndarray:
        """A volume on this case's grid -> the grid the models run on (here the same)."""
        return x

    @cached_property
    def model_lr(self) -> np.ndarray:
        """``to_model(lr)``, resampled once per case (the LDM, the baselines and the GIF)."""
        return self.to_model(self.lr)

    def from_model(self, x: np.ndarray) -> np.ndarray:
        """A model output -> this case's grid (inverse of ``to_model``; here the identity)."""
        return x


def checked_test_cases(
    dataset_dir: Path, manifest: dict[str, Any], names: Sequence[str] | None = None
) -> list[str]:
    """``names`` (all test cases when None), checked: an unknown name is an error listing the
    test cases of ``dataset_dir``."""
    test = [n for n, c in manifest["cases"].items() if c["split"] == "test"]
    for n in names or []:
        if n not in test:
            raise DataError(f"{dataset_dir}: no test case {n!r}; test cases: {', '.join(test)}")
    return list(names) if names is not None else test


def iter_test_cases(dataset_dir: Path, names: list[str] | None = None) -> Iterator[VolumeCase]:
    """Whole test volumes, one at a time; unknown names are an error listing the valid ones."""
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    for name in checked_test_cases(dataset_dir, manifest, names or None):
        c = manifest["cases"][name]
        yield VolumeCase(
            name,
            np.array(_load_array(dataset_dir / c["volume"]["lr"])),  # a writable copy
            np.array(_load_array(dataset_dir / c["volume"]["hr"])),
            c["norm"]["low"],
            c["norm"]["high"],
            VolumeMeta.from_dict(c["meta"]),
        )


@dataclass(frozen=True)
class AugmentConfig:
    """Random transforms applied identically to LR and HR of a training batch (all off = none).

    ``flips``: each spatial axis flipped with p = 0.5; ``permute``: a random order of the spatial
    axes (only among axes of equal size); ``scale``/``shift``: per-sample intensity map
    ``x -> a x + b`` with ``a = exp(U(-scale, scale))``, ``b ~ U(-shift, shift)``, the same for
    LR and HR so the pair stays consistent and the network learns to be intensity-equivariant.
    """

    flips: bool = False
    permute: bool = False
    scale: float = 0.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.scale <= 2 and 0 <= self.shift <= 1):
            raise ConfigError("augment.scale must be in [0, 2] and augment.shift in [0, 1]")

    @property
    def enabled(self) -> bool:
        return self.flips or self.permute or self.scale > 0 or self.shift > 0


def augment_pair(
    lr: torch.Tensor, hr: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, *spatial)`` LR/HR batch -> the same batch randomly flipped/permuted/rescaled.

    Draws from ``generator`` (the training loop's), so a resumed run sees the same batches.
    """
    if not cfg.enabled:
        return lr, hr
    dev = lr.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=dev)

    sd = lr.ndim - 2
    if cfg.permute:
        order = torch.randperm(sd, generator=generator, device=dev).tolist()
        sizes = lr.shape[2:]
        if all(sizes[o] == sizes[i] for i, o in enumerate(order)):
            perm = [0, 1, *(2 + o for o in order)]
            lr, hr = lr.permute(perm), hr.permute(perm)
    if cfg.flips:
        axes = [2 + i for i, u in enumerate(uniform(sd).tolist()) if u < 0.5]
        if axes:
            lr, hr = lr.flip(axes), hr.flip(axes)
    if cfg.scale > 0 or cfg.shift > 0:
        b = lr.shape[0]
        shape = (b,) + (1,) * (lr.ndim - 1)
        a = torch.exp((2 * uniform(b) - 1) * cfg.scale).view(shape)
        s = ((2 * uniform(b) - 1) * cfg.shift).view(shape)
        lr, hr = a * lr + s, a * hr + s
    return lr.contiguous(), hr.contiguous()
