"""The predict-and-refine first stage and its LDM: the restorer mu(LR), the residual autoencoder
of HR - mu (its decoder never sees the LR), space-to-depth of the condition, refine's mean / std /
first sample and detail weight w, sampler starts, and the refusal of first-stage checkpoints of
the earlier design."""

from __future__ import annotations

import inspect
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from ldm.core.checkpoint import save_checkpoint
from ldm.core.config import config_from_dict
from ldm.core.errors import ConfigError, UserError
from ldm.data.dataset import AugmentConfig, PatchPairs, augment_pair
from ldm.diffusion.latent_diffusion import LatentDiffusion, SamplerConfig, load_ldm
from ldm.diffusion.schedule import DiffusionConfig, make_schedule
from ldm.evaluate.quality_metrics import latent_sensitivity
from ldm.nets import VAE, UNet, UNetConfig, VAEConfig
from ldm.nets.restorer import (
    RestorerAE,
    RestorerAEConfig,
    condition,
    condition_channels,
    space_to_depth,
)
from ldm.phases.train_vae_pair import TrainVAEConfig, VAEPairTask, residual_scale
from tests.helpers.cli import error_line, run_script


def tiny_config(**kw) -> RestorerAEConfig:
    return RestorerAEConfig(
        restorer=VAEConfig(channels=(4, 4), norm_groups=2, lr_skip=True, residual=True),
        residual_ae=VAEConfig(channels=(4, 4, 4), norm_groups=2), **kw,
    )  # fmt: skip


def tiny_first_stage(**kw) -> RestorerAE:
    torch.manual_seed(0)
    return RestorerAE(tiny_config(**kw)).eval()


@pytest.fixture(scope="module")
def ldm(tiny_pipeline) -> LatentDiffusion:
    return load_ldm(tiny_pipeline.vae, tiny_pipeline.diffusion, torch.device("cpu"))


