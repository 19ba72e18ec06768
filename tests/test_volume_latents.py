"""prepare_latents on whole volumes (ldm/evaluate/volume_latents.py, data.latents.LatentPairs):
crops at start / f equal patch-wise encoding where the windows are the patches and stay within
the stated tolerance where a window sees more than the patch; the folder grows with the volumes,
not the patches; a folder of the per-patch format is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldm.core.config import load_config
from ldm.core.errors import DataError
from ldm.data.dataset import PatchPairs
from ldm.data.latents import LatentPairs, load_latents_meta
from ldm.evaluate.inference import axis_starts
from ldm.evaluate.volume_latents import case_arrays, latent_start
from ldm.nets.loading import load_vae
from ldm.nets.restorer import RestorerAE, RestorerAEConfig
from ldm.nets.vae import VAEConfig
from ldm.phases.prepare_latents import PrepareLatentsConfig, prepare_latents
from tests.helpers.cli import run_script

# The crops equal patch-wise encoding (EXACT) where a window is the patch. A window that sees
# more than the patch (the default 64^3 windows; here the whole 24^3 volume) changes the first
# stage's output inside the patch through zero padding and GroupNorm statistics: relative RMS
# differences inside the patches (z: / std of the patch-wise latents; mu: / RMS of the
# patch-wise restorer's error) measured on the val patches of the trained first stages: demo z
# 0.66, mu 0.53; MRI z 0.45, mu 0.32; on the tiny pipeline's (4^3 latents, all border) z 1.08,
# mu 0.74. docs/design.md, "Formats", latents/ says why the whole-volume arrays are kept.
Z_BOUND, MU_BOUND = 1.25, 1.0
EXACT = {"atol": 1e-5, "rtol": 1e-4}  # float32 reordering only


def _tiny_first_stage(seed: int = 0) -> RestorerAE:
    torch.manual_seed(seed)
    small = {"channels": (8, 8, 8), "norm_groups": 4}
    cfg = RestorerAEConfig(restorer=VAEConfig(lr_skip=True, residual=True, **small),
                           residual_ae=VAEConfig(latent_channels=4, **small))  # fmt: skip
    return RestorerAE(cfg).eval()


def _patchwise(model, lr, hr):
    with torch.no_grad():
        mu = model.restore(lr)
        return mu, model.encode(hr - mu)[0]


def test_crops_equal_patchwise_encoding_where_the_windows_are_the_patches():
    """Windows of the patch size without overlap tile a 32^3 volume exactly as patches of 16^3
    at stride 16 do: every crop equals the patch's own restorer output and latent."""
    model = _tiny_first_stage()
    g = np.random.default_rng(0)
    lr, hr = g.random((2, 32, 32, 32), dtype=np.float32)
    mu, z = case_arrays(model, lr, hr, (16, 16, 16), overlap=0.0)
    assert mu.shape == (32, 32, 32) and z.shape == (4, 8, 8, 8)
    for start in [(0, 0, 0), (16, 0, 16), (16, 16, 16)]:
        sl = tuple(slice(s, s + 16) for s in start)
        lat = latent_start(start, 4)
        want_mu, want_z = _patchwise(model, torch.from_numpy(lr[sl])[None, None],
                                     torch.from_numpy(hr[sl])[None, None])  # fmt: skip
        torch.testing.assert_close(torch.from_numpy(mu[sl]), want_mu[0, 0], **EXACT)
        crop = z[(slice(None), *(slice(a, a + 4) for a in lat))]
        torch.testing.assert_close(torch.from_numpy(crop), want_z[0], **EXACT)


def test_windows_that_see_more_than_the_patch_stay_within_the_bounds(tiny_pipeline):
    """The default windows (the whole 24^3 volume here) against patch-wise encoding on the tiny
    pipeline's first stage: mu is exactly the restorer on the window predict_ldm runs (here the
    whole volume: the condition inference computes); inside the patches mu and z differ from
    patch-wise encoding by less than the stated bounds, and not by nothing."""
    vae, _ = load_vae(tiny_pipeline.vae)
    pairs = PatchPairs(tiny_pipeline.data_dir, "train")
    vols = {}
    dz, dmu, zs, err = [], [], [], []
    for i in range(len(pairs)):
        e = pairs.lr.index[i]
        if e["case"] not in vols:
            lr_vol = pairs.lr.volume(e["case"])
            vols[e["case"]] = case_arrays(vae, lr_vol, pairs.hr.volume(e["case"]), (64, 64, 64))
            with torch.no_grad():
                inference_mu = vae.restore(torch.from_numpy(np.array(lr_vol))[None, None])
            torch.testing.assert_close(torch.from_numpy(vols[e["case"]][0]), inference_mu[0, 0],
                                       **EXACT)  # fmt: skip
        mu, z = vols[e["case"]]
        lr, hr = pairs[i]
        want_mu, want_z = _patchwise(vae, lr[None], hr[None])
        lat = latent_start(e["start"], 4)
        crop_mu = mu[tuple(slice(s, s + 16) for s in e["start"])]
        crop_z = z[(slice(None), *(slice(a, a + 4) for a in lat))]
        dmu.append(crop_mu - want_mu[0, 0].numpy())
        dz.append(crop_z - want_z[0].numpy())
        zs.append(want_z[0].numpy())
        err.append((hr - want_mu[0]).numpy())

    def rms(x):
        return float(np.sqrt(np.mean(np.square(x))))

    rel_z, rel_mu = rms(dz) / float(np.std(zs)), rms(dmu) / rms(err)
    assert 0 < rel_z < Z_BOUND and 0 < rel_mu < MU_BOUND, (rel_z, rel_mu)


