"""Tests for ldm.nets: shapes in 2D and 3D, KL closed form, conditioning, configs, user errors."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import asdict

import pytest
import torch
from torch import nn

from ldm.core.errors import UserError
from ldm.nets import VAE, UNet, UNetConfig, VAEConfig, kl_divergence
from ldm.nets.blocks import SelfAttention, timestep_embedding

# Non-cubic spatial sizes so mixed-up axes would show; divisible by 8 (VAE) and 4 (UNet).
SPATIAL = {2: (8, 16), 3: (8, 16, 24)}
SPATIAL_UNET = {2: (4, 8), 3: (4, 8, 12)}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny shapes: thread start-up and sync cost more than they save (100x on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vae(spatial_dims: int = 3, levels: int = 3, **kw: object) -> VAE:
    torch.manual_seed(0)
    cfg = VAEConfig(spatial_dims=spatial_dims, channels=(4,) * levels, norm_groups=2, **kw)
    return VAE(cfg)


def tiny_unet(spatial_dims: int = 3, **kw: object) -> UNet:
    torch.manual_seed(0)
    args: dict = dict(
        spatial_dims=spatial_dims, channels=(8, 8), num_res_blocks=1, num_heads=2, norm_groups=4
    )
    args.update(kw)
    return UNet(UNetConfig(**args))


def perturb_output_conv(net: UNet) -> None:
    """Give the zero-initialised output conv random weights so the output depends on the input."""
    torch.manual_seed(1)
    nn.init.normal_(net.conv_out.weight, std=0.1)


# --------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_vae_shapes_every_factor(spatial_dims: int, levels: int) -> None:
    vae = tiny_vae(spatial_dims, levels, in_channels=2, out_channels=3, latent_channels=5)
    f = vae.config.downsample_factor
    assert f == 2 ** (levels - 1)
    sp = SPATIAL[spatial_dims]
    x = torch.randn(2, 2, *sp)
    recon, mu, logvar = vae(x)
    assert recon.shape == (2, 3, *sp)
    latent_shape = (2, 5, *(s // f for s in sp))
    assert mu.shape == latent_shape and logvar.shape == latent_shape
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    assert isinstance(vae.encoder.stem, conv)


def test_vae_encode_decode_shapes() -> None:
    vae = tiny_vae(levels=3, latent_channels=3)  # f = 4
    mu, logvar = vae.encode(torch.randn(1, 1, 16, 8, 32))
    assert mu.shape == logvar.shape == (1, 3, 4, 2, 8)
    assert vae.decode(torch.randn(2, 3, 2, 3, 4)).shape == (2, 1, 8, 12, 16)


def test_vae_sampling_uses_generator_and_mean_mode() -> None:
    vae = tiny_vae(levels=2).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        r1, mu, _ = vae(x, generator=torch.Generator().manual_seed(3))
        r2, _, _ = vae(x, generator=torch.Generator().manual_seed(3))
        r3, _, _ = vae(x, generator=torch.Generator().manual_seed(4))
        r_mean, _, _ = vae(x, sample=False)
    assert torch.equal(r1, r2)
    assert not torch.allclose(r1, r3)
    torch.testing.assert_close(r_mean, vae.decode(mu))


def test_vae_logvar_is_clamped() -> None:
    vae = tiny_vae(levels=2, latent_channels=2)
    conv = vae.encoder.conv_out
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(100.0)
        mu, logvar = vae.encode(x)
        assert torch.all(mu == 100.0) and torch.all(logvar == 20.0)
        conv.bias.fill_(-100.0)
        assert torch.all(vae.encode(x)[1] == -30.0)


def test_vae_gradients_reach_every_parameter() -> None:
    vae = tiny_vae(levels=3, num_res_blocks=1)
    recon, mu, logvar = vae(torch.randn(2, 1, 8, 8, 8))
    (recon.square().mean() + kl_divergence(mu, logvar)).backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_kl_zero_for_standard_normal() -> None:
    z = torch.zeros(2, 4, 3, 3, 3)
    assert kl_divergence(z, z).item() == 0.0


def test_kl_matches_closed_form_and_torch_distributions() -> None:
    # mu = 1, logvar = 0: 0.5 * mu^2 = 0.5 per element.
    assert kl_divergence(torch.ones(2, 3), torch.zeros(2, 3)).item() == pytest.approx(0.5)
    # mu = 0, var = 2: 0.5 * (2 - 1 - ln 2).
    lv = torch.full((4,), math.log(2.0))
    assert kl_divergence(torch.zeros(4), lv).item() == pytest.approx(0.5 * (1 - math.log(2.0)))
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.exp(0.5 * logvar)), torch.distributions.Normal(0, 1)
    ).mean()
    torch.testing.assert_close(kl_divergence(mu, logvar), ref)


def test_kl_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):  # a caller's bug, not a user error
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------- UNet


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", [(8,), (8, 8), (8, 8, 16)])
def test_unet_output_shape_and_zero_init(spatial_dims: int, channels: tuple[int, ...]) -> None:
    net = tiny_unet(spatial_dims, channels=channels, out_channels=3)
    sp = SPATIAL_UNET[spatial_dims]
    x, cond = torch.randn(2, 4, *sp), torch.randn(2, 4, *sp)
    out = net(x, torch.tensor([0, 999]), cond)
    assert out.shape == (2, 3, *sp)
    assert torch.all(out == 0)  # the output conv starts at zero


def test_unet_time_and_cond_change_output() -> None:
    net = tiny_unet()
    perturb_output_conv(net)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 8, 8, 8, generator=g), torch.randn(2, 4, 8, 8, 8, generator=g)
    t = torch.tensor([10, 10])
    with torch.no_grad():
        base = net(x, t, cond)
        assert not torch.allclose(base, net(x, torch.tensor([500, 500]), cond))
        assert not torch.allclose(base, net(x, t, torch.randn(2, 4, 8, 8, 8, generator=g)))
        # a scalar t is broadcast over the batch; float and integer t agree
        torch.testing.assert_close(net(x, torch.tensor(10), cond), base)
        torch.testing.assert_close(net(x, t.float(), cond), base)


def test_unet_unconditional_and_without_attention() -> None:
    net = tiny_unet(cond_channels=0, attention=False)
    assert not any(isinstance(m, SelfAttention) for m in net.modules())
    assert net(torch.randn(1, 4, 8, 8, 8), torch.tensor([3])).shape == (1, 4, 8, 8, 8)
    assert any(isinstance(m, SelfAttention) for m in tiny_unet().modules())


def test_unet_middle_block_attention_count() -> None:
    def mid(net: UNet) -> list[str]:
        return [type(m).__name__ for pair in zip(net.mid.res, net.mid.attn) for m in pair]

    assert mid(tiny_unet()) == ["ResBlock", "SelfAttention"] * 2
    assert mid(tiny_unet(mid_attention=1)) == ["ResBlock", "SelfAttention", "ResBlock", "Identity"]


def test_checkpoint_without_mid_attention_key_still_loads(tmp_path) -> None:
    """Checkpoints written before ``mid_attention`` existed have two middle attention blocks,
    the default: they load with the same output."""
    from ldm.core.checkpoint import save_checkpoint
    from ldm.nets.loading import load_unet

    old = tiny_unet()
    perturb_output_conv(old)
    config = {k: v for k, v in asdict(old.config).items() if k != "mid_attention"}
    weights = {f"module.{k}": v for k, v in old.state_dict().items()}
    path = save_checkpoint({"kind": "diffusion", "model_config": config, "model": old.state_dict(),
                            "ema": weights}, tmp_path / "old.pt")  # fmt: skip
    net, _ = load_unet(path)
    assert net.config.mid_attention == 2
    x, cond = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor([5]), cond), old(x, torch.tensor([5]), cond))


def test_conv_smaller_than_its_kernel_runs_float32_under_cpu_autocast() -> None:
    """oneDNN's bf16 weight gradient of a 3x3x3 conv over a 2x2x2 map is sometimes NaN; such
    inputs run in float32, larger ones in bf16."""
    from ldm.nets.blocks import conv3x3

    conv = conv3x3(3, 8, 8)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(torch.randn(2, 8, 2, 2, 2)).dtype == torch.float32
        assert conv(torch.randn(2, 8, 4, 4, 4)).dtype == torch.bfloat16
    for _ in range(100):
        x = torch.randn(2, 8, 2, 2, 2)
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(x).float().square().mean().backward()
        assert torch.isfinite(conv.weight.grad).all()


def test_unet_gradients_reach_every_parameter() -> None:
    net = tiny_unet(channels=(8, 16), num_res_blocks=2)
    perturb_output_conv(net)
    out = net(torch.randn(2, 4, 8, 8, 8), torch.tensor([1, 700]), torch.randn(2, 4, 8, 8, 8))
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- blocks


def test_timestep_embedding_known_values() -> None:
    emb = timestep_embedding(torch.tensor([0, 1]), 6)
    assert emb.shape == (2, 6)
    torch.testing.assert_close(emb[0], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    w = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])  # w_i = 10000^(-i / half)
    torch.testing.assert_close(emb[1], torch.cat([torch.sin(w), torch.cos(w)]))
    assert timestep_embedding(torch.tensor([5.5]), 7)[0, -1] == 0  # odd dim: zero pad


def test_self_attention_matches_manual_softmax() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(channels=4, num_heads=2, norm_groups=2)
    x = torch.randn(1, 4, 2, 3)  # (B, C, H, W), N = 6 tokens
    tokens = attn.norm(x).reshape(4, 6).T  # (N, C)
    q, k, v = attn.qkv(tokens).reshape(6, 3, 2, 2).permute(1, 2, 0, 3)  # each (heads, N, d)
    w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(2), dim=-1)  # (heads, N, N)
    out = attn.proj((w @ v).transpose(0, 1).reshape(6, 4))  # (N, C)
    torch.testing.assert_close(attn(x), x + out.T.reshape(1, 4, 2, 3))


# --------------------------------------------------------------------------- configs


def test_config_round_trip_and_checkpoint_rebuild() -> None:
    for cfg in (VAEConfig(), UNetConfig(), VAEConfig(spatial_dims=2, channels=(8, 16))):
        assert type(cfg)(**asdict(cfg)) == cfg
        # JSON / YAML give lists: they come back as tuples
        assert type(cfg)(**json.loads(json.dumps(asdict(cfg)))) == cfg
    vae = tiny_vae(levels=2)
    buf = io.BytesIO()
    torch.save({"config": asdict(vae.config), "model": vae.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    rebuilt = VAE(VAEConfig(**ckpt["config"]))
    rebuilt.load_state_dict(ckpt["model"])
    x = torch.randn(1, 1, 8, 8, 8)
    torch.testing.assert_close(rebuilt(x, sample=False)[0], vae(x, sample=False)[0])


def test_default_factors() -> None:
    assert VAEConfig().downsample_factor == 4
    assert VAEConfig(channels=(8,)).downsample_factor == 1
    assert UNetConfig(channels=(8, 8, 8)).downsample_factor == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spatial_dims=1), "spatial_dims must be 2 or 3"),
        (dict(spatial_dims=True), "spatial_dims"),
        (dict(channels=(16, 20)), "divisible by norm_groups=8"),
        (dict(channels=(8, 8, 8, 8, 8)), "1 to 4 levels"),
        (dict(channels=()), "1 to 4 levels"),
        (dict(channels=(8, -8)), "positive integers"),
        (dict(channels="16"), "list of integers"),
        (dict(in_channels=0), "in_channels must be an integer >= 1"),
        (dict(latent_channels=2.0), "latent_channels"),
        (dict(num_res_blocks=-1), "num_res_blocks must be an integer >= 0"),
        (dict(norm_groups=0), "norm_groups"),
    ],
)
def test_vae_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        VAEConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spatial_dims=4), "spatial_dims"),
        (dict(channels=(64, 100)), "divisible by norm_groups"),
        (dict(channels=(8, 24), num_heads=16), "divisible by num_heads=16"),
        (dict(cond_channels=-1), "cond_channels must be an integer >= 0"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(attention="yes"), "attention: expected true or false"),
        (dict(mid_attention=3), "mid_attention: expected 1"),
    ],
)
def test_unet_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        UNetConfig(**kwargs)


def test_vae_input_errors() -> None:
    vae = tiny_vae(levels=3)  # f = 4
    with pytest.raises(ValueError, match=r"\(6, 8, 8\) must be divisible by .* factor 4"):
        vae(torch.randn(1, 1, 6, 8, 8))
    with pytest.raises(ValueError, match="expected 1 channels"):
        vae.encode(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="expected a 5D tensor"):
        vae.encode(torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="expected 4 channels"):
        vae.decode(torch.randn(1, 3, 2, 2, 2))


def test_unet_input_errors() -> None:
    net = tiny_unet()  # f = 2, cond_channels = 4
    x, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="got cond=None"):
        net(x, t)
    with pytest.raises(ValueError, match="expected 4 channels"):
        net(x, t, torch.randn(2, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="cond must match x"):
        net(x, t, torch.randn(2, 4, 8, 8, 4))
    with pytest.raises(ValueError, match="divisible by the downsampling factor 2"):
        net(torch.randn(2, 4, 8, 8, 5), t, torch.randn(2, 4, 8, 8, 5))
    with pytest.raises(ValueError, match=r"expected t of shape \(2,\)"):
        net(x, torch.tensor([1, 2, 3]), torch.randn(2, 4, 8, 8, 8))
    with pytest.raises(ValueError, match="unconditional"):
        tiny_unet(cond_channels=0)(x, t, torch.randn(2, 4, 8, 8, 8))
