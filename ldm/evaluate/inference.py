"""Whole-volume inference with overlapping sliding windows and Gaussian blending."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldm.core.errors import UserError

logger = logging.getLogger(__name__)


def _check_window(window: Sequence[int], overlap: float) -> tuple[int, ...]:
    """Validate a window size and overlap fraction; returns the window as a tuple."""
    win = tuple(int(w) for w in window)
    if len(win) not in (2, 3) or any(w < 1 for w in win):
        raise UserError(f"window must be 2 or 3 sizes >= 1, got {tuple(window)}")
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"overlap must be a fraction in [0, 1), got {overlap}")
    return win


def window_positions(
    shape: Sequence[int], window: Sequence[int], overlap: float
) -> list[tuple[int, ...]]:
    """Start corners of the windows that tile ``shape``; the last window per axis is flush.

    Stride per axis is ``max(1, int(window * (1 - overlap)))``; an axis shorter than its window
    gets the single start 0 (the caller pads). Order is C-order over the axes.
    """
    win = _check_window(window, overlap)
    if len(shape) != len(win):
        raise UserError(f"window has {len(win)} dims but the shape {tuple(shape)} has {len(shape)}")
    return list(itertools.product(*(axis_starts(s, w, overlap) for s, w in zip(shape, win))))


def axis_starts(size: int, window: int, overlap: float, multiple: int = 1) -> list[int]:
    """Window starts along one axis: stride ``window (1 - overlap)`` rounded down to a multiple
    of ``multiple`` (at least one), the last window flush with the end; an axis no longer than
    the window gets the single start 0. With ``size`` and ``window`` multiples of ``multiple``,
    every start is one (the latent-aligned windows of prepare_latents)."""
    if size <= window:
        return [0]
    stride = max(multiple, int(window * (1.0 - overlap)) // multiple * multiple)
    n = math.ceil((size - window) / stride) + 1
    return [min(i * stride, size - window) for i in range(n)]


def fit_window(window: Sequence[int], shape: Sequence[int], multiple: int) -> tuple[int, ...]:
    """``window`` shrunk, per axis, to the volume's size rounded up to ``multiple``: a volume
    smaller than the window runs as one window of (about) its own size, not padded to the window.
    """
    if multiple < 1:
        raise UserError(f"multiple must be >= 1, got {multiple}")
    return tuple(min(int(w), -(-int(s) // multiple) * multiple) for w, s in zip(window, shape))


def gaussian_importance_map(window: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Blending weights of one window: separable Gaussian centred in the window, max 1.

    sigma = sigma_scale * window size per axis (as MONAI's 'gaussian' blend mode); clamped
    below at 1e-3 so border voxels still count where only one window covers them.
    """
    if not sigma_scale > 0:
        raise UserError(f"sigma_scale must be > 0, got {sigma_scale}")
    weights = torch.ones(())
    for w in window:
        x = torch.arange(w, dtype=torch.float64) - (w - 1) / 2.0
        g = torch.exp(-0.5 * (x / (sigma_scale * w)) ** 2)  # (w,)
        weights = weights.unsqueeze(-1) * g
    weights = weights / weights.max()
    return weights.clamp_(min=1e-3).float()  # (*window)


