"""A real T1-weighted brain for the offline MRI profile: the MNI152 2009 template of nilearn.

nilearn ships the template inside its wheel (no download). It is the symmetric template: its
left half mirrors its right half voxel for voxel, so a block and its mirror image would be the
same data and one could land in training and the other in test. Only one hemisphere is used
(``hemisphere``, up to and including the midline). That half is tiled into non-overlapping
blocks (regions) on a regular grid centred in it; blocks that are mostly background are
skipped, and each kept block is one case, so the usual split by case never puts a voxel on two
sides. The LR side is simulated per block by ``degrade`` (with the whole template's intensity
range, so every block gets the same noise level). See docs/design.md, "MNI152 source".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ldm.core.errors import ConfigError, DataError
from ldm.core.validate import check_choice, check_min, check_range
from ldm.data.degrade import DegradeConfig, degrade
from ldm.data.io import VolumeMeta
from ldm.data.sources import Case

INSTALL_HINT = 'pip install -e ".[mri]"'
HEMISPHERES = ("left", "right", "both")


@dataclass(frozen=True)
class MNI152Source:
    """``source: mni152``: cases are blocks of the nilearn MNI152 2009 T1 template."""

    resolution: int = 1  # mm: 1 (197 x 233 x 189 voxels) or 2
    hemisphere: str = "left"  # left | right: x up to / from the midline; both: whole volume
    block: tuple[int, int, int] = (40, 40, 40)  # case size in voxels (array axes x, y, z)
    brain_threshold: float = 0.1  # a voxel is brain above this fraction of the template max
    min_brain: float = 0.2  # blocks with a smaller brain fraction are skipped

    def __post_init__(self) -> None:
        if self.resolution not in (1, 2):
            raise ConfigError(f"resolution must be 1 or 2 (mm), got {self.resolution!r}")
        check_choice("hemisphere", self.hemisphere, HEMISPHERES)
        for i, b in enumerate(self.block):
            check_min(f"block[{i}]", b, 1)
        check_range("brain_threshold", self.brain_threshold, 0.0, 1.0, hi_open=True)
        check_range("min_brain", self.min_brain, 0.0, 1.0)


def load_template(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(volume float32 in nilearn's array order x, y, z; 4 x 4 affine) of the T1 template."""
    try:
        from nilearn.datasets import load_mni152_template
    except ImportError:
        raise DataError(
            f"source mni152 needs nilearn, which is not installed: run {INSTALL_HINT}"
        ) from None
    img = load_mni152_template(resolution=resolution)
    return np.asarray(img.get_fdata(), dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def hemisphere_range(volume: np.ndarray, affine: np.ndarray, hemisphere: str) -> tuple[int, int]:
    """[start, stop) along array axis 0 (world x, RAS: low index = left) of the chosen half;
    both halves include the midline voxel (world x = 0)."""
    n = volume.shape[0]
    if hemisphere == "both":
        return 0, n
    mid = int(round(-affine[0, 3] / affine[0, 0]))  # index of world x = 0
    if not 0 <= mid < n:
        raise DataError(f"mni152: the midline x = 0 is outside the template (index {mid})")
    left = affine[0, 0] > 0  # low indices are left when x grows with the index
    return (0, mid + 1) if (hemisphere == "left") == left else (mid, n)


def block_starts(volume: np.ndarray, src: MNI152Source) -> list[tuple[tuple[int, int, int], float]]:
    """Corners of the kept blocks and their brain fraction: a grid of whole, non-overlapping
    blocks centred in the volume, without the blocks below ``min_brain``."""
    shape = volume.shape
    if any(b > n for b, n in zip(src.block, shape)):
        raise ConfigError(
            f"mni152.block {tuple(src.block)} is larger than the template {shape}; "
            "use a smaller block"
        )
    brain = volume > src.brain_threshold * float(volume.max())
    axes = []
    for n, b in zip(shape, src.block):
        offset = (n % b) // 2
        axes.append(range(offset, offset + (n // b) * b, b))
    kept = []
    for z in axes[0]:
        for y in axes[1]:
            for x in axes[2]:
                sl = (slice(z, z + src.block[0]), slice(y, y + src.block[1]),
                      slice(x, x + src.block[2]))  # fmt: skip
                frac = float(brain[sl].mean())
                if frac >= src.min_brain:
                    kept.append(((z, y, x), frac))
    return kept


def mni152_cases(src: MNI152Source, deg: DegradeConfig, seed: int) -> tuple[int, Iterator[Case]]:
    """(number of cases, iterator of cases); the template is loaded once, before counting."""
    volume, affine = load_template(src.resolution)
    x0, x1 = hemisphere_range(volume, affine, src.hemisphere)
    starts = [((a + x0, b, c), frac) for (a, b, c), frac in block_starts(volume[x0:x1], src)]
    if len(starts) < 2:
        raise ConfigError(
            f"mni152: only {len(starts)} block(s) of {tuple(src.block)} have a brain fraction "
            f">= {src.min_brain}; use a smaller mni152.block or a lower mni152.min_brain"
        )
    data_range = float(volume.max()) - float(volume.min())
    spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))

    def cases() -> Iterator[Case]:
        for i, (start, frac) in enumerate(starts):
            sl = tuple(slice(s, s + b) for s, b in zip(start, src.block))
            hr = np.ascontiguousarray(volume[sl])
            lr = degrade(hr, deg, seed * 100_003 + i, data_range=data_range)
            block_affine = affine.copy()  # the block's first voxel in world (mm) coordinates
            block_affine[:3, 3] = affine[:3, :3] @ np.asarray(start, float) + affine[:3, 3]
            meta = VolumeMeta("nifti", spacing, tuple(block_affine[:3, 3].tolist()),
                              affine=block_affine.tolist())  # fmt: skip
            name = f"mni152_{start[0]:03d}_{start[1]:03d}_{start[2]:03d}"
            origin = {"template": f"MNI152 2009 T1, {src.resolution} mm (nilearn)",
                      "hemisphere": src.hemisphere, "start": str(list(start)),
                      "brain_fraction": f"{frac:.3f}"}  # fmt: skip
            yield Case(name, lr, hr, meta, origin)

    return len(starts), cases()
