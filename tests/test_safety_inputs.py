"""Data safety (issue 23): damaged checkpoints, resource bombs, odd input files and LR/HR
pairing each end in one error line naming the file and the fix, never in a traceback, a
NaN volume on disk or a multi-gigabyte allocation."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.core.errors import CheckpointError, DataError
from ldm.data.io import load_volume, save_volume
from ldm.nets import UNet, UNetConfig
from ldm.nets.loading import MAX_PARAMETERS, load_unet, load_vae, parameter_count
from ldm.nets.restorer import RestorerAE, RestorerAEConfig
from ldm.nets.vae import VAE, VAEConfig
from ldm.particles.render import load_image
from tests.helpers.cli import error_line, run_script
from tests.helpers.dicom import write_series
from tests.helpers.phases import FAST_TUNE, TINY_FIRST_STAGE, evaluate_cli, predict_cli


def _altered(src: Path, dst: Path, change) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` with ``change(state)`` applied."""
    state = torch.load(src, weights_only=True)
    change(state)
    torch.save(state, dst)
    return dst


def _fill(*suffixes: str, value: float):
    """A change that fills the weights ending in one of ``suffixes`` (model and EMA)."""

    def change(state: dict) -> None:
        for part in ("model", "ema"):
            for name, w in state[part].items():
                if name.endswith(suffixes):
                    w.fill_(value)

    return change


# ---------------------------------------------------------------------------------------------
# 1. NaN/inf weights and non-finite outputs


def test_nan_weights_are_refused_when_a_checkpoint_is_loaded(tiny_pipeline, tmp_path):
    vae = _altered(tiny_pipeline.vae, tmp_path / "vae.pt", _fill("decoder.conv_out.weight",
                                                                 value=float("nan")))  # fmt: skip
    line = error_line(evaluate_cli(tiny_pipeline, tmp_path / "ev", vae=vae))
    assert line.startswith(f"error: {vae}: weight ")
    assert "decoder.conv_out.weight has" in line and "NaN/inf" in line
    assert "--overwrite" in line and "earlier checkpoint" in line
    assert not (tmp_path / "ev").exists()

    diffusion = _altered(tiny_pipeline.diffusion, tmp_path / "diff.pt",
                         _fill("time_mlp.0.bias", value=float("inf")))  # fmt: skip
    line = error_line(predict_cli(tiny_pipeline, tmp_path / "pred", *FAST_TUNE, diffusion=diffusion,
                                  num_samples=2, gif=False))  # fmt: skip
    assert f"{diffusion}: weight " in line and "time_mlp.0.bias" in line
    assert "rerun train_diffusion with --overwrite" in line
    assert not (tmp_path / "pred").exists()  # no all-NaN volume written


def test_outputs_that_overflow_are_not_written(tiny_pipeline, tmp_path):
    """Finite but huge weights overflow to inf/NaN outputs: an error naming the case, and
    nothing of the run on disk."""
    huge = _fill("norm_out.weight", "conv_out.weight", value=1e30)
    vae = _altered(tiny_pipeline.vae, tmp_path / "vae.pt", huge)
    line = error_line(evaluate_cli(tiny_pipeline, tmp_path / "ev", vae=vae))
    assert "error: test case " in line and "restorer output has" in line and "NaN/inf" in line
    assert not (tmp_path / "ev").exists()

    diffusion = _altered(tiny_pipeline.diffusion, tmp_path / "diff.pt", huge)
    line = error_line(predict_cli(tiny_pipeline, tmp_path / "pred", *FAST_TUNE, diffusion=diffusion,
                                  num_samples=2, gif=False))  # fmt: skip
    assert "error: test case " in line and "LDM output has" in line
    assert "nothing written for this case" in line and "earlier checkpoint" in line
    assert not (tmp_path / "pred").exists()


# ---------------------------------------------------------------------------------------------
# 2. resource bombs


@pytest.mark.parametrize(
    "cfg, cls",
    [(UNetConfig(), UNet),
     (UNetConfig(channels=(8, 16), norm_groups=4, num_res_blocks=1), UNet),
     (UNetConfig(channels=(16, 32, 64, 64), attention=False, spatial_dims=2, cond_channels=0),
      UNet),
     (RestorerAEConfig(), RestorerAE), (VAEConfig(lr_skip=True, residual=True), VAE),
     (VAEConfig(channels=(8, 16, 32, 64), num_res_blocks=3, spatial_dims=2), VAE)],
)  # fmt: skip
def test_parameter_count_from_the_config_matches_the_built_net(cfg, cls):
    with torch.device("meta"):  # nothing allocated
        actual = sum(p.numel() for p in cls(cfg).parameters())
    assert 0.97 * actual <= parameter_count(cfg) <= actual  # biases and norms left out