def _pad_to_window(volume: torch.Tensor, window: tuple[int, ...]) -> tuple[torch.Tensor, list]:
    """Replicate-pad spatial axes shorter than the window (symmetrically); returns crop slices."""
    spatial = volume.shape[1:]
    need = [max(0, w - s) for s, w in zip(spatial, window)]
    crop = [slice(n // 2, n // 2 + s) for n, s in zip(need, spatial)]
    if not any(need):
        return volume, crop
    pad = []
    for n in reversed(need):  # F.pad order: last axis first
        pad += [n // 2, n - n // 2]
    padded = F.pad(volume.unsqueeze(0).float(), pad, mode="replicate")[0]
    return padded.to(volume.dtype), crop


@torch.no_grad()
def sliding_window_infer(
    volume: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    window: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 4,
    sigma_scale: float = 0.125,
    out_channels: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Run ``fn`` on overlapping windows of ``volume`` and blend the outputs with Gaussian weights.

    ``volume`` is ``(C, *spatial)`` with 2 or 3 spatial axes (``len(window)``); ``fn`` maps
    ``(B, C, *window)`` to ``(B, out_channels, *window)``. Windows run in batches on ``device``
    (default: the volume's device); the blend is accumulated on CPU in float32, so device memory
    is bounded by one batch. Returns ``(out_channels, *spatial)`` float32 on CPU.
    """
    win = _check_window(window, overlap)
    if volume.ndim != len(win) + 1:
        raise UserError(
            f"volume must be (C, *spatial) with {len(win)} spatial axes to match window {win}, "
            f"got shape {tuple(volume.shape)}"
        )
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if out_channels is not None and out_channels < 1:
        raise UserError(f"out_channels must be >= 1, got {out_channels}")
    device = volume.device if device is None else torch.device(device)
    importance = gaussian_importance_map(win, sigma_scale)  # (*window)
    padded, crop = _pad_to_window(volume, win)
    spatial = tuple(padded.shape[1:])
    positions = window_positions(spatial, win, overlap)
    logger.debug("sliding window: %d windows of %s over %s", len(positions), win, spatial)

    out: torch.Tensor | None = None  # (out_channels, *spatial), allocated on the first batch
    weight = torch.zeros(spatial)  # (*spatial) sum of importance weights per voxel
    starts = range(0, len(positions), batch_size)
    for b in tqdm(starts, desc="sliding window", unit="batch", disable=not progress):
        corners = positions[b : b + batch_size]
        slices = [tuple(slice(s, s + w) for s, w in zip(c, win)) for c in corners]
        batch = torch.stack([padded[(slice(None), *sl)] for sl in slices]).to(device)
        pred = fn(batch)  # (B, out_channels, *window)
        n_out = pred.shape[1] if pred.ndim > 1 else -1
        expected = (len(corners), out_channels or n_out, *win)
        if tuple(pred.shape) != expected:
            raise UserError(
                f"fn must return (B, out_channels, *window) = {expected}, got {tuple(pred.shape)}"
            )
        if out is None:
            out = torch.zeros((n_out, *spatial))
        pred = pred.detach().to("cpu", torch.float32) * importance  # (B, out_channels, *window)
        for p, sl in zip(pred, slices):
            out[(slice(None), *sl)] += p
            weight[sl] += importance
    if out is None or not bool((weight > 0).all()):
        raise RuntimeError("sliding windows left voxels uncovered")
    out /= weight
    return out[(slice(None), *crop)].contiguous()


def first_stage_volume(
    model: torch.nn.Module,
    lr: np.ndarray,
    window: Sequence[int],
    *,
    hr: np.ndarray | None = None,
    overlap: float = 0.5,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """The first stage (:class:`ldm.nets.restorer.RestorerAE`) on a whole normalised (D, H, W)
    volume, window by window: the restorer mu(LR), or with ``hr`` the oracle
    mu + D(E(HR - mu)) (what a perfect diffusion could reach). ``window`` shrinks to a smaller
    volume (:func:`fit_window`). Returns float32 numpy of the volume's shape."""

    def fn(batch: torch.Tensor) -> torch.Tensor:  # (B, 1 or 2, *w): LR [, HR]
        mu = model.restore(batch[:, :1])
        if batch.shape[1] == 1:
            return mu
        return mu + model.decode(model.encode(batch[:, 1:] - mu)[0])

    vols = [lr] if hr is None else [lr, hr]
    if hr is not None and hr.shape != lr.shape:
        raise UserError(f"hr shape {hr.shape} != lr shape {lr.shape}")
    x = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in vols]))  # (1|2, *sp)
    out = sliding_window_infer(
        x,
        fn,
        fit_window(window, lr.shape, model.config.window_multiple),
        overlap=overlap,
        batch_size=batch_size,
        device=device,
        progress=progress,
        out_channels=1,
    )
    return out[0].numpy()


def check_output_finite(vol: np.ndarray | None, case: Any, what: str) -> None:
    """UserError naming the case's input when a model output has NaN/inf voxels (finite weights
    can still overflow), so no such volume is scored or written; ``None`` passes."""
    if vol is None or np.isfinite(vol).all():
        return
    bad = int((~np.isfinite(vol)).sum())
    source = getattr(case, "lr_path", None) or f"test case {case.name}"
    raise UserError(
        f"{source}: the {what} has {bad} NaN/inf voxels of {vol.size}, nothing written for this "
        "case; the checkpoints overflow on this input: use an earlier checkpoint or retrain with "
        "--overwrite, and check that the input's intensities are like the training data's"
    )