def test_aligned_window_starts_and_rounded_patch_starts():
    assert axis_starts(96, 64, 0.0, 4) == [0, 32]
    assert axis_starts(256, 64, 0.0, 4) == [0, 64, 128, 192]
    assert axis_starts(104, 64, 0.5, 8) == [0, 32, 40]  # flush end, on the grid
    assert all(s % 4 == 0 for s in axis_starts(36 * 4, 32, 0.3, 4))
    assert latent_start((0, 18, 33), 4) == (0, 4, 8)  # off-grid starts rounded down


def _prepare(tmp_path, name: str, stride: int, shape: int = 24):
    data = tmp_path / name
    result = run_script(
        "prepare_data", "--set", f"out_dir={data}", "--set", "phantom.num_cases=4",
        "--set", f"phantom.shape=[{shape}, {shape}, {shape}]", "--set", "patches.size=[16, 16, 16]",
        "--set", f"patches.stride=[{stride}, {stride}, {stride}]",
        "--set", "split.val_fraction=0.25", "--set", "split.test_fraction=0.25",
        "--set", "patches.background_keep=1.0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return data


def _latents(data, vae, **sets):
    extra = [f"{k}={v}" for k, v in sets.items()]
    cfg = load_config(PrepareLatentsConfig, None, [f"data_dir={data}", f"vae_checkpoint={vae}",
                                                   "device=cpu", *extra])  # fmt: skip
    return prepare_latents(cfg)


def _npy_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.npy"))


def test_latents_grow_with_the_volumes_not_the_patches(tiny_pipeline, tmp_path):
    """Stride 8 and stride 2 on the same volumes: 16 times the patches, the same arrays."""
    sparse, dense = _prepare(tmp_path, "sparse", 8), _prepare(tmp_path, "dense", 2)
    for data in (sparse, dense):
        _latents(data, tiny_pipeline.vae)
    n = [json.loads((d / "latents" / "meta.json").read_text())["counts"]["train"]
         for d in (sparse, dense)]  # fmt: skip
    assert n[1] >= 10 * n[0]
    assert _npy_bytes(sparse / "latents") == _npy_bytes(dense / "latents")
    volumes = _npy_bytes(dense / "train") + _npy_bytes(dense / "val") + _npy_bytes(dense / "test")
    assert _npy_bytes(dense / "latents") < 0.6 * volumes  # mu = one LR volume, z = 1/16 of it
    # the crops the diffusion reads are the same wherever the patches overlap
    meta = load_latents_meta(dense / "latents", tiny_pipeline.vae)
    pairs = LatentPairs(dense / "latents", "train", meta["scale_factor"], dense, 4)
    assert len(pairs) == n[1] and pairs[len(pairs) - 1][1].shape == (4, 4, 4, 4)


def test_off_grid_patch_starts_are_rounded_down_to_the_factor(tiny_pipeline, tmp_path):
    """26^3 volumes: the last patch along each axis starts at 10, off the f = 4 grid; its latent
    and condition come from start 8, and the reply says how many starts moved."""
    data = _prepare(tmp_path, "odd", 8, shape=26)
    result = _latents(data, tiny_pipeline.vae)
    meta = result.metrics
    assert meta["starts_rounded"] > 0 and "rounded down to multiples of 4" in result.text
    index = json.loads((data / "latents" / "train" / "patches.json").read_text())
    assert all(s % 4 == 0 for e in index for s in e["start"])
    assert {s for e in index for s in e["start"]} <= {0, 8}
    pairs = LatentPairs(data / "latents", "train", meta["scale_factor"], data, 4)
    lr = pairs.images[0][0]
    e = index[0]
    vol = PatchPairs(data, "train").lr.volume(e["case"])
    want = vol[tuple(slice(s, s + 16) for s in e["start"])]
    torch.testing.assert_close(lr[0], torch.from_numpy(np.array(want)))


def test_a_per_patch_latents_folder_is_refused(tiny_pipeline, tmp_path):
    """Format 2 (mu.npy, z.npy per patch): the meta says rerun prepare_latents --overwrite, and
    so does LatentPairs on a folder without the patch index."""
    old = tmp_path / "latents"
    (old / "train").mkdir(parents=True)
    meta = json.loads((tiny_pipeline.data_dir / "latents" / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    np.save(old / "train" / "mu.npy", np.zeros((2, 1, 16, 16, 16), np.float32))
    np.save(old / "train" / "z.npy", np.zeros((2, 4, 4, 4, 4), np.float32))
    with pytest.raises(DataError, match="unsupported latents format; rerun prepare_latents "
                                        "--overwrite"):  # fmt: skip
        load_latents_meta(old, tiny_pipeline.vae)
    with pytest.raises(DataError, match="rerun prepare_latents --overwrite"):
        LatentPairs(old, "train", 1.0, tiny_pipeline.data_dir, 4)
