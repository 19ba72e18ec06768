"""Self-describing checkpoints: model config, weights, EMA, optimizer, step, RNG; saved atomically.

A checkpoint rebuilds its network from the file alone (``model_config`` inside), and names the
phase that made it (``kind``), so a wrong or stale file is a clear error instead of a shape crash.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

from ldm.core.errors import CheckpointError
from ldm.core.files import atomic_path

FORMAT_VERSION = 1
PRODUCER = {"vae": "train_vae_pair", "diffusion": "train_diffusion"}


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """torch.save to a temporary file beside ``path``, then rename (never a half-written file)."""
    state = {"format_version": FORMAT_VERSION, **state}
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)
    return Path(path)


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
    return state


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
