"""Rebuild trained networks from their checkpoints alone (config inside, EMA weights by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.core.checkpoint import PRODUCER, load_checkpoint
from ldm.core.config import config_from_dict
from ldm.core.errors import CheckpointError, UserError
from ldm.nets import UNet, UNetConfig
from ldm.nets.restorer import RestorerAE, RestorerAEConfig
from ldm.nets.vae import VAEConfig

# far beyond any model this project trains (the defaults: 2-3 million parameters); a checkpoint's
# model_config asking for more is refused before anything is allocated (2e9 float32 = 8 GB)
MAX_PARAMETERS = 2_000_000_000


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


# ---------------------------------------------------------------------------------------------
# parameter count from a config alone: the conv, linear and attention weights each net's
# constructor makes (biases and norms left out: at most about 1 % less), in Python ints


def _res(sd: int, cin: int, cout: int, emb: int = 0) -> int:
    """ResBlock: two 3x3 convs, a 1x1 skip when the width changes, the FiLM projection."""
    k = 3**sd
    return k * cin * cout + k * cout * cout + (cin * cout if cin != cout else 0) + emb * 2 * cout


def _decoder_params(c: VAEConfig) -> int:
    sd, ch, n = c.spatial_dims, c.channels, c.num_res_blocks
    total = 3**sd * c.latent_channels * ch[-1] + _res(sd, ch[-1], ch[-1])
    for lo, hi in zip(ch, ch[1:]):  # the levels below full resolution
        total += n * _res(sd, hi, hi) + 2**sd * hi * lo
    total += _res(sd, ch[0], ch[0]) + ch[0] * c.out_channels
    return total + (sum(2 * w * w for w in ch) if c.lr_skip else 0)


def _downs(c: VAEConfig) -> int:
    return sum(3**c.spatial_dims * lo * hi for lo, hi in zip(c.channels, c.channels[1:]))


def _lr_path_params(c: VAEConfig) -> int:
    """_LRFeatures: stem, one full-resolution block, a strided conv per level."""
    sd, ch = c.spatial_dims, c.channels
    return 3**sd * c.in_channels * ch[0] + _res(sd, ch[0], ch[0]) + _downs(c)


def _vae_params(c: VAEConfig) -> int:
    """VAE: encoder, decoder and (lr_skip) the LR feature path."""
    sd, ch, n, k = c.spatial_dims, c.channels, c.num_res_blocks, 3**c.spatial_dims
    encoder = k * c.in_channels * ch[0] + _downs(c) + sum(n * _res(sd, w, w) for w in ch[1:])
    encoder += _res(sd, ch[-1], ch[-1]) + k * ch[-1] * 2 * c.latent_channels
    return encoder + _decoder_params(c) + (_lr_path_params(c) if c.lr_skip else 0)


def _restorer_ae_params(c: RestorerAEConfig) -> int:
    """RestorerAE: the restorer (LR features + decoder) and the residual VAE."""
    return _lr_path_params(c.restorer) + _decoder_params(c.restorer) + _vae_params(c.residual_ae)


def _unet_params(c: UNetConfig) -> int:
    sd, ch, n, k = c.spatial_dims, c.channels, c.num_res_blocks, 3**c.spatial_dims
    emb = 4 * ch[0]
    total = ch[0] * emb + emb * emb + k * (c.in_channels + c.cond_channels) * ch[0]
    skips, cur, last = [ch[0]], ch[0], len(ch) - 1
    for i, w in enumerate(ch):
        total += sum(_res(sd, cin, w, emb) for cin in [cur] + [w] * (n - 1))
        total += 4 * w * w * n if c.attention and i == last else 0
        cur, skips = w, skips + [w] * n
        if i != last:
            total, skips = total + k * w * w, skips + [w]
    total += 2 * _res(sd, cur, cur, emb) + (4 * cur * cur * c.mid_attention if c.attention else 0)
    for i in range(last, -1, -1):
        for _ in range(n + 1):
            total += _res(sd, cur + skips.pop(), ch[i], emb)
            total += 4 * ch[i] * ch[i] if c.attention and i == last else 0
            cur = ch[i]
        if i != 0:
            total, cur = total + 2**sd * ch[i] * ch[i - 1], ch[i - 1]
    return total + k * ch[0] * c.out_channels


def parameter_count(cfg: UNetConfig | RestorerAEConfig | VAEConfig) -> int:
    """About how many parameters the net of ``cfg`` has, from the config alone (nothing built)."""
    if isinstance(cfg, UNetConfig):
        return _unet_params(cfg)
    return _restorer_ae_params(cfg) if isinstance(cfg, RestorerAEConfig) else _vae_params(cfg)


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
    params = parameter_count(cfg)
    if params > MAX_PARAMETERS:
        raise CheckpointError(
            f"{path}: its model_config asks for a network of {params:.3g} parameters, far beyond "
            f"any sane model (limit {MAX_PARAMETERS:.0g}); refused before allocating it: use a "
            f"checkpoint written by {PRODUCER[kind]}"
        )
    net = cls_net(cfg)
    _restore(net, ema_weights(state) if ema else state["model"], path)
    return inference_layout(net.to(device).eval()), state


def inference_layout(net: nn.Module) -> nn.Module:
    """A 3D net on the CPU with its weights in channels-last order (NDHWC): oneDNN's
    convolutions run about 17 % faster (predict_ldm 128^3: 15.6 -> 13.0 s on 2 cores) with the
    same results up to float rounding. Other devices and 2D nets are left as they are (not
    measured there)."""
    weights = [p for p in net.parameters() if p.dim() == 5]
    if weights and weights[0].device.type == "cpu":
        net.to(memory_format=torch.channels_last_3d)
    return net


def load_vae(
    path: Path, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[RestorerAE, dict]:
    """(restorer + residual autoencoder in eval mode on ``device``, the checkpoint dict) from a
    train_vae_pair checkpoint."""
    return _build(RestorerAEConfig, RestorerAE, Path(path), "vae", device, ema)


def load_unet(
    path: Path, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[UNet, dict]:
    """(UNet in eval mode on ``device``, the checkpoint dict) from a train_diffusion checkpoint."""
    return _build(UNetConfig, UNet, Path(path), "diffusion", device, ema)