@pytest.mark.parametrize(
    "kind, channels",
    [("diffusion", [2048, 4096]), ("vae", [100000, 200000, 400000])],
)
def test_a_model_config_beyond_any_sane_model_is_refused_before_building(
    tiny_pipeline, tmp_path, kind, channels
):
    def change(state: dict) -> None:
        if kind == "vae":
            state["model_config"]["residual_ae"]["channels"] = channels
        else:
            state["model_config"]["channels"] = channels

    src = tiny_pipeline.vae if kind == "vae" else tiny_pipeline.diffusion
    path = _altered(src, tmp_path / "big.pt", change)
    with pytest.raises(CheckpointError) as e:
        (load_vae if kind == "vae" else load_unet)(path)
    assert str(e.value).startswith(f"{path}: its model_config asks for a network of ")
    assert f"limit {MAX_PARAMETERS:.0g}" in str(e.value) and "refused" in str(e.value)
    if kind == "diffusion":  # the CLI: one line, where it allocated 5.3 GB and crashed
        line = error_line(predict_cli(tiny_pipeline, tmp_path / "pred", *FAST_TUNE, diffusion=path,
                                      num_samples=2, gif=False))  # fmt: skip
        assert str(path) in line and "parameters" in line


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` pixels (a tiny file: a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    chunk = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[8:33] = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(bytes(data))
    return path


def test_a_huge_png_is_one_error_line(tmp_path):
    image = _png_header(tmp_path / "bomb.png", 20000, 20000)
    line = error_line(run_script("particles_gif", "--set", f"out_dir={tmp_path / 'out'}",
                                 "--image", str(image)))  # fmt: skip
    assert f"{image}: refused, too many pixels" in line and "400000000 pixels" in line
    assert "downscale it first" in line and not (tmp_path / "out").exists()


def test_mhd_size_is_checked_without_overflow(tmp_path):
    (tmp_path / "big.raw").write_bytes(b"")
    header = "ObjectType = Image\nNDims = 3\nDimSize = 4194304 4194304 4194304\n"
    header += "ElementType = MET_FLOAT\n"
    (tmp_path / "big.mhd").write_text(header + "ElementDataFile = big.raw\n")
    with pytest.raises(DataError, match=r"big\.raw: file has 0 bytes .* needs 2951479051793528"):
        load_volume(tmp_path / "big.mhd")  # 2**66 voxels overflowed int64 to 0 bytes before
    (tmp_path / "big.mhd").write_text(header + "CompressedData = True\nElementDataFile = big.raw\n")
    with pytest.raises(DataError, match=r"big\.mhd: DimSize .* more than this machine's"):
        load_volume(tmp_path / "big.mhd")


# ---------------------------------------------------------------------------------------------
# 3. input files


def _hr_only(tmp_path, file: Path, extra=()):
    listed = ", ".join([str(file)] * 3)  # three cases, so the split is valid and file is read
    return run_script(
        "prepare_data", "--set", f"out_dir={tmp_path / 'ds'}", "--set", "source=hr_only",
        "--set", f"hr_only.hr=[{listed}]", "--set", "patches.size=[8, 8, 8]", *extra,
    )  # fmt: skip


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.ones((8, 8, 8), np.complex64), "complex values (complex64); the imaginary part"),
        (np.full((8, 8, 8), "a"), "holds non-numeric values (dtype <U1)"),
        (np.zeros((0, 8, 8), np.float32), "the volume is empty (shape (0, 8, 8))"),
    ],
)
def test_npy_inputs_that_are_not_real_volumes(tmp_path, array, expected):
    np.save(tmp_path / "v.npy", array)
    line = error_line(_hr_only(tmp_path, tmp_path / "v.npy"))
    assert f"{tmp_path / 'v.npy'}: {expected}" in line
    if array.dtype.kind == "c":
        assert "np.abs" in line
    np.save(tmp_path / "v.npy", np.ones((8, 8, 8), bool))  # bool is a number: read as 0/1
    assert load_volume(tmp_path / "v.npy")[0].dtype == np.float32


def test_complex_nifti_is_refused(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.complex64), np.eye(4)), tmp_path / "c.nii")
    with pytest.raises(DataError, match=r"c\.nii: complex values .* np\.abs"):
        load_volume(tmp_path / "c.nii")


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("raw.shape=[-64, -64, 64]", "raw.shape must be positive sizes (z, y, x), got [-64, -64"),
        ("raw.dtype=U1", "raw.dtype: 'U1' is not a real number type"),
        ("raw.dtype=complex64", "raw.dtype: 'complex64' is not a real number type"),
    ],
)
def test_bad_raw_settings_are_config_errors(tmp_path, setting, expected):
    np.zeros(64**3, np.float32).tofile(tmp_path / "v.raw")
    extra = ["--set", "raw.shape=[64, 64, 64]", "--set", setting]
    line = error_line(_hr_only(tmp_path, tmp_path / "v.raw", extra=extra))
    assert expected in line


def test_16_bit_png_is_scaled_by_its_range_not_saturated(tmp_path):
    grey8 = np.random.default_rng(0).integers(0, 256, (12, 16)).astype(np.uint8)
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # same picture
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    a, b = load_image(tmp_path / "g8.png"), load_image(tmp_path / "g16.png")
    assert b.shape == (3, 12, 16)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)  # 16-bit / 65535 == 8-bit / 255
    dim = (np.arange(12 * 16).reshape(12, 16) * 10).astype(np.uint16)  # at most 1910 of 65535
    Image.fromarray(dim).save(tmp_path / "dim.png")
    assert float(load_image(tmp_path / "dim.png").max()) == pytest.approx(1910 / 65535)


# ---------------------------------------------------------------------------------------------
# 4. prepare_data pairs are matched by the globs' * part, not by sorted position


def _pairs(folder: Path, out: Path, lr_glob: str, hr_glob: str):
    return run_script(
        "prepare_data", "--set", f"out_dir={out}", "--set", "source=pairs",
        "--set", f"pairs.folder={folder}", "--set", f"pairs.lr_glob={lr_glob}",
        "--set", f"pairs.hr_glob={hr_glob}", "--set", "patches.size=[8, 8, 8]",
        "--set", "split.val_fraction=0",
    )  # fmt: skip


def test_pairs_match_by_the_star_part_and_unmatched_names_are_listed(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    # sorted by name, 'a_b_hr' comes before 'a_hr' but 'a.lr' before 'a_b.lr': by position
    # a.lr would pair with a_b_hr
    for key in ("a", "a_b", "c"):
        hr = rng.random((8, 8, 8)).astype(np.float32)
        save_volume(data / f"{key}_hr.npy", hr)
        save_volume(data / f"{key}.lr.npy", hr + 0.1 * rng.random(hr.shape).astype(np.float32))
    result = _pairs(data, tmp_path / "ds", "*.lr.npy", "*_hr.npy")
    assert result.exit_code == 0, result.output
    cases = json.loads((tmp_path / "ds" / "manifest.json").read_text())["cases"]
    origins = sorted((Path(c["origin"]["lr"]).name, Path(c["origin"]["hr"]).name)
                     for c in cases.values())  # fmt: skip
    assert origins == [("a.lr.npy", "a_hr.npy"), ("a_b.lr.npy", "a_b_hr.npy"),
                       ("c.lr.npy", "c_hr.npy")]  # fmt: skip

    # the case: as many LR as HR files, but e has no HR and ee no LR
    for name in ("e.lr.npy", "ee_hr.npy", "f.lr.npy", "ff_hr.npy"):
        save_volume(data / name, rng.random((8, 8, 8)).astype(np.float32))
    line = error_line(_pairs(data, tmp_path / "ds2", "*.lr.npy", "*_hr.npy"))
    assert line.startswith(f"error: {data}: 4 file(s) have no partner with the same * part")
    assert "e.lr.npy, f.lr.npy, ee_hr.npy and 1 more" in line
    assert "pairs.lr_glob '*.lr.npy'" in line and "add the partners" in line
    assert not (tmp_path / "ds2").exists()


def test_dicom_series_folders_pair_by_the_star_part(tmp_path):
    scans = tmp_path / "scans"
    stored = np.random.default_rng(1).integers(0, 400, (8, 8, 8)).astype(np.int16)
    for name in ("p1_lr", "p1_hr", "p2_lr", "p22_hr"):
        write_series(scans / name, stored)
    line = error_line(_pairs(scans, tmp_path / "ds", "*_lr", "*_hr"))
    assert "2 file(s) have no partner" in line and "p2_lr, p22_hr;" in line


# ---------------------------------------------------------------------------------------------
# 5. a checkpoint that would run code when unpickled


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(path: Path, marker: Path, zip_format: bool) -> Path:
    state = {"format_version": 1, "kind": "vae", "model_config": {}, "x": _Payload(marker)}
    if zip_format:
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=2)  # torch.save's legacy (non-zip) format
    return path


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "plain-pickle"])
@pytest.mark.parametrize("entry", ["vae_checkpoint", "diffusion_checkpoint", "resume"])
def test_a_checkpoint_that_would_run_code_is_refused(tiny_pipeline, tmp_path, zip_format, entry):
    marker = tmp_path / "payload-ran"
    bad = _malicious(tmp_path / "evil.pt", marker, zip_format)
    if entry == "vae_checkpoint":
        result = run_script(
            "evaluate_psnr", "--set", f"data_dir={tiny_pipeline.data_dir}",
            "--set", f"vae_checkpoint={bad}", "--set", f"out_dir={tmp_path / 'r'}",
        )  # fmt: skip
    elif entry == "diffusion_checkpoint":
        result = run_script(
            "predict_ldm", "--set", f"data_dir={tiny_pipeline.data_dir}",
            "--set", f"vae_checkpoint={tiny_pipeline.vae}", "--set", f"diffusion_checkpoint={bad}",
            "--set", f"out_dir={tmp_path / 'r'}",
        )  # fmt: skip
    else:  # a planted last.pt in the run folder: resume loads it
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        bad.rename(run_dir / "last.pt")
        bad = run_dir / "last.pt"
        result = run_script(
            "train_vae_pair", "--set", f"data_dir={tiny_pipeline.data_dir}",
            "--set", f"out_dir={run_dir}", *TINY_FIRST_STAGE, "--set", "train.steps=2",
            "--set", "train.batch_size=2", "--set", "train.device=cpu",
        )  # fmt: skip
    line = error_line(result)
    assert str(bad) in line and "could run code" in line
    assert not marker.exists()