def _lr(n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the first stage


def test_the_residual_decoder_has_no_lr_input():
    params = list(inspect.signature(RestorerAE.decode).parameters)
    assert params == ["self", "z"]  # decode(z) -> residual: the latent is its only input
    model = tiny_first_stage()
    assert not model.config.residual_ae.uses_lr
    assert not any(k.startswith(("residual_ae.lr_encoder", "residual_ae.decoder.fuse"))
                   for k in model.state_dict())  # fmt: skip
    assert any(k.startswith("restorer.lr_encoder") for k in model.state_dict())
    for bad in ({"lr_skip": True}, {"residual": True}, {"lr_skip": True, "residual": True}):
        with pytest.raises(ValueError, match="residual_ae must not see the LR"):
            RestorerAEConfig(residual_ae=VAEConfig(**bad))
    with pytest.raises(ValueError, match="restorer needs lr_skip and residual"):
        RestorerAEConfig(restorer=VAEConfig(lr_skip=True))
    with pytest.raises(ValueError, match="same spatial_dims"):
        RestorerAEConfig(residual_ae=VAEConfig(spatial_dims=2))
    with pytest.raises(ValueError, match="residual_scale must be > 0"):
        tiny_config(residual_scale=0.0)


def test_config_round_trips_through_a_checkpoint_dict():
    cfg = tiny_config(residual_scale=2.5)
    assert config_from_dict(RestorerAEConfig, asdict(cfg), "checkpoint") == cfg
    assert cfg.downsample_factor == 4 and cfg.window_multiple == 4 and cfg.latent_channels == 4
    assert condition_channels(cfg) == 2 * 4**3
    # a plain residual autoencoder written without the lr keys still parses as plain
    old = {k: v for k, v in asdict(cfg.residual_ae).items() if k not in ("lr_skip", "residual")}
    parsed = config_from_dict(RestorerAEConfig, {**asdict(cfg), "residual_ae": old}, "ckpt")
    assert parsed.residual_ae == cfg.residual_ae
    with pytest.raises(UserError, match="lr_skip"):
        VAEConfig(lr_skip="yes")


def test_encode_decode_work_at_the_residual_scale_and_shapes():
    model = tiny_first_stage(residual_scale=4.0)
    lr, hr = _lr(2), _lr(2, seed=1)
    with torch.no_grad():
        mu = model.restore(lr)
        mean, logvar = model.encode(hr - mu)
        assert mu.shape == lr.shape and mean.shape == logvar.shape == (2, 4, 4, 4, 4)
        torch.testing.assert_close(mean, model.residual_ae.encode(4.0 * (hr - mu))[0])
        torch.testing.assert_close(model.decode(mean), model.residual_ae.decode(mean) / 4.0)
        # the training pass: r = s (HR - mu) with mu detached
        mu2, r, r_hat, mean2, _ = model.train()(lr, hr, generator=torch.Generator())
    torch.testing.assert_close(mu2, mu)
    torch.testing.assert_close(r, 4.0 * (hr - mu))
    assert r_hat.shape == hr.shape and mean2.shape == mean.shape


def test_the_restorer_adds_its_output_to_the_lr():
    model = tiny_first_stage()
    torch.nn.init.zeros_(model.restorer.decoder.conv_out.weight)
    torch.nn.init.zeros_(model.restorer.decoder.conv_out.bias)
    lr = _lr()
    with torch.no_grad():
        assert torch.equal(model.restore(lr), lr)
        model.restorer.decoder.conv_out.bias.fill_(0.25)
        torch.testing.assert_close(model.restore(lr), lr + 0.25)


def test_training_loss_reaches_both_paths_and_the_residual_ignores_restorer_gradients():
    model = tiny_first_stage().train()
    lr, hr = _lr(2), _lr(2, seed=1)
    task = VAEPairTask(TrainVAEConfig(grad_weight=0.5, residual_grad_weight=0.5),
                       [(lr[i], hr[i]) for i in range(2)], torch.device("cpu"))  # fmt: skip
    _, r, *_ = model(lr, hr)
    assert not r.requires_grad  # HR - mu with mu detached: no gradient into the restorer
    loss, logs = task.loss(model, (lr, hr), torch.Generator().manual_seed(0))
    assert set(logs) == {"l1_restorer", "mse_residual", "kl"}
    loss.backward()
    for name in ("restorer.lr_encoder", "restorer.decoder", "residual_ae.encoder",
                 "residual_ae.decoder"):  # fmt: skip
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name
    v = task.validate(model.eval())
    assert {"psnr", "oracle_psnr", "zero_latent_psnr", "headroom_db", "baseline_psnr"} <= set(v)
    assert v["headroom_db"] == pytest.approx(v["oracle_psnr"] - v["psnr"])


def _grads(model: RestorerAE, prefix: str) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if n.startswith(prefix))  # fmt: skip


def test_two_stages_train_both_then_the_autoencoder_on_the_frozen_restorer():
    lr, hr = _lr(2), _lr(2, seed=1)
    cfg = TrainVAEConfig(model=tiny_config(), residual_ae_fraction=0.25)
    assert cfg.residual_ae_steps == 300  # of the default 1200 train.steps
    task = VAEPairTask(cfg, [(lr[i], hr[i]) for i in range(2)], torch.device("cpu"))
    model = tiny_first_stage().train()
    groups = task.stages(model)  # RunState trains each group on its own steps
    assert [r for _, r in groups] == [[(0, 900)], [(0, 900), (900, 1200)]]
    assert sum(len(p) for p, _ in groups) == len(list(model.parameters()))
    ema = tiny_first_stage()  # stands for the EMA copy: other weights
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    task.begin_step(899, model, ema)
    loss, logs = task.loss(model, (lr, hr), torch.Generator().manual_seed(0))
    assert set(logs) == {"l1_restorer", "mse_residual", "kl"}
    loss.backward()
    assert _grads(model, "restorer.") and _grads(model, "residual_ae.")
    model.zero_grad(set_to_none=True)
    w = model.restorer.decoder.conv_out.weight
    assert not torch.equal(w, ema.restorer.decoder.conv_out.weight)
    task.begin_step(900, model, ema)  # the restorer is frozen at its EMA weights
    for p, q in zip(model.restorer.parameters(), ema.restorer.parameters()):
        assert torch.equal(p, q)
    loss, logs = task.loss(model, (lr, hr), torch.Generator().manual_seed(0))
    assert set(logs) == {"l1_restorer", "mse_residual", "kl"}  # the restorer's only logged
    loss.backward()
    assert _grads(model, "residual_ae.") and not _grads(model, "restorer.")
    # only the joint stage when the fraction is 0
    joint = VAEPairTask(TrainVAEConfig(model=tiny_config(), residual_ae_fraction=0.0),
                        [(lr[0], hr[0])], torch.device("cpu"))  # fmt: skip
    assert not hasattr(joint, "stages") and joint.stage == "joint"
    with pytest.raises(ConfigError, match="residual_ae_fraction"):
        TrainVAEConfig(residual_ae_fraction=1.0)
    with pytest.raises(ConfigError, match="val_patches must be >= 1"):  # still checked after it
        TrainVAEConfig(val_patches=0)


