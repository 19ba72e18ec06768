"""Built-in vessel phantom: random branching tubular trees on a softly textured background.

Angiography-like volumes (bright vessels, dark background) used as the pipeline's default data
set. Each tree enters the volume through one of its faces and branches ``branch_levels - 1`` times
(bifurcations); every branch is a smooth random walk whose radius tapers along it, and children
start thinner than their parent. Tubes are drawn with partial-volume edges,
occupancy = clamp(r - d + 1/2, 0, 1) for a voxel centre at distance d from the centre line.
The background is blurred white noise (texture) under a smooth multiplicative bias field.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ldm.core.errors import UserError
from ldm.evaluate.filters import gaussian_blur

logger = logging.getLogger(__name__)

# Half the voxel diagonal (sqrt(3)/2 = 0.866) plus a margin: every point lies closer than this to
# some voxel centre, so a tube at least this thick stays one 26-connected piece at occupancy 0.5.
_MIN_DRAWN_RADIUS = 0.9
_STEP = 1.0  # voxels travelled per random-walk step
_BIAS_WAVES = 6  # cosine waves summed into the bias field


@dataclass(frozen=True)
class PhantomConfig:
    """Parameters of the vessel phantom; lengths and radii in voxels, intensities in a.u."""

    num_trees: int = 3  # roots entering from the volume's faces
    branch_levels: int = 4  # generations of branches per tree (1 = an unbranched root)
    root_radius: float = 3.0  # radius where the root enters the volume
    min_radius: float = 0.6  # branches starting thinner than this are not grown
    # child / parent start radius; Murray's law (1926) gives 2^(-1/3) = 0.79 for two equal children
    radius_decay: float = 0.79
    taper: float = 0.85  # end radius / start radius along one branch
    root_length: float = 0.7  # root length as a fraction of the mean volume extent
    length_decay: float = 0.8  # child length / parent length
    branch_angle_deg: float = 35.0  # mean angle between a child and its parent's direction
    bend: float = 0.02  # std of the direction change per voxel travelled (radians)
    bend_length: float = 10.0  # voxels over which the bending stays correlated (smooth curves)
    vessel_intensity: float = 1.0
    background_intensity: float = 0.15
    texture_strength: float = 0.05  # std of the smooth additive background texture
    texture_scale: float = 3.0  # Gaussian sigma (voxels) that smooths the texture noise
    bias_strength: float = 0.2  # amplitude of the smooth multiplicative bias field, in [0, 1)

    def __post_init__(self) -> None:
        for name in ("num_trees", "branch_levels"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise UserError(f"{name} must be an integer >= 1, got {value!r}")
        _check_float(self, "root_radius", low=0.0, low_open=True)
        _check_float(self, "min_radius", low=0.0, low_open=True)
        if self.min_radius > self.root_radius:
            raise UserError(
                f"min_radius must be <= root_radius ({self.root_radius}), got {self.min_radius}"
            )
        for name in ("radius_decay", "taper", "length_decay"):
            _check_float(self, name, low=0.0, low_open=True, high=1.0)
        _check_float(self, "root_length", low=0.0, low_open=True)
        _check_float(self, "branch_angle_deg", low=0.0, high=90.0)
        _check_float(self, "bend", low=0.0)
        _check_float(self, "bend_length", low=0.0, low_open=True)
        for name in ("vessel_intensity", "background_intensity", "texture_strength"):
            _check_float(self, name, low=0.0)
        _check_float(self, "texture_scale", low=0.0, low_open=True)
        _check_float(self, "bias_strength", low=0.0, high=1.0, high_open=True)


def _check_float(
    cfg: object,
    name: str,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise UserError unless ``cfg.name`` is a real number in the given interval."""
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open or high == math.inf else ']'}"
        raise UserError(f"{name} must be a number in {lo}, {hi}, got {value!r}")


