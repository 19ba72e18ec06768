"""Rebuild trained networks from their checkpoints alone (config inside, EMA weights by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.core.checkpoint import load_checkpoint
from ldm.core.config import config_from_dict
from ldm.core.errors import CheckpointError, UserError
from ldm.nets import UNet3d, UNetConfig
from ldm.nets.restorer import RestorerAE, RestorerAEConfig


def ema_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The EMA module's weights from an AveragedModel state dict ('module.' prefix dropped)."""
    return {k[len("module.") :]: v for k, v in state["ema"].items() if k.startswith("module.")}


def _restore(net: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)[:200]
        raise CheckpointError(
            f"{path}: weights do not fit the stored model config ({first})"
        ) from None


def _build(cls_cfg: type, cls_net: type, path: Path, kind: str, device, ema: bool):
    state = load_checkpoint(path, kind)
    if kind == "vae" and "restorer" not in state.get("model_config", {}):
        raise CheckpointError(
            f"{path}: a first stage of the earlier design (one LR-aware autoencoder, whose "
            "decoder ignored its latent); this version needs the restorer + residual "
            "autoencoder: rerun train_vae_pair --overwrite and the phases after it"
        )
    try:
        cfg = config_from_dict(cls_cfg, state["model_config"], f"{path} (model_config)")
    except UserError as e:
        raise CheckpointError(f"incompatible checkpoint: {e}; retrain with this version") from None
    net = cls_net(cfg)
    _restore(net, ema_weights(state) if ema else state["model"], path)
    return net.to(device).eval(), state


def load_vae(
    path: Path, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[RestorerAE, dict]:
    """(restorer + residual autoencoder in eval mode on ``device``, the checkpoint dict) from a
    train_vae_pair checkpoint."""
    return _build(RestorerAEConfig, RestorerAE, Path(path), "vae", device, ema)


def load_unet(
    path: Path, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[UNet3d, dict]:
    """(UNet in eval mode on ``device``, the checkpoint dict) from a train_diffusion checkpoint."""
    return _build(UNetConfig, UNet3d, Path(path), "diffusion", device, ema)