def test_the_residual_stage_flips_the_residual_at_random_seeded():
    model = tiny_first_stage(residual_scale=1.0).train()
    lr, hr = _lr(1), _lr(1, seed=1)
    with torch.no_grad():
        r0 = hr - model.restore(lr)
        seen = []
        for seed in range(8):
            _, r, *_ = model(lr, hr, generator=torch.Generator().manual_seed(seed),
                             stage="residual")  # fmt: skip
            assert any(torch.equal(r, r0.flip(list(c))) for c in _subsets((2, 3, 4))), seed
            seen.append(r)
        again = model(lr, hr, generator=torch.Generator().manual_seed(3), stage="residual")[1]
    assert torch.equal(again, seen[3])
    assert not all(torch.equal(r, seen[0]) for r in seen)  # not always the same flip
    with pytest.raises(ValueError, match="stage must be one of"):
        model(lr, hr, stage="both")


def _subsets(dims: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [tuple(d for i, d in enumerate(dims) if m >> i & 1) for m in range(2 ** len(dims))]


def test_the_residual_scale_follows_the_residual_when_measured_and_is_saved():
    lr, hr = _lr(2), _lr(2, seed=1)
    fixed = tiny_first_stage(residual_scale=4.0).train()
    fixed(lr, hr)
    assert float(fixed.s) == pytest.approx(4.0)
    assert "residual_rms" not in fixed.state_dict()  # the config holds it
    measured = tiny_first_stage().train()  # residual_scale null: measured while training
    assert "residual_rms" in measured.state_dict()
    with torch.no_grad():
        rms = float((hr - measured.restore(lr)).square().mean().sqrt())
        for _ in range(300):
            measured(lr, hr)
        assert float(measured.s) == pytest.approx(1 / rms, rel=1e-3)
        before = measured.residual_rms.clone()
        measured.eval()(lr, hr * 2)  # evaluation passes leave it alone
    assert torch.equal(measured.residual_rms, before)
    copy = tiny_first_stage()
    copy.load_state_dict(measured.state_dict())
    assert float(copy.s) == float(measured.s)


def test_augmentation_is_the_same_on_lr_and_hr_and_seeded():
    lr = torch.rand(4, 1, 6, 6, 6)
    cfg = AugmentConfig(flips=True, permute=True, scale=0.5, shift=0.2)
    a_lr, a_hr = augment_pair(lr, lr.clone(), cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a_lr, a_hr) and not torch.allclose(a_lr, lr)
    b_lr, _ = augment_pair(lr, lr.clone(), cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a_lr, b_lr)
    f_lr, _ = augment_pair(lr, lr, AugmentConfig(flips=True, permute=True),
                           torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(f_lr.flatten(1).sort(1).values, lr.flatten(1).sort(1).values)
    assert augment_pair(lr, lr, AugmentConfig(), torch.Generator())[0] is lr


def test_latent_sensitivity_of_a_trained_tiny_first_stage_is_positive(tiny_pipeline):
    """After 30 steps on 4 patches the residual latent moves the output:
    S = ||D(z_HR) - D(0)||^2 / ||HR - mu||^2 > 0, and mu + D(z_HR) is closer to HR than mu."""
    train = PatchPairs(tiny_pipeline.data_dir, "train")
    pairs = [train[i] for i in range(4)]
    lr, hr = (torch.stack([p[k] for p in pairs]) for k in (0, 1))
    cfg = RestorerAEConfig(
        restorer=VAEConfig(channels=(8, 8), norm_groups=4, lr_skip=True, residual=True),
        residual_ae=VAEConfig(channels=(8, 8, 8), norm_groups=4),
        residual_scale=residual_scale(train),
    )  # fmt: skip
    torch.manual_seed(0)
    model = RestorerAE(cfg)
    task = VAEPairTask(TrainVAEConfig(model=cfg), pairs, torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(30):
        loss, _ = task.loss(model, (lr, hr), g)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first  # it trained
    model.eval()
    with torch.no_grad():
        mu = model.restore(lr)
        z_hr = model.encode(hr - mu)[0]
        oracle, zero = mu + model.decode(z_hr), mu + model.decode(torch.zeros_like(z_hr))
    s = latent_sensitivity(oracle.numpy(), zero.numpy(), hr.numpy(), mu.numpy())
    want = float(((oracle - zero) ** 2).sum() / ((hr - mu) ** 2).sum())
    assert s == pytest.approx(want, rel=1e-5) and s > 1e-4
    assert float(((oracle - hr) ** 2).mean()) < float(((mu - hr) ** 2).mean())


# ---------------------------------------------------------------------------------------------
# space-to-depth: how (mu, LR) reach the latent grid


def test_space_to_depth_known_small_example():
    x = torch.arange(8.0).reshape(1, 1, 2, 2, 2)  # value = 4 d + 2 h + w
    y = space_to_depth(x, 2)
    assert y.shape == (1, 8, 1, 1, 1)
    assert y.flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # channel = 4 i_d + 2 i_h + i_w
    # two channels, a 2 x 2 x 4 volume: channel c f^3 + 4 i_d + 2 i_h + i_w at block (0, 0, j)
    x = torch.arange(32.0).reshape(1, 2, 2, 2, 4)
    y = space_to_depth(x, 2)
    assert y.shape == (1, 16, 1, 1, 2)
    assert y[0, :, 0, 0, 0].tolist() == [0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29]
    assert y[0, :, 0, 0, 1].tolist() == [2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                         31]  # fmt: skip
    assert torch.equal(space_to_depth(x, 1), x)


@pytest.mark.parametrize("f", [2, 4])
def test_space_to_depth_is_lossless_and_inverted_by_a_reshape(f):
    x = torch.randn(2, 3, 8, 12, 16, generator=torch.Generator().manual_seed(0))
    y = space_to_depth(x, f)
    b, c, d, h, w = x.shape
    assert y.shape == (b, c * f**3, d // f, h // f, w // f)
    back = (y.reshape(b, c, f, f, f, d // f, h // f, w // f)
            .permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(x.shape))  # fmt: skip
    assert torch.equal(back, x)
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)  # values kept
    x2 = x[:, :, 0]  # 2D: the same as pixel_unshuffle
    assert torch.equal(space_to_depth(x2, f), F.pixel_unshuffle(x2, f))


def test_condition_is_mu_then_lr_on_the_latent_grid():
    mu, lr = _lr(2), _lr(2, seed=1)
    c = condition(mu, lr, 4)
    assert c.shape == (2, 2 * 4**3, 4, 4, 4) and c.is_contiguous()
    assert torch.equal(c[:, : 4**3], space_to_depth(mu, 4))
    assert torch.equal(c[:, 4**3 :], space_to_depth(lr, 4))


# ---------------------------------------------------------------------------------------------
# refine: mean, std and one sample of N; the detail weight w


def test_w_0_gives_the_restorer_exactly(ldm):
    lr = _lr(2)
    out = ldm.refine(lr, SamplerConfig(steps=2), torch.Generator().manual_seed(0), 3, w=0.0)
    mu = ldm.restore(lr)[:, 0]
    assert out.shape == (2, 3, 16, 16, 16)
    assert torch.equal(out[:, 0], mu) and torch.equal(out[:, 2], mu)  # mean and the sample
    assert torch.equal(out[:, 1], torch.zeros_like(mu))  # std
    z = torch.randn(2, 4, 4, 4, 4)
    assert torch.equal(ldm.decode(z, ldm.restore(lr), w=0.0), ldm.restore(lr))
    # w = 1 adds the decoded detail
    one = ldm.refine(lr, SamplerConfig(steps=2), torch.Generator().manual_seed(0), 3, w=1.0)
    assert not torch.allclose(one[:, 0], mu)


def test_refine_on_the_cpu_runs_the_nets_in_small_chunks_with_the_same_result(ldm, monkeypatch):
    """CPU_CHUNKS: the UNet and the residual decoder see at most k items a call on the CPU, and
    the output equals the one of whole batches (each item is computed alone either way)."""
    import ldm.diffusion.latent_diffusion as latent_diffusion

    lr, s = _lr(3), SamplerConfig(steps=2, eta=1.0)
    seen: list[tuple[str, int]] = []
    unet_fwd, dec = ldm.unet.forward, ldm.vae.decode
    monkeypatch.setattr(ldm.unet, "forward", lambda x, *a, **k: (seen.append(("unet", len(x))),
                                                                  unet_fwd(x, *a, **k))[1])
    monkeypatch.setattr(ldm.vae, "decode", lambda z: (seen.append(("decode", len(z))), dec(z))[1])
    monkeypatch.setattr(latent_diffusion, "CPU_CHUNKS", {"unet": 5, "decode": 2})
    chunked = ldm.refine(lr, s, torch.Generator().manual_seed(1), 4)  # 12 items
    assert max(n for w, n in seen if w == "unet") == 5 and ("unet", 2) in seen
    assert {n for w, n in seen if w == "decode"} == {2}
    monkeypatch.setattr(latent_diffusion, "CPU_CHUNKS", {"unet": 64, "decode": 64})
    seen.clear()
    whole = ldm.refine(lr, s, torch.Generator().manual_seed(1), 4)
    assert {n for _, n in seen} == {12}
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_n_samples_with_eta_0_and_one_seed_are_reproducible(ldm):
    lr, s = _lr(2), SamplerConfig(steps=2)
    a = ldm.refine(lr, s, torch.Generator().manual_seed(3), 4)
    b = ldm.refine(lr, s, torch.Generator().manual_seed(3), 4)
    assert torch.equal(a, b)
    c = ldm.refine(lr, s, torch.Generator().manual_seed(4), 4)
    assert not torch.allclose(c[:, 0], a[:, 0]) and not torch.allclose(c[:, 2], a[:, 2])
    assert (a[:, 1] > 0).any() and (a[:, 1] >= 0).all()
    # the first sample of N is the single sample of the same generator: its start noise is the
    # first draw (the CPU generator fills the (B N, ...) noise in order)
    one = ldm.refine(lr[:1], s, torch.Generator().manual_seed(3), 1)
    many = ldm.refine(lr[:1], s, torch.Generator().manual_seed(3), 4)
    torch.testing.assert_close(many[:, 2], one[:, 2], atol=1e-4, rtol=1e-4)
    assert torch.equal(one[:, 0], one[:, 2]) and torch.equal(one[:, 1], torch.zeros_like(one[:, 1]))


def test_the_mean_and_std_are_those_of_the_samples_of_each_window(ldm, monkeypatch):
    """Fix the start noises: refine(B = 2 windows, N = 3) gives per window the mean, the sample
    std (ddof 1) and the first of the 3 single-sample refines of its own noises."""
    s = SamplerConfig(steps=2)
    lr = _lr(2)
    noise = torch.randn(6, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(ldm, "initial_latent", lambda shape, sampler, g: (noise, None))
    both = ldm.refine(lr, s, None, 3, w=0.7)
    for i in range(2):  # sample k of window i starts from noise i N + k
        singles = []
        for k in range(3):
            monkeypatch.setattr(ldm, "initial_latent",
                                lambda shape, sampler, g, j=3 * i + k: (noise[j : j + 1], None))
            singles.append(ldm.refine(lr[i : i + 1], s, None, 1, w=0.7)[0, 2])
        stack = torch.stack(singles)
        torch.testing.assert_close(both[i, 0], stack.mean(0), atol=1e-4, rtol=1e-4)
        std = stack.std(0, correction=1) * ldm.std_scale  # the sample std, sigma-scaled
        torch.testing.assert_close(both[i, 1], std, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(both[i, 2], singles[0], atol=1e-4, rtol=1e-4)


def test_decode_needs_mu_and_lr_context_supplies_it(ldm):
    z = torch.zeros(3, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="needs the restorer output mu"):
        ldm.decode(z)
    lr = _lr()
    with ldm.lr_context(lr) as mu:  # one window, many latents (ddim_similar_noise)
        torch.testing.assert_close(mu, ldm.restore(lr))
        out = ldm.decode(z)
        assert out.shape == (3, 1, 16, 16, 16)
        torch.testing.assert_close(out, mu + ldm.vae.decode(z / ldm.scale))
    assert ldm.default_mu is None
    hr = _lr(seed=1)
    z_hr = ldm.encode_target(hr, ldm.restore(lr))
    torch.testing.assert_close(z_hr, ldm.vae.encode(hr - ldm.restore(lr))[0] * ldm.scale)


def test_predict_window_fn_goes_through_refine(ldm, monkeypatch):
    from ldm.phases.predict_ldm import PredictConfig, ldm_window_fn

    seen = []

    def spy(self, lr, sampler, generator, num_samples, w):
        seen.append((lr, sampler, num_samples, w))
        return lr.repeat(1, 3, 1, 1, 1)

    monkeypatch.setattr(LatentDiffusion, "refine", spy)
    cfg = PredictConfig(sampler=SamplerConfig(steps=2), num_samples=5, detail_weight=0.3)
    lr = _lr()
    out = ldm_window_fn(ldm, cfg, torch.Generator())(lr)
    assert out.shape == (1, 3, 16, 16, 16) and len(seen) == 1
    assert torch.equal(seen[0][0], lr) and seen[0][1:] == (cfg.sampler, 5, 0.3)


# ---------------------------------------------------------------------------------------------
# where sampling starts


def _tiny_ldm() -> LatentDiffusion:
    vae = tiny_first_stage()
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=(8, 8), num_res_blocks=1, num_heads=2, norm_groups=4,
                             cond_channels=condition_channels(vae.config))).eval()  # fmt: skip
    schedule = make_schedule(DiffusionConfig(num_train_timesteps=100))
    return LatentDiffusion(vae, unet, schedule, 1.0, torch.device("cpu"), 0, 0)


def test_start_from_the_noised_restorer_latent():
    ldm = _tiny_ldm()
    shape = (1, 4, 4, 4, 4)
    s = SamplerConfig(steps=3, init="restorer", t_start=20)
    x, t = ldm.initial_latent(shape, s, torch.Generator().manual_seed(0))
    abar = float(ldm.schedule.alphas_cumprod[20])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert t == 20
    torch.testing.assert_close(x, (1 - abar) ** 0.5 * noise)  # z = 0 noised to t_start
    seen = []
    cond = ldm.condition(_lr())
    ldm.sample(cond, x, s, callback=lambda d: seen.append(int(d["t"])), t_start=t)
    assert seen[0] == 20 and len(seen) == 3
    x, t = ldm.initial_latent(shape, SamplerConfig(steps=3), torch.Generator().manual_seed(0))
    assert t is None and torch.equal(x, noise)  # init noise: x_T ~ N(0, I)
    with pytest.raises(ConfigError, match="init must be one of noise, restorer"):
        SamplerConfig(init="cond", t_start=20)  # the earlier design's start
    with pytest.raises(ConfigError, match="t_start"):
        SamplerConfig(init="restorer")
    with pytest.raises(ConfigError, match="t_start"):
        SamplerConfig(t_start=20)
    with pytest.raises(ConfigError, match="t_start"):
        ldm.initial_latent(shape, SamplerConfig(init="restorer", t_start=100), None)


# ---------------------------------------------------------------------------------------------
# first-stage checkpoints of the earlier design


def _old_first_stage_checkpoint(path) -> None:
    """What train_vae_pair saved before the restorer: one LR-aware VAE, its VAEConfig."""
    cfg = VAEConfig(channels=(8, 8, 8), norm_groups=4, lr_skip=True, residual=True)
    weights = VAE(cfg).state_dict()
    save_checkpoint({"kind": "vae", "model_config": asdict(cfg), "model": weights,
                     "ema": {f"module.{k}": v for k, v in weights.items()}, "step": 2,
                     "extra": {}}, path)  # fmt: skip


@pytest.mark.parametrize("phase", ["predict_ldm", "evaluate_psnr", "prepare_latents"])
def test_an_old_first_stage_checkpoint_is_refused_with_one_line(tiny_pipeline, tmp_path, phase):
    old = tmp_path / "old_vae.pt"
    _old_first_stage_checkpoint(old)
    args = ["--set", f"data_dir={tiny_pipeline.data_dir}", "--set", f"vae_checkpoint={old}",
            "--set", f"out_dir={tmp_path / 'out'}", "--set", "device=cpu"]  # fmt: skip
    if phase == "predict_ldm":
        args += ["--set", f"diffusion_checkpoint={tiny_pipeline.diffusion}"]
    line = error_line(run_script(phase, *args))
    assert str(old) in line and "train_vae_pair --overwrite" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# sigma scaling of the std (calibration.json of train_diffusion)


def test_train_diffusion_fits_a_std_scale_that_load_ldm_applies(tiny_pipeline, ldm):
    import json


    cal = json.loads((tiny_pipeline.diffusion.parent / "calibration.json").read_text())
    assert cal["checkpoint"] == "best.pt" and cal["std_scale"] > 0 and cal["num_samples"] == 8
    # the fitted factor maps the raw ratio to n / (n + 1) on the calibration patches
    assert cal["ratio_before"] * cal["std_scale"] ** 2 == pytest.approx(8 / 9)
    assert ldm.std_scale == pytest.approx(cal["std_scale"])
    lr, s = _lr(1), SamplerConfig(steps=2)
    scaled = ldm.refine(lr, s, torch.Generator().manual_seed(0), 3)
    ldm.std_scale, before = 1.0, ldm.std_scale
    try:
        raw = ldm.refine(lr, s, torch.Generator().manual_seed(0), 3)
    finally:
        ldm.std_scale = before
    torch.testing.assert_close(scaled[:, 1], raw[:, 1] * before)
    assert torch.equal(scaled[:, 0], raw[:, 0])  # the mean and the sample do not change


def test_a_calibration_of_another_checkpoint_is_ignored(tiny_pipeline, tmp_path):
    import json
    import shutil

    from ldm.diffusion.latent_diffusion import load_std_scale

    ck = tmp_path / "best.pt"
    shutil.copy(tiny_pipeline.diffusion, ck)
    assert load_std_scale(ck) == 1.0  # none beside it
    cal = json.loads((tiny_pipeline.diffusion.parent / "calibration.json").read_text())
    (tmp_path / "calibration.json").write_text(json.dumps({**cal, "digest": "0" * 16}))
    assert load_std_scale(ck) == 1.0  # fitted for another file
    (tmp_path / "calibration.json").write_text(json.dumps(cal))
    assert load_std_scale(ck) == pytest.approx(cal["std_scale"])
    (tmp_path / "calibration.json").write_text("{not json")
    assert load_std_scale(ck) == 1.0
