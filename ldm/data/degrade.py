"""Degradation model: simulate a low-quality volume from a high-quality one.

Used for the built-in phantom, the MNI152 template and users who only have HR volumes. Order of
operations: blur (per-axis Gaussian) -> downsample (area average over f-voxel blocks, f may be
non-integer) -> resample back onto the HR grid -> additive Gaussian or Rician noise. All
randomness comes from the ``seed``. A ``preset`` fills the fields a config leaves out (see
docs/design.md, "Degradation"); explicit fields override the preset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ldm.core.errors import UserError
from ldm.evaluate.filters import gaussian_blur

RESAMPLE_MODES = ("trilinear", "nearest")
NOISE_MODELS = ("gaussian", "rician", "none")


FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))  # Gaussian sigma = FWHM / 2.3548

# Each preset is a full set of fields; "custom" is the default of the shipped configs (the
# phantom's LR: blur 1 voxel, x2 down and back up, 8 % Rician noise).
PRESETS: dict[str, dict] = {
    "custom": {
        "blur_sigma": (1.0, 1.0, 1.0),
        "downsample": (2, 2, 2),
        "resample": "trilinear",
        "noise": "rician",
        "noise_sigma": 0.08,
    },
    # MRI denoising: a 1-voxel point-spread function (Gaussian, FWHM 1 voxel) + 4 % Rician noise
    "denoise": {
        "blur_sigma": (FWHM_TO_SIGMA, FWHM_TO_SIGMA, FWHM_TO_SIGMA),
        "downsample": (1, 1, 1),
        "resample": "trilinear",
        "noise": "rician",
        "noise_sigma": 0.04,
    },
    # thick slices: 1 x 1 x 3 voxels (1 x 1 x 3 mm at 1 mm), Gaussian slice profile of FWHM = the
    # slice thickness along the last axis (NIfTI z), 3-voxel averaging, trilinear back, 2 % noise
    "thick_slices": {
        "blur_sigma": (0.0, 0.0, 3.0 * FWHM_TO_SIGMA),
        "downsample": (1, 1, 3),
        "resample": "trilinear",
        "noise": "rician",
        "noise_sigma": 0.02,
    },
}


@dataclass(frozen=True)
class DegradeConfig:
    """How the LR volume is simulated from the HR one.

    ``preset`` (custom | denoise | thick_slices) fills every field left at None; a field given
    explicitly overrides the preset (so a saved config, which lists both, loads back the same).
    """

    preset: str = "custom"
    blur_sigma: tuple[float, float, float] | None = None  # per-axis sigma in voxels (0 = none)
    downsample: tuple[float, float, float] | None = None  # per-axis factor >= 1, resampled back
    resample: str | None = None  # "trilinear" | "nearest"
    noise: str | None = None  # "gaussian" | "rician" | "none"
    noise_sigma: float | None = None  # noise std as a fraction of the HR data range (max - min)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UserError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        sigma = self.blur_sigma
        if (
            not isinstance(sigma, (tuple, list))
            or len(sigma) != 3
            or not all(_is_real(s) and s >= 0 for s in sigma)
        ):
            raise UserError(f"blur_sigma must be 3 finite numbers >= 0, got {sigma!r}")
        factors = self.downsample
        if (
            not isinstance(factors, (tuple, list))
            or len(factors) != 3
            or not all(_is_real(f) and f >= 1 for f in factors)
        ):
            raise UserError(f"downsample must be 3 numbers >= 1, got {factors!r}")
        object.__setattr__(self, "blur_sigma", tuple(float(s) for s in sigma))
        # integer factors stay ints (exact block averaging); others are floats
        factors = tuple(int(f) if float(f).is_integer() else float(f) for f in factors)
        object.__setattr__(self, "downsample", factors)
        if self.resample not in RESAMPLE_MODES:
            raise UserError(
                f"resample must be one of {', '.join(RESAMPLE_MODES)}, got {self.resample!r}"
            )
        if self.noise not in NOISE_MODELS:
            raise UserError(f"noise must be one of {', '.join(NOISE_MODELS)}, got {self.noise!r}")
        if not _is_real(self.noise_sigma) or self.noise_sigma < 0:
            raise UserError(f"noise_sigma must be a finite number >= 0, got {self.noise_sigma!r}")


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _torch_mode(mode: str, ndim: int) -> str:
    """F.interpolate mode for our resample name; 'nearest-exact' is the centre-aligned nearest."""
    if mode not in RESAMPLE_MODES:
        raise UserError(f"resample mode must be one of {', '.join(RESAMPLE_MODES)}, got {mode!r}")
    if mode == "nearest":
        return "nearest-exact"
    return ("linear", "bilinear", "trilinear")[ndim - 1]


def resample_to(volume: np.ndarray, shape: tuple[int, ...], mode: str = "trilinear") -> np.ndarray:
    """Resample a 1-3D array onto a grid of ``shape`` covering the same extent (float32).

    Voxel centres follow F.interpolate with align_corners=False: output index j samples input
    coordinate (j + 1/2) * n_in / n_out - 1/2. 'trilinear' is linear along every axis; no
    anti-alias filter is applied, so this is meant for upsampling (LR onto the HR grid).
    """
    arr = np.asarray(volume)
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else ()
    if not 1 <= arr.ndim <= 3:
        raise UserError(f"resample_to expects a 1-3D volume, got shape {arr.shape}")
    if len(dims) != arr.ndim or any(
        not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1 for n in dims
    ):
        raise UserError(f"resample_to target shape must be {arr.ndim} integers >= 1, got {shape!r}")
    torch_mode = _torch_mode(mode, arr.ndim)
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if tuple(x.shape) == tuple(dims):
        return x.numpy().copy()
    align = False if torch_mode != "nearest-exact" else None
    y = F.interpolate(
        x[None, None], size=tuple(int(n) for n in dims), mode=torch_mode, align_corners=align
    )
    return y[0, 0].numpy()


def _axis_maps(n: int, f: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis of n voxels: (m, n) area averaging over f-voxel intervals and (n, m)
    resampling back, m = ceil(n / f), for any real f >= 1.

    LR voxel i averages the HR interval [i f, (i + 1) f) (fractional voxels by their overlap; the
    part past the edge repeats the edge voxel, as the integer path's replicate padding), so it
    sits at HR coordinate (i + 1/2) f - 1/2. Back: HR voxel j reads LR coordinate
    (j + 1/2) / f - 1/2 (F.interpolate's align_corners=False rule, clamped at the ends),
    linearly or from the nearest LR voxel.
    """
    m = math.ceil(n / f - 1e-9)
    down = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        a, b = i * f, (i + 1) * f
        for j in range(math.floor(a), math.ceil(b)):
            overlap = min(b, j + 1) - max(a, j)
            if overlap > 0:
                down[i, min(j, n - 1)] += overlap / f
    up = torch.zeros(n, m, dtype=torch.float64)
    for j in range(n):
        p = (j + 0.5) / f - 0.5
        if mode == "nearest":
            up[j, min(int(math.floor((j + 0.5) / f)), m - 1)] = 1.0
            continue
        p = min(max(p, 0.0), m - 1.0)
        i0 = min(int(math.floor(p)), m - 1)
        i1, w = min(i0 + 1, m - 1), p - i0
        up[j, i0] += 1.0 - w
        up[j, i1] += w
    return down.float(), up.float()


