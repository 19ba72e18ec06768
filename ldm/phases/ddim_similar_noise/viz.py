"""Pictures of ddim_similar_noise: GIF frames of noises and outputs, heat maps, plots and grids.

Volumes are (D, H, W) or 2D (H, W) arrays; a 3D volume is shown by its mid axial slice (and
maximum intensity projection), a 2D image by itself (:func:`ldm.evaluate.viz.views`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw

from ldm.evaluate.viz import save_figure, save_gif, shared_window, to_uint8, views

NOISE_WINDOW = (-3.0, 3.0)  # N(0, 1) noise shown over +-3 sigma
FRAME_PX = 128  # panels are upscaled (nearest) to at least this many pixels on their long side
CAPTION_PX = 16


def mid_and_mip(vol: np.ndarray) -> list[np.ndarray]:
    """[mid axial slice, axial MIP] of a 3D volume; [the image] of a 2D one."""
    v = views(vol)
    return [v[0], v[3]] if len(v) > 1 else v


def upscale(img: np.ndarray, min_px: int = FRAME_PX) -> np.ndarray:
    """A uint8 image enlarged by an integer factor (nearest neighbour) to >= min_px pixels."""
    k = max(1, -(-min_px // max(img.shape[:2])))
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((w * k, h * k), Image.NEAREST))


def frame(panels: Sequence[np.ndarray], caption: str, gap: int = 4) -> np.ndarray:
    """uint8 panels (same height) side by side on black, with a caption strip on top."""
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.zeros((h + CAPTION_PX, w), np.uint8)
    x = 0
    for p in panels:
        out[CAPTION_PX : CAPTION_PX + p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    img = Image.fromarray(out)
    ImageDraw.Draw(img).text((2, 2), caption, fill=255)
    return np.asarray(img)


def noise_frames(noises: np.ndarray, n0: np.ndarray, captions: Sequence[str]) -> list[np.ndarray]:
    """Per noise (N, C, *latent): channel 0 mid slice of n | of n - n0, upscaled."""
    frames = []
    for n, cap in zip(noises, captions):
        panels = [upscale(to_uint8(views(x[0])[0], NOISE_WINDOW)) for x in (n, n - n0[0])]
        frames.append(frame(panels, f"{cap}  (n | n - n0)"))
    return frames


def output_frames(
    outputs: np.ndarray, window: tuple[float, float], captions: Sequence[str]
) -> list[np.ndarray]:
    """Per decoded output (N, *spatial): mid slice | MIP (3D) or the image (2D), upscaled."""
    names = "  (mid slice | MIP)" if outputs.ndim == 4 else ""
    return [
        frame([upscale(to_uint8(p, window)) for p in mid_and_mip(x)], cap + names)
        for x, cap in zip(outputs, captions)
    ]


def save_diff_heatmap(
    path: Path, outputs: np.ndarray, base: np.ndarray, labels: Sequence[str], title: str
) -> Path:
    """Columns = sweep points; rows = |output - base| mid slice (and its MIP); one colour scale."""
    diffs = [np.abs(np.asarray(x, np.float32) - base) for x in outputs]
    vmax = max(1e-6, max(float(d.max()) for d in diffs))
    rows = len(mid_and_mip(diffs[0]))
    fig, axes = plt.subplots(rows, len(diffs), figsize=(1.6 * len(diffs) + 1.2, 1.6 * rows + 0.6),
                             squeeze=False, layout="constrained")  # fmt: skip
    for c, (d, label) in enumerate(zip(diffs, labels)):
        for r, img in enumerate(mid_and_mip(d)):
            im = axes[r][c].imshow(img, cmap="inferno", vmin=0, vmax=vmax, interpolation="nearest")
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[0][c].set_title(label, fontsize=8)
    if rows > 1:
        axes[0][0].set_ylabel("mid slice", fontsize=8)
        axes[1][0].set_ylabel("max projection", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9, label="|output - output at n0|")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_distance_plot(
    path: Path, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str
) -> Path:
    """Output L2 distance against noise L2 distance, one line per sweep."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (name, (noise_l2, output_l2)), marker in zip(curves.items(), "os^vD"):
        ax.plot(noise_l2, output_l2, marker=marker, label=name)
    ax.set_xlabel("noise distance |n - n0|_2")
    ax.set_ylabel("output distance |x - x0|_2 (decoded)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def save_forward_backward_grid(
    path: Path,
    ts: Sequence[int],
    noised: np.ndarray,
    denoised: np.ndarray,
    lr: np.ndarray,
    hr: np.ndarray,
    psnrs: Sequence[float],
) -> Path:
    """Rows = t: decode(x_t) | denoised back (mid slice, MIP) | |denoised - HR|; top row LR | HR."""
    win = shared_window([lr, hr])
    n_views = len(mid_and_mip(hr))
    err_max = max(1e-6, float(np.abs(denoised - hr).max()))
    cols = ["x_t, decoded", *(["denoised", "denoised MIP"][:n_views]), "|denoised - HR|"]
    fig, axes = plt.subplots(len(ts) + 1, len(cols), figsize=(1.7 * len(cols), 1.7 * (len(ts) + 1)),
                             squeeze=False)  # fmt: skip
    rows = [("LR | HR target", [views(lr)[0], *mid_and_mip(hr)], None)]
    rows += [(f"t={t}\n{p:.1f} dB", [views(a)[0], *mid_and_mip(b)], np.abs(b - hr))
             for t, a, b, p in zip(ts, noised, denoised, psnrs)]  # fmt: skip
    for r, (label, imgs, err) in enumerate(rows):
        for c, img in enumerate(imgs):
            axes[r][c].imshow(img, cmap="gray", vmin=win[0], vmax=win[1], interpolation="nearest")
        if err is not None:
            axes[r][-1].imshow(views(err)[0], cmap="inferno", vmin=0, vmax=err_max,
                               interpolation="nearest")  # fmt: skip
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=8)
    axes[0][-1].axis("off")
    for c, name in enumerate(cols):
        axes[1][c].set_title(name, fontsize=8)
    fig.suptitle("forward/backward: noise the HR latent to t, DDIM back (PSNR vs HR)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title
    return save_figure(fig, path)


def save_psnr_plot(
    path: Path,
    ts: Sequence[int],
    psnr_noised: Sequence[float],
    psnr_denoised: Sequence[float],
    references: Mapping[str, float],
    latent_noised: Sequence[float],
    latent_denoised: Sequence[float],
    latent_restorer: float,
) -> Path:
    """Left: PSNR against HR versus t, for x_t decoded and for the denoised result, dashed
    references. Right: the same two in latent space, RMS distance to z_HR, with that of z = 0
    (the restorer)."""
    fig, (ax, lat) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    ax.plot(ts, psnr_denoised, marker="o", label="denoised back from t (DDIM)")
    ax.plot(ts, psnr_noised, marker="s", label="x_t, decoded (no denoising)")
    for (name, value), style in zip(references.items(), ("--", ":", "-.", (0, (5, 1)))):
        ax.axhline(value, color="gray", linestyle=style, label=f"{name}: {value:.1f} dB")
    ax.set_xlabel("t (forward noise level)")
    ax.set_ylabel("PSNR against HR (dB)")
    ax.set_title("image: how much information each noise level destroys", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    lat.plot(ts, latent_denoised, marker="o", label="denoised back from t (DDIM)")
    lat.plot(ts, latent_noised, marker="s", label="x_t (no denoising)")
    lat.axhline(latent_restorer, color="gray", linestyle="--",
                label=f"z = 0 (restorer): {latent_restorer:.3f}")  # fmt: skip
    lat.set_xlabel("t (forward noise level)")
    lat.set_ylabel("RMS distance to the HR latent")
    lat.set_title("latent: where the diffusion works", fontsize=10)
    lat.grid(alpha=0.3)
    lat.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def write_sweep_files(
    out_dir: Path,
    name: str,
    captions: Sequence[str],
    noises: np.ndarray,
    n0: np.ndarray,
    outputs: np.ndarray,
    base: np.ndarray,
    window: tuple[float, float],
    title: str,
) -> list[Path]:
    """noise_<name>.gif, outputs_<name>.gif and diff_<name>.png of one sweep.

    noises (N, C, *latent), n0 (1, C, *latent), outputs (N, *spatial), base = output at n0.
    """
    out_dir = Path(out_dir)
    return [
        save_gif(out_dir / f"noise_{name}.gif", noise_frames(noises, n0, captions), 400),
        save_gif(out_dir / f"outputs_{name}.gif", output_frames(outputs, window, captions), 400),
        save_diff_heatmap(out_dir / f"diff_{name}.png", outputs, base, captions, title),
    ]
