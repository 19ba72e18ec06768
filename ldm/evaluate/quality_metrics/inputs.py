"""The inputs of the quality metrics: numpy arrays or torch tensors as float64 numpy arrays on
the CPU, checked (real, non-empty, finite, one shape) with a ``UserError`` naming the metric."""

from __future__ import annotations

import numpy as np
import torch

from ldm.core.errors import UserError

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(x: ArrayLike, name: str, label: str) -> np.ndarray:
    """``x`` as a float64 numpy array on the CPU, checked to be non-empty and finite."""
    if isinstance(x, torch.Tensor):
        a = x.detach().to("cpu", torch.float64).numpy()
    else:
        a = np.asarray(x)
        if np.iscomplexobj(a):
            raise UserError(f"{name}: {label} must be real, got dtype {a.dtype}")
        a = a.astype(np.float64, copy=False)
    if a.size == 0:
        raise UserError(f"{name}: {label} must not be empty, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise UserError(f"{name}: {label} must be finite, got NaN or inf values")
    return a


def _as_arrays(name: str, spatial: bool, **arrays: ArrayLike) -> list[np.ndarray]:
    """The keyword arrays as float64 numpy arrays of one shape (2D or 3D when ``spatial``)."""
    out = [_as_float64(x, name, label) for label, x in arrays.items()]
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        got = ", ".join(f"{label} {a.shape}" for label, a in zip(arrays, out))
        raise UserError(f"{name}: inputs must have the same shape, got {got}")
    if spatial and out[0].ndim not in (2, 3):
        raise UserError(
            f"{name}: expected a 2D (H, W) or 3D (D, H, W) volume, got shape {out[0].shape}"
        )
    return out
