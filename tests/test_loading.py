"""ldm.nets.loading: a checkpoint carries its whole model config, so a change of the dataclass
defaults (configs/<phase>.yaml and the dataclasses are one source) never changes what an
existing checkpoint means."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm.core.checkpoint import load_checkpoint
from ldm.nets import UNetConfig
from ldm.nets.loading import ema_weights, load_unet, load_vae
from ldm.nets.restorer import RestorerAEConfig


def _all_keys(cls: type, data: dict) -> None:
    """Every field of ``cls`` (and of its nested sections) is stored in ``data``."""
    for f in dataclasses.fields(cls):
        assert f.name in data, f"{cls.__name__}.{f.name} not stored"
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            _all_keys(f.type, data[f.name])


@pytest.mark.parametrize("kind", ["vae", "diffusion"])
def test_a_checkpoint_stores_every_model_key(tiny_pipeline, kind):
    path = tiny_pipeline.vae if kind == "vae" else tiny_pipeline.diffusion
    state = load_checkpoint(path, kind)
    cls = RestorerAEConfig if kind == "vae" else UNetConfig
    _all_keys(cls, state["model_config"])
    if kind == "vae":
        for section in ("restorer", "residual_ae"):
            _all_keys(type(getattr(RestorerAEConfig(), section)), state["model_config"][section])


def test_stored_values_win_over_todays_defaults(tiny_pipeline):
    """The fixture's nets differ from today's defaults in width and latent channels: the
    loaded nets have the stored values and the saved weights."""
    vae, state = load_vae(tiny_pipeline.vae, torch.device("cpu"))
    today = RestorerAEConfig()
    assert vae.config.residual_ae.latent_channels == 4 != today.residual_ae.latent_channels
    assert vae.config.restorer.channels == (8, 8, 8) != today.restorer.channels
    unet, _ = load_unet(tiny_pipeline.diffusion, torch.device("cpu"))
    assert unet.config.channels == (8, 16) != UNetConfig().channels
    weights, sd = ema_weights(state), vae.state_dict()
    assert set(sd) == set(weights) and all(torch.equal(sd[k], weights[k]) for k in sd)
