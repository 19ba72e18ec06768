"""Faults a hostile but realistic user meets: code in a checkpoint, --overwrite then a crash,
OS errors on their paths, Ctrl-C during training, MetaImage details, config value forms."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import typer

from ldm.cli.common import run_phase
from ldm.core.config import load_config
from ldm.core.errors import ConfigError, DataError, UserError
from ldm.data.io import VolumeMeta, load_volume, save_volume
from ldm.phases.train_vae_pair import TrainVAEConfig
from ldm.train.run_dir import STAGING, Interrupted
from tests.helpers.cli import ROOT, error_line, run_script
from tests.helpers.tiny_train import run


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# the first stage of tests/conftest.py's tiny pipeline
TINY_FIRST_STAGE = ["--set", "model.restorer.channels=[8, 8, 8]",
                    "--set", "model.restorer.norm_groups=4",
                    "--set", "model.residual_ae.channels=[8, 8, 8]",
                    "--set", "model.residual_ae.norm_groups=4",
                    "--set", "model.residual_ae.latent_channels=4"]  # fmt: skip


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


def _files(run_dir: Path) -> dict[str, bytes]:
    return {n: (run_dir / n).read_bytes() for n in ("last.pt", "best.pt", "metrics.jsonl")}


def test_overwrite_then_crash_before_first_save_keeps_the_old_run(tmp_path):
    run(tmp_path, steps=10)
    before = _files(tmp_path)
    with pytest.raises(KeyboardInterrupt):  # crash at step 3; the first save would be at 5
        run(tmp_path, steps=10, crash_at=3, overwrite=True)
    assert _files(tmp_path) == before
    with pytest.raises(UserError, match="loss became"):  # a diverging run
        run(tmp_path, steps=10, lr_override=1e30, overwrite=True)
    assert _files(tmp_path) == before
    run(tmp_path, steps=10)  # no --overwrite: resumes the old run, already complete
    assert _files(tmp_path) == before
    assert not (tmp_path / STAGING).exists()


def test_overwrite_replaces_the_old_run_once_the_new_one_saved(tmp_path):
    run(tmp_path, steps=10)
    old = _files(tmp_path)
    run(tmp_path, steps=6, overwrite=True)
    new = _files(tmp_path)
    assert all(new[k] != old[k] for k in new)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 6
    assert not (tmp_path / STAGING).exists()


def test_a_staged_run_killed_after_its_first_save_is_committed_on_rerun(tmp_path):
    run(tmp_path, steps=5)
    staging = tmp_path / STAGING
    staging.mkdir()
    run(staging, steps=10)  # stands for a killed --overwrite run that saved last.pt
    staged = (staging / "last.pt").read_bytes()
    (tmp_path / ".tmp-abc-last.pt").write_bytes(b"half")  # a torn atomic write
    run(tmp_path, steps=10)  # rerun: commits the staged run, then resumes it (already done)
    assert (tmp_path / "last.pt").read_bytes() == staged
    assert not staging.exists() and not (tmp_path / ".tmp-abc-last.pt").exists()


def test_resume_does_not_duplicate_metric_rows(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # crash during step 8; last.pt holds step 5
        run(tmp_path, steps=12, crash_at=8)
    run(tmp_path, steps=12)
    import json

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    val_steps = [r["step"] for r in rows if "val" in r]
    assert train_steps == [2, 4, 6, 8, 10, 12] and val_steps == [5, 10, 12]


def test_sigint_saves_last_and_the_rerun_resumes(tmp_path):
    script = (
        "import sys; from pathlib import Path; from ldm.train.run_dir import Interrupted\n"
        "from tests.helpers.tiny_train import run\n"
        "try:\n    run(Path(sys.argv[1]), steps=100000, step_sleep=0.01)\n"
        "except Interrupted as e:\n    print(e); sys.exit(e.exit_code)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    deadline = time.time() + 60
    while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    step = torch.load(tmp_path / "last.pt", weights_only=True)["step"]
    assert out.strip() == f"interrupted at step {step}; rerun the same command to resume"
    assert 0 < step < 100000


def test_interrupted_phase_exits_130_with_its_message(monkeypatch):
    def fn(_cfg):
        raise Interrupted("interrupted at step 7; rerun the same command to resume")

    with pytest.raises(typer.Exit) as exc:
        run_phase("train_vae_pair", TrainVAEConfig, None, [], fn)
    assert exc.value.exit_code == 130


def test_ctrl_c_in_a_phase_without_a_training_loop_exits_130_with_one_line(capsys):
    # e.g. predict_ldm: its staged output folder is dropped, so the old output stands
    from ldm.phases.predict_ldm import PredictConfig

    def fn(_cfg):
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as exc:
        run_phase("predict_ldm", PredictConfig, None, ["out_dir=/x/out"], fn)
    assert exc.value.exit_code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "predict_ldm interrupted; /x/out is as it was"


def test_out_dir_that_is_a_file(tiny_pipeline, tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    result = run_script(
        "train_vae_pair", "--set", f"data_dir={tiny_pipeline.data_dir}", "--set", f"out_dir={f}",
        "--set", "train.steps=1", "--set", "train.device=cpu",
    )  # fmt: skip
    assert "exists and is not a folder" in error_line(result)
    assert f.read_text() == "x"


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write into (chmod for users; /sys for root)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").write_text("x")
    except PermissionError:
        return d
    (d / "probe").unlink()
    return Path("/sys/ldm3d-test")  # root ignores modes; sysfs refuses new files


@pytest.mark.parametrize("phase", ["train_vae_pair", "evaluate_psnr", "prepare_data"])
def test_unwritable_output_is_one_error_line_before_any_work(tiny_pipeline, tmp_path, phase):
    target = _unwritable(tmp_path) / "out"
    args = ["--set", f"out_dir={target}"]
    if phase != "prepare_data":
        args += (
            ["--set", f"data_dir={tiny_pipeline.data_dir}", "--set", "train.steps=1"]
            if phase == "train_vae_pair"
            else [
                "--set",
                f"data_dir={tiny_pipeline.data_dir}",
                "--set",
                f"vae_checkpoint={tiny_pipeline.vae}",
            ]
        )
    else:
        args += ["--set", "phantom.num_cases=3", "--set", "phantom.shape=[16, 16, 16]",
                 "--set", "patches.size=[16, 16, 16]"]  # fmt: skip
    line = error_line(run_script(phase, *args))
    assert str(target.parent) in line


def test_metaimage_round_trip_keeps_direction_spacing_origin(tmp_path):
    vol = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    c, s = np.cos(0.3), np.sin(0.3)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    meta = VolumeMeta("raw", spacing=(3.0, 1.0, 0.5), origin=(1.0, 2.0, 3.0), direction=direction)
    save_volume(tmp_path / "v.raw", vol, meta)
    assert "TransformMatrix" in (tmp_path / "v.mhd").read_text()
    img = sitk.ReadImage(str(tmp_path / "v.mhd"))  # an independent reader agrees
    assert np.allclose(img.GetDirection(), direction) and img.GetSpacing() == (0.5, 1.0, 3.0)
    data, m = load_volume(tmp_path / "v.mhd")
    assert np.array_equal(data, vol) and np.allclose(m.direction, direction)
    assert m.spacing == (3.0, 1.0, 0.5) and m.origin == (1.0, 2.0, 3.0)
    assert VolumeMeta.from_dict(m.to_dict()) == m


@pytest.mark.parametrize("compressed", [False, True])
def test_metaimage_local_and_compressed_data(tmp_path, compressed):
    vol = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.8, 0.9))
    path = tmp_path / "a.mha" if not compressed else tmp_path / "a.mhd"
    sitk.WriteImage(img, str(path), useCompression=compressed)
    if path.suffix == ".mha":  # LOCAL: header and data in one file; rename to .mhd
        path = path.rename(tmp_path / "local.mhd")
        assert "ElementDataFile = LOCAL" in path.read_bytes()[:400].decode(errors="replace")
    data, m = load_volume(path)
    assert np.array_equal(data, vol.astype(np.float32)) and m.spacing == (0.9, 0.8, 0.7)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("DimSize", "4 4", "DimSize has 2 values but NDims = 3"),
        ("ElementSpacing", "1 one 1", "malformed MetaImage header field"),
        ("Offset", "0 0 x", "malformed MetaImage header field"),
    ],
)
def test_malformed_mhd_fields(tmp_path, field, value, message):
    save_volume(tmp_path / "v.raw", np.zeros((4, 4, 4), np.float32))
    mhd = tmp_path / "v.mhd"
    lines = [f"{field} = {value}" if x.startswith(f"{field} ") else x
             for x in mhd.read_text().splitlines()]  # fmt: skip
    mhd.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as e:
        load_volume(mhd)
    assert str(mhd) in str(e.value)


def test_float_keys_accept_yaml_exponent_strings_and_messages_name_keys_once(tmp_path):
    path = ROOT / "configs" / "train_vae_pair.yaml"
    assert load_config(TrainVAEConfig, path, ["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(ConfigError) as e:
        load_config(TrainVAEConfig, path, ["train.steps=0"])
    assert "train.steps must be >= 1" in str(e.value) and "train.train." not in str(e.value)


def test_predict_input_headerless_raw_uses_the_raw_section(tiny_pipeline, tmp_path):
    vol = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    vol.tofile(tmp_path / "scan.raw")
    tp = tiny_pipeline
    args = ["--set", f"data_dir={tp.data_dir}", "--set", f"vae_checkpoint={tp.vae}",
            "--set", f"diffusion_checkpoint={tp.diffusion}", "--set", "sampler.steps=2",
            "--set", "gif=false", "--set", "device=cpu"]  # fmt: skip
    line = error_line(run_script("predict_ldm", "--input", tmp_path / "scan.raw",
                                 "--set", f"out_dir={tmp_path / 'a'}", *args))  # fmt: skip
    assert "raw.shape" in line
    result = run_script("predict_ldm", "--input", tmp_path / "scan.raw",
                        "--set", "raw.shape=[16, 16, 16]", "--set", f"out_dir={tmp_path / 'b'}",
                        *args)  # fmt: skip
    assert result.exit_code == 0, result.output
    out, _ = load_volume(tmp_path / "b" / "scan" / "scan_ldm.raw")
    assert out.shape == (16, 16, 16)


def test_noop_rerun_leaves_config_yaml_alone(tiny_pipeline):
    cfg = tiny_pipeline.vae.parent / "config.yaml"
    before = (cfg.read_bytes(), cfg.stat().st_mtime_ns)
    result = run_script(
        "train_vae_pair", "--set", f"data_dir={tiny_pipeline.data_dir}",
        "--set", f"out_dir={tiny_pipeline.vae.parent}", *TINY_FIRST_STAGE,
        "--set", "train.steps=2", "--set", "train.batch_size=2",
        "--set", "train.val_every=1", "--set", "train.device=cpu",
    )  # fmt: skip
    assert result.exit_code == 0 and "already trained" in result.output
    assert (cfg.read_bytes(), cfg.stat().st_mtime_ns) == before


def test_prepare_data_overwrite_says_it_replaced_latents(tiny_pipeline, tmp_path):
    import shutil

    data = tmp_path / "ds"
    shutil.copytree(tiny_pipeline.data_dir, data)
    args = ["--set", f"out_dir={data}", "--set", "phantom.num_cases=4",
            "--set", "phantom.shape=[24, 24, 24]", "--set", "patches.size=[16, 16, 16]",
            "--set", "patches.stride=[8, 8, 8]", "--set", "split.val_fraction=0.25",
            "--set", "split.test_fraction=0.25", "--overwrite"]  # fmt: skip
    result = run_script("prepare_data", *args)
    assert result.exit_code == 0 and "rerun prepare_latents" in result.output, result.output
    assert not (data / "latents").exists()


def test_fault_check_never_replaces_a_folder_it_did_not_make(tmp_path) -> None:
    # fault_check replaces its workspace on every run: a mistyped --workspace pointing at a
    # user's folder must be refused, not emptied
    from ldm.core.errors import UserError
    from ldm.tools.fault_check import fault_check

    mine = tmp_path / "scans"
    mine.mkdir()
    (mine / "brain.nii.gz").write_bytes(b"data")
    with pytest.raises(UserError, match="did not write"):
        fault_check(mine, kills=1, log=lambda s: None)
    assert (mine / "brain.nii.gz").read_bytes() == b"data"
    with pytest.raises(UserError, match="--kills must be >= 1"):
        fault_check(tmp_path / "new", kills=0, log=lambda s: None)


def test_ctrl_c_in_an_overwrite_run_keeps_the_earlier_run_until_the_new_one_has_saved(tmp_path):
    # before its first checkpoint an --overwrite run is staged; Ctrl-C drops it (saving there
    # would replace best.pt with nothing); after it, resuming must go without --overwrite
    run(tmp_path, steps=10)
    before = {n: (tmp_path / n).read_bytes() for n in ("last.pt", "best.pt", "metrics.jsonl")}
    with pytest.raises(Interrupted, match="interrupted at step 3, before this --overwrite run's "
                       "first checkpoint: .* still holds the earlier run; rerun to start over"):
        run(tmp_path, steps=10, overwrite=True, interrupt_at=3)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not (tmp_path / STAGING).exists()
    with pytest.raises(Interrupted, match="at step 7; rerun without --overwrite to resume"):
        run(tmp_path, steps=20, overwrite=True, interrupt_at=7)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 7
    run(tmp_path, steps=20)  # resumes
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 20