def _down_up(x: torch.Tensor, factors: tuple[float, float, float], mode: str) -> torch.Tensor:
    """Area-average ``x`` (D, H, W) over f-voxel blocks, then resample back to (D, H, W).

    Integer factors: the HR volume is edge-padded to a multiple of f; LR voxel i then sits at HR
    coordinate (i + 1/2) f - 1/2, which is exactly where F.interpolate(scale_factor=f,
    align_corners=False) puts it, so the round trip has no shift. The upsampled grid is cropped
    back to (D, H, W). Any non-integer factor: the same rule with fractional voxel overlaps, as
    one averaging and one resampling matrix per axis (``_axis_maps``).
    """
    shape = tuple(x.shape)
    if not all(isinstance(f, int) for f in factors):
        if mode not in RESAMPLE_MODES:
            raise UserError(
                f"resample mode must be one of {', '.join(RESAMPLE_MODES)}, got {mode!r}"
            )
        for axis, (n, f) in enumerate(zip(shape, factors)):
            if f == 1:
                continue
            down, up = _axis_maps(n, float(f), mode)
            y = torch.movedim(x, axis, -1)  # (..., n)
            y = (y @ down.T) @ up.T  # (..., m) -> (..., n)
            x = torch.movedim(y, -1, axis)
        return x.contiguous()
    torch_mode = _torch_mode(mode, 3)
    align = False if torch_mode != "nearest-exact" else None
    pad = []  # F.pad order: last axis first
    for n, f in zip(reversed(shape), reversed(factors)):
        pad += [0, -n % f]
    y = F.pad(x[None, None], pad, mode="replicate")  # (1, 1, D', H', W'), multiples of f
    y = F.avg_pool3d(y, kernel_size=factors, stride=factors)  # (1, 1, D'/fd, H'/fh, W'/fw)
    y = F.interpolate(
        y, scale_factor=tuple(float(f) for f in factors), mode=torch_mode, align_corners=align
    )
    return y[0, 0, : shape[0], : shape[1], : shape[2]]


def degrade(
    hr: np.ndarray, config: DegradeConfig, seed: int, data_range: float | None = None
) -> np.ndarray:
    """Simulated LR volume (float32, same shape as ``hr`` (D, H, W)); same seed -> same output.

    Noise std is noise_sigma * data_range, by default max(hr) - min(hr) (a block cut from a
    larger volume passes the whole volume's range so every block gets the same noise level).
    Gaussian: y = x + s n. Rician (magnitude of a complex signal with Gaussian noise in both
    channels): y = sqrt((x + s n1)^2 + (s n2)^2), with n, n1, n2 ~ N(0, 1) independent.
    """
    arr = np.asarray(hr)
    if arr.ndim != 3 or arr.size == 0:
        raise UserError(f"degrade expects a non-empty 3D volume (D, H, W), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise UserError("degrade expects a volume of finite numbers (found NaN/inf or non-numbers)")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"degrade seed must be an integer >= 0, got {seed!r}")
    if data_range is None:
        data_range = float(arr.max()) - float(arr.min())
    elif not _is_real(data_range) or data_range < 0:
        raise UserError(f"degrade data_range must be a finite number >= 0, got {data_range!r}")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))  # (D, H, W)
    if any(s > 0 for s in config.blur_sigma):
        x = gaussian_blur(x, config.blur_sigma)
    if any(f > 1 for f in config.downsample):
        x = _down_up(x, config.downsample, config.resample)
    out = x.numpy().astype(np.float32, copy=True)
    s = config.noise_sigma * data_range
    if config.noise == "none" or s == 0:
        return out
    rng = np.random.default_rng(seed)
    n1 = rng.standard_normal(out.shape, dtype=np.float32)
    if config.noise == "gaussian":
        return out + np.float32(s) * n1
    n2 = rng.standard_normal(out.shape, dtype=np.float32)
    return np.sqrt((out + np.float32(s) * n1) ** 2 + (np.float32(s) * n2) ** 2)