def _check_shape_seed(shape: tuple[int, int, int], seed: int) -> tuple[int, int, int]:
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else ()
    if len(dims) != 3 or not all(_is_int(n) and n >= 4 for n in dims):
        raise UserError(f"phantom shape must be 3 integers >= 4 (D, H, W), got {shape!r}")
    if not _is_int(seed) or seed < 0:
        raise UserError(f"phantom seed must be an integer >= 0, got {seed!r}")
    return (int(dims[0]), int(dims[1]), int(dims[2]))


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _walk(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    length: float,
    shape: tuple[int, int, int],
    config: PhantomConfig,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Centre line of one branch: a random walk with momentum, steered away from the faces.

    The bending direction xi is an AR(1) process, xi_k = m xi_{k-1} + sqrt(1 - m^2) N(0, I) with
    m = exp(-step / bend_length), so curves are smooth. Near a face the walk turns inward; a walk
    that still reaches a face is clipped onto it and ends there (the vessel leaves the volume).
    Returns points (n, 3), the unit direction at the end and whether the walk left the volume.
    """
    upper = np.asarray(shape, dtype=np.float64) - 1.0
    margin = np.minimum(0.15 * upper, 8.0)
    m = math.exp(-_STEP / config.bend_length)
    xi = rng.standard_normal(3)
    d = _unit(direction)
    p = start.astype(np.float64)
    points = [p]
    for _ in range(max(1, round(length / _STEP))):
        xi = m * xi + math.sqrt(1.0 - m * m) * rng.standard_normal(3)
        push = np.clip((margin - p) / margin, 0, 1) - np.clip((p - upper + margin) / margin, 0, 1)
        d = _unit(d + config.bend * math.sqrt(_STEP) * xi + 0.2 * _STEP * push)
        q = p + _STEP * d
        p = np.clip(q, 0.0, upper)
        points.append(p)
        if np.any(p != q):
            return np.stack(points), d, True
    return np.stack(points), d, False


def _children_directions(
    rng: np.random.Generator, d: np.ndarray, angle_deg: float
) -> list[np.ndarray]:
    """Two child directions in a random plane through ``d``, on either side of it."""
    u = _unit(rng.standard_normal(3))
    u = _unit(u - (u @ d) * d)  # random unit vector perpendicular to d
    out = []
    for sign in (1.0, -1.0):
        a = math.radians(angle_deg) * rng.uniform(0.7, 1.3)
        out.append(_unit(math.cos(a) * d + sign * math.sin(a) * u))
    return out


def _grow_tree(
    rng: np.random.Generator, shape: tuple[int, int, int], config: PhantomConfig
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Centre lines (points (n, 3), radii (n,)) of all branches of one tree."""
    axis, side = int(rng.integers(3)), int(rng.integers(2))
    start = np.array([rng.uniform(0.25, 0.75) * (n - 1) for n in shape])
    start[axis] = side * (shape[axis] - 1)  # the root enters through this face
    inward = np.zeros(3)
    inward[axis] = 1.0 - 2.0 * side
    direction = _unit(inward + 0.3 * rng.standard_normal(3))
    direction[axis] = abs(direction[axis]) * inward[axis]
    length = config.root_length * float(np.mean(shape))
    # stack of (start point, direction, start radius, length, level); level 0 is the root
    todo = [(start, direction, config.root_radius, length, 0)]
    branches = []
    while todo:
        p0, d0, r0, length, level = todo.pop()
        length *= rng.uniform(0.8, 1.2)
        points, d_end, exited = _walk(rng, p0, d0, length, shape, config)
        travelled = _STEP * np.arange(len(points))
        radii = r0 * (1.0 - (1.0 - config.taper) * np.minimum(travelled / length, 1.0))
        branches.append((points, radii))
        r_child = r0 * config.radius_decay
        if not exited and level + 1 < config.branch_levels and r_child >= config.min_radius:
            for d in _children_directions(rng, d_end, config.branch_angle_deg):
                todo.append((points[-1], d, r_child, length * config.length_decay, level + 1))
    return branches


def _draw_capsule(mask: np.ndarray, a: np.ndarray, b: np.ndarray, ra: float, rb: float) -> None:
    """Max-combine one tapered tube piece a->b (radii ra->rb) into ``mask`` on its bounding box.

    For a voxel centre x: t = clamp((x - a).(b - a) / |b - a|^2, 0, 1), d = |x - a - t (b - a)|,
    r = ra + t (rb - ra), occupancy = clamp(r - d + 1/2, 0, 1).
    """
    reach = max(ra, rb) + 0.5
    lo = np.maximum(np.floor(np.minimum(a, b) - reach), 0).astype(int)
    hi = np.minimum(np.ceil(np.maximum(a, b) + reach), np.asarray(mask.shape) - 1).astype(int)
    z, y, x = np.ogrid[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    ab = b - a
    wz, wy, wx = z - a[0], y - a[1], x - a[2]  # x - a, broadcast over the box
    t = np.clip((wz * ab[0] + wy * ab[1] + wx * ab[2]) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    dist = np.sqrt((wz - t * ab[0]) ** 2 + (wy - t * ab[1]) ** 2 + (wx - t * ab[2]) ** 2)
    occ = np.clip(ra + t * (rb - ra) - dist + 0.5, 0.0, 1.0).astype(np.float32)
    box = mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    np.maximum(box, occ, out=box)


def _rasterise(shape: tuple[int, int, int], branches: list) -> np.ndarray:
    """Soft occupancy (D, H, W) of one tree: max over all tube pieces of all its branches."""
    mask = np.zeros(shape, dtype=np.float32)
    for points, radii in branches:
        radii = np.maximum(radii, _MIN_DRAWN_RADIUS)
        for i in range(len(points) - 1):
            _draw_capsule(mask, points[i], points[i + 1], radii[i], radii[i + 1])
    return mask


def _texture(rng: np.random.Generator, shape: tuple[int, int, int], scale: float) -> np.ndarray:
    """Smooth zero-mean, unit-std noise with correlation length ~``scale`` voxels.

    White noise on a grid ``scale`` times coarser is blurred (sigma 1 coarse voxel) and upsampled
    trilinearly: much cheaper than blurring full-resolution noise with a wide kernel.
    """
    coarse = tuple(math.ceil(n / scale) + 2 for n in shape)
    white = torch.from_numpy(rng.standard_normal(coarse, dtype=np.float32))
    smooth = gaussian_blur(white, (1.0, 1.0, 1.0))[None, None]  # (1, 1, d, h, w)
    up = F.interpolate(smooth, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    up -= up.mean()
    return up / max(float(up.std()), 1e-12)


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth field b in [-1, 1]: a sum of random cosine waves of at most one period per volume."""
    coords = [np.linspace(0.0, 1.0, n, dtype=np.float32) for n in shape]
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(_BIAS_WAVES):
        k = (rng.uniform(-1.0, 1.0, size=3) * 2.0 * math.pi).astype(np.float32)
        phase = (
            k[0] * coords[0][:, None, None]
            + k[1] * coords[1][None, :, None]
            + k[2] * coords[2][None, None, :]
            + np.float32(rng.uniform(0.0, 2.0 * math.pi))
        )
        field += np.cos(phase)
    return field / max(float(np.abs(field).max()), 1e-12)


def make_phantom_trees(
    shape: tuple[int, int, int], seed: int, config: PhantomConfig = PhantomConfig()
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Phantom volume (D, H, W) float32 and one soft occupancy mask (D, H, W) per tree.

    Same ``seed`` -> bit-identical output. Trees, texture and bias field draw from independent
    streams of the seed, so changing e.g. the texture leaves the trees unchanged.
    """
    shape = _check_shape_seed(shape, seed)
    tree_ss, texture_ss, bias_ss = np.random.SeedSequence(int(seed)).spawn(3)
    masks = []
    for ss in tree_ss.spawn(config.num_trees):
        branches = _grow_tree(np.random.default_rng(ss), shape, config)
        masks.append(_rasterise(shape, branches))
    occ = np.maximum.reduce(masks) if len(masks) > 1 else masks[0].copy()  # (D, H, W)
    background = np.full(shape, config.background_intensity, dtype=np.float32)
    if config.texture_strength > 0:
        texture = _texture(np.random.default_rng(texture_ss), shape, config.texture_scale)
        background = np.maximum(background + config.texture_strength * texture, 0.0)
    volume = background * (1.0 - occ) + config.vessel_intensity * occ
    if config.bias_strength > 0:
        volume *= 1.0 + config.bias_strength * _bias_field(np.random.default_rng(bias_ss), shape)
    logger.debug("phantom %s seed %d: vessel fraction %.4f", shape, seed, float((occ > 0.5).mean()))
    return volume.astype(np.float32, copy=False), masks


def make_phantom(
    shape: tuple[int, int, int], seed: int, config: PhantomConfig = PhantomConfig()
) -> np.ndarray:
    """Angiography-like phantom volume (D, H, W) float32: bright vessel trees, dark background."""
    return make_phantom_trees(shape, seed, config)[0]
