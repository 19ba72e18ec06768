"""Pictures of volumes: mid slices (axial, coronal, sagittal) + maximum intensity projection."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.core.files import atomic_path  # noqa: E402

VIEWS = ("axial", "coronal", "sagittal", "MIP (axial)")


def views(vol: np.ndarray) -> list[np.ndarray]:
    """The four 2D views of a (D, H, W) volume; a 2D image gives itself once."""
    vol = np.asarray(vol, dtype=np.float32)
    if vol.ndim == 2:
        return [vol]
    d, h, w = vol.shape
    return [vol[d // 2], vol[:, h // 2], vol[:, :, w // 2], vol.max(axis=0)]


def shared_window(
    vols: Sequence[np.ndarray], low: float = 0.5, high: float = 99.8
) -> tuple[float, float]:
    """One intensity window (percentiles over all volumes) so panels compare fairly."""
    values = np.concatenate([np.asarray(v, np.float32).ravel()[::7] for v in vols])
    lo, hi = np.percentile(values, [low, high])
    return float(lo), float(max(hi, lo + 1e-6))


def save_figure(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def save_views_png(
    path: Path, vol: np.ndarray, title: str, window: tuple[float, float], cmap: str = "gray"
) -> Path:
    """One row: the views of ``vol`` in a fixed intensity window, with a colour bar."""
    panels = views(vol)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, img, name in zip(axes[0], panels, VIEWS):
        im = ax.imshow(img, cmap=cmap, vmin=window[0], vmax=window[1], interpolation="nearest")
        ax.set_title(name if len(panels) > 1 else "image", fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def save_comparison_png(
    path: Path, rows: dict[str, np.ndarray], title: str, window: tuple[float, float] | None = None,
    std: tuple[np.ndarray, tuple[float, float]] | None = None,
) -> Path:  # fmt: skip
    """A grid: one row per labelled volume, one column per view, one shared window; ``std``
    (volume, its window) adds a last row in the magma colour map (the uncertainty)."""
    window = window or shared_window(list(rows.values()))
    n_views = len(views(next(iter(rows.values()))))
    styled = [(label, vol, "gray", window) for label, vol in rows.items()]
    if std is not None:
        styled.append(("std (samples)", std[0], "magma", std[1]))
    fig, axes = plt.subplots(
        len(styled), n_views, figsize=(2.6 * n_views, 2.6 * len(styled)), squeeze=False
    )
    for r, (label, vol, cmap, win) in enumerate(styled):
        for c, img in enumerate(views(vol)):
            ax = axes[r][c]
            ax.imshow(img, cmap=cmap, vmin=win[0], vmax=win[1], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and n_views > 1:
                ax.set_title(VIEWS[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
    return save_figure(fig, path)


def to_uint8(img: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return (np.clip((np.asarray(img, np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def save_gif(path: Path, frames: Sequence[np.ndarray], duration_ms: int = 120) -> Path:
    """Frames (H, W) or (H, W, 3) uint8 -> looping GIF via Pillow, written atomically."""
    images = [Image.fromarray(f) for f in frames]
    with atomic_path(Path(path)) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=duration_ms, loop=0)  # fmt: skip
    return Path(path)
