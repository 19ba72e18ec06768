"""The first stage on whole volumes for prepare_latents: the restorer's output mu(LR) and the
residual latent E(s (HR - mu)) of a whole case, from which the diffusion's training pairs are
cropped (docs/design.md, "Formats", latents/).

mu is :func:`first_stage_volume` (the restorer window by window, Gaussian-blended, the
sliding windows of evaluate_psnr and predict_ldm). The latent is the residual autoencoder's mean
latent of HR - mu, also window by window, with window corners on multiples of the factor f so
that each window's latent lands on whole cells of the volume's latent grid, blended there with
the Gaussian weights of the latent window. A patch at image corner p (a multiple of f) then has
its latent at p / f.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldm.core.errors import UserError
from ldm.evaluate.inference import (
    axis_starts,
    first_stage_volume,
    fit_window,
    gaussian_importance_map,
)


@torch.no_grad()
def latent_volume(
    model: torch.nn.Module,
    residual: np.ndarray,
    window: Sequence[int],
    *,
    overlap: float = 0.0,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Mean latent of the residual HR - mu of a whole (D, H, W) volume: (C, ceil(D / f), ...).

    The volume is edge-padded at the far end to a multiple of f (the latent cells past the
    volume's end are the only ones that see the padding); windows (shrunk to the volume like
    :func:`fit_window`) start on multiples of f."""
    f = model.config.downsample_factor
    shape = residual.shape
    padded = tuple(-(-s // f) * f for s in shape)
    x = torch.from_numpy(np.ascontiguousarray(residual, dtype=np.float32))[None, None]
    if padded != shape:
        pad = [v for s, p in zip(reversed(shape), reversed(padded)) for v in (0, p - s)]
        x = F.pad(x, pad, mode="replicate")
    x = x[0]  # (1, *padded)
    win = fit_window(window, padded, f)
    if any(w % f for w in win):
        raise UserError(f"window {tuple(win)} must be a multiple of the latent factor {f}")
    lwin = tuple(w // f for w in win)
    importance = gaussian_importance_map(lwin)  # (*lwin)
    grid = tuple(p // f for p in padded)
    out = torch.zeros((model.config.latent_channels, *grid))
    weight = torch.zeros(grid)
    corners = list(itertools.product(*(axis_starts(p, w, overlap, f)
                                       for p, w in zip(padded, win))))  # fmt: skip
    for b in range(0, len(corners), batch_size):
        group = corners[b : b + batch_size]
        batch = torch.stack([x[(slice(None), *(slice(c, c + w) for c, w in zip(cs, win)))]
                             for cs in group]).to(device)  # fmt: skip
        z = model.encode(batch)[0].detach().to("cpu", torch.float32) * importance
        for zi, cs in zip(z, group):
            sl = tuple(slice(c // f, c // f + w) for c, w in zip(cs, lwin))
            out[(slice(None), *sl)] += zi
            weight[sl] += importance
    out /= weight
    return out.numpy()


def case_arrays(
    model: torch.nn.Module,
    lr: np.ndarray,
    hr: np.ndarray,
    window: Sequence[int],
    *,
    overlap: float = 0.0,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D, H, W), z (C, ceil(D / f), ceil(H / f), ceil(W / f))) of one normalised case,
    float32: the restorer's output as evaluate_psnr and predict_ldm compute it, and the mean
    latent of HR - mu (unscaled)."""
    mu = first_stage_volume(model, lr, window, overlap=overlap, batch_size=batch_size,
                            device=device, progress=False)  # fmt: skip
    z = latent_volume(model, np.asarray(hr, dtype=np.float32) - mu, window, overlap=overlap,
                      batch_size=batch_size, device=device)  # fmt: skip
    return mu, z


def latent_start(start: Sequence[int], factor: int) -> tuple[int, ...]:
    """The latent corner of a patch at image corner ``start``: start / f, rounded down when a
    start is not a multiple of f (prepare_data's last patch along an axis is flush with the
    volume's end, which is off the grid when (size - patch) % f != 0)."""
    return tuple(int(s) // factor for s in start)
