"""Self-describing checkpoints: model config, weights, EMA, optimizer, step, RNG; saved atomically.

A checkpoint rebuilds its network from the file alone (``model_config`` inside), and names the
phase that made it (``kind``), so a wrong or stale file is a clear error instead of a shape crash.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ldm.core.errors import CheckpointError, UserError
from ldm.core.files import atomic_path

FORMAT_VERSION = 1
PRODUCER = {"vae": "train_vae_pair", "diffusion": "train_diffusion"}


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """torch.save to a temporary file beside ``path``, then rename (never a half-written file).

    A failed write (a full disk: torch raises RuntimeError 'file write failed', Python OSError)
    leaves any earlier ``path`` as it was and becomes a UserError naming ``path``."""
    state = {"format_version": FORMAT_VERSION, **state}
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _is_write_failure(e):
            raise
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        why = " ".join(re.sub(r"^\s*\[enforce fail at [^\]]*\][\s.]*", "", why).split())[:120]
        raise UserError(
            f"{path}: cannot write the checkpoint ({why}); free space on that disk (or fix the "
            f"folder's permissions), then rerun to resume; any earlier {path.name} is unchanged"
        ) from None
    return path


def _is_write_failure(e: RuntimeError) -> bool:
    """torch.save's C++ writer reports a short write (disk full) as a RuntimeError."""
    text = str(e)
    return any(s in text for s in ("PytorchStreamWriter", "inline_container", "write failed"))


def load_checkpoint(
    path: Path, kind: str, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint of ``kind`` ('vae' | 'diffusion'); every problem -> CheckpointError."""
    path = Path(path)
    producer = PRODUCER.get(kind, "the training phase")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; run {producer} first")
    try:
        # weights_only: tensors, numbers, strings and containers only. An object that would run
        # code while unpickling (a __reduce__ payload) is refused before anything executes.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a class or function reference: what code execution needs
            raise CheckpointError(
                f"{path}: refused: it holds Python objects, not only weights, and loading it could "
                f"run code; use a checkpoint written by {producer}"
            ) from None
        raise CheckpointError(
            f"{path}: corrupt or not a checkpoint (UnpicklingError); rerun {producer}"
        ) from None
    except OSError as e:
        raise CheckpointError(
            f"{path}: cannot read ({e.strerror or e}); check its permissions"
        ) from None
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"{path}: corrupt or not a checkpoint ({type(e).__name__}); rerun {producer}"
        ) from None
    if not isinstance(state, dict) or "format_version" not in state or "model_config" not in state:
        raise CheckpointError(f"{path}: not an ldm3d checkpoint; rerun {producer}")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {state['format_version']} but this version reads "
            f"{FORMAT_VERSION}; rerun {producer}"
        )
    if state.get("kind") != kind:
        raise CheckpointError(
            f"{path}: holds a '{state.get('kind')}' model but a '{kind}' model is needed; "
            f"check the checkpoint path in your config"
        )
    for part in ("model", "ema"):
        check_finite_weights(state.get(part), path, part, producer)
    return state


def check_finite_weights(weights: Any, path: Path, part: str, producer: str) -> None:
    """CheckpointError naming the first tensor of ``weights`` (a state dict) with NaN/inf values:
    such weights turn every output into NaN."""
    if not isinstance(weights, dict):
        return
    for name, w in weights.items():
        finite = not isinstance(w, torch.Tensor) or not w.is_floating_point()
        if not (finite or bool(torch.isfinite(w).all())):
            bad = int((~torch.isfinite(w)).sum())
            raise CheckpointError(
                f"{path}: weight {part}.{name} has {bad} NaN/inf of {w.numel()} values (the "
                f"training diverged or the file is damaged); rerun {producer} with --overwrite, "
                f"or use an earlier checkpoint"
            )


def file_digest(path: Path, length: int = 16) -> str:
    """Short sha256 of a file: identifies exactly which checkpoint produced derived data."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two (nested) config dicts, as 'key: old -> new'."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif _norm(a) != _norm(b):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
