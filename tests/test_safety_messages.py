"""Issue 23: mistakes and accidents a user meets give one `error:` line that names the file and
the fix (no traceback, no advice that leads nowhere), and nothing is left half-written."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from ldm.cli.app import app
from ldm.cli.common import Terminated, run_phase, sigterm_as_interrupt
from ldm.core.errors import CheckpointError, UserError, os_error_message
from ldm.data.dataset import MANIFEST_VERSION
from ldm.evaluate.baselines import save_metrics_csv
from ldm.evaluate.scores_json import finite_json, restore_non_finite
from ldm.train.run_dir import deferred_interrupts
from tests.helpers.cli import ROOT, error_line, run_script
from tests.helpers.tiny_train import run

# ---------------------------------------------------------------------------------------------
# A. tracebacks and wrong exits -> one error line, exit 2


def test_a_binary_file_as_config_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(bytes(range(256)) * 4)  # invalid UTF-8 from byte 128 on
    line = error_line(run_script("prepare_data", "--config", bad))
    assert line.startswith(f"error: {bad}: not a YAML text file")
    assert "configs/<profile>/<phase>.yaml" in line


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.num_workers=-1", "train.num_workers must be >= 0, got -1"),
        ("train.betas=[1.5, 0.9]", "train.betas[0] must be in [0, 1), got 1.5"),
        ("train.weight_decay=-1", "train.weight_decay must be >= 0, got -1"),
    ],
)
def test_train_settings_torch_would_refuse_late_are_refused_with_the_config(
    tmp_path, override, message
):
    # DataLoader / AdamW raised ValueError tracebacks after the data was loaded
    result = run_script(
        "train_vae_pair", "--set", f"data_dir={tmp_path / 'missing'}",
        "--set", f"out_dir={tmp_path / 'out'}", "--set", override,
    )  # fmt: skip
    line = error_line(result)
    assert message in line and "dataset not found" not in line


def test_a_manifest_that_is_not_an_object_is_one_error_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("[1, 2, 3]\n")
    result = run_script(
        "train_vae_pair", "--set", f"data_dir={data}", "--set", f"out_dir={tmp_path / 'out'}"
    )
    assert error_line(result) == (
        f"error: {data / 'manifest.json'}: not a dataset manifest (a JSON list, not an object); "
        "rerun prepare_data --overwrite"
    )


def test_disk_full_while_saving_a_checkpoint_keeps_the_earlier_one(tmp_path, monkeypatch):
    run(tmp_path, steps=5)
    before = {n: (tmp_path / n).read_bytes() for n in ("last.pt", "best.pt")}

    def full_disk(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills up
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                           "failed writing file data/3: file write failed")  # fmt: skip

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError) as exc:
        run(tmp_path, steps=10)
    assert str(exc.value) == (  # best.pt: step 10 validates better before it saves last.pt
        f"{tmp_path / 'best.pt'}: cannot write the checkpoint (PytorchStreamWriter failed "
        "writing file data/3: file write failed); free space on that disk (or fix the folder's "
        "permissions), then rerun to resume; any earlier best.pt is unchanged"
    )
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["prepare_data", "--bogus"], "No such option: --bogus"),
        (["prepare_data", "--config"], "Option '--config' requires an argument"),
        (["prepare_dat"], "No such command 'prepare_dat'"),
    ],
)
def test_usage_errors_are_one_line_with_the_help_to_run(args, message):
    result = CliRunner().invoke(app, args)
    line = error_line(result)
    assert line.startswith(f"error: {message}") and "--help' for the options)" in line
    assert result.output.strip() == line  # no usage lines, no box


def test_usage_error_of_a_phase_script():
    p = subprocess.run(
        [sys.executable, "scripts/predict_ldm.py", "--inpt", "scan.nii.gz"], cwd=ROOT,
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == (
        "error: No such option: --inpt (Possible options: --input, --input-glob) "
        "(run 'predict_ldm.py --help' for the options)\n"
    )


# ---------------------------------------------------------------------------------------------
# B. messages that sent the user the wrong way


def test_a_constant_hr_volume_names_the_file(tmp_path):
    rng = np.random.default_rng(0)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i in range(4):
        hr = rng.random((16, 16, 16), dtype=np.float32)
        np.save(pairs / f"c{i}_lr.npy", hr + 0.1 * rng.random((16, 16, 16), dtype=np.float32))
        np.save(pairs / f"c{i}_hr.npy", np.zeros_like(hr) if i == 2 else hr)
    result = run_script(
        "prepare_data", "--set", f"out_dir={tmp_path / 'ds'}", "--set", "source=pairs",
        "--set", f"pairs.folder={pairs}", "--set", "pairs.lr_glob=*_lr.npy",
        "--set", "pairs.hr_glob=*_hr.npy", "--set", "patches.size=[16, 16, 16]",
        "--set", "split.val_fraction=0.25", "--set", "split.test_fraction=0.25",
    )  # fmt: skip
    line = error_line(result)
    assert line.startswith(f"error: {pairs / 'c2_hr.npy'}: the HR volume of case")
    assert "is constant (every voxel 0)" in line and "data_range" not in line


def _minimal_dataset(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"format_version": MANIFEST_VERSION}))
    return data


def test_a_constant_target_names_the_file(tmp_path):
    data = _minimal_dataset(tmp_path)
    lr, hr = tmp_path / "lr.npy", tmp_path / "hr.npy"
    np.save(lr, np.random.default_rng(0).random((16, 16, 16), dtype=np.float32))
    np.save(hr, np.zeros((16, 16, 16), np.float32))
    result = run_script(
        "evaluate_psnr", "--set", f"data_dir={data}", "--set", f"out_dir={tmp_path / 'out'}",
        "--input", lr, "--target", hr,
    )  # fmt: skip
    assert error_line(result) == (
        f"error: {hr}: the --target volume is constant (every voxel 0), so PSNR and SSIM "
        f"against it are undefined; check that it is the HR scan of {lr}"
    )


@pytest.mark.parametrize("phase", ["evaluate_psnr", "predict_ldm"])
@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "hr.npy"], "--target needs --input"),
        (["--input-glob", "*_lr.npy"], "--input-glob/--target-glob need --folder"),
        (["--resample"], "--resample needs --input"),
    ],
)
def test_external_options_without_their_input_are_refused(tmp_path, phase, args, message):
    # they were ignored, and the phase ran on the test set
    data = _minimal_dataset(tmp_path)
    result = run_script(
        phase, "--set", f"data_dir={data}", "--set", f"out_dir={tmp_path / 'out'}", *args
    )
    assert error_line(result).startswith(f"error: {phase}: {message}")
    assert not (tmp_path / "out").exists()


def test_a_truncated_last_pt_says_how_to_start_over(tmp_path):
    run(tmp_path, steps=5)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:200])
    with pytest.raises(CheckpointError) as exc:
        run(tmp_path, steps=10)
    assert str(exc.value) == (
        f"{last}: cannot resume from it (corrupt or not a checkpoint (RuntimeError)); rerun with "
        f"--overwrite to start this training over, or delete {last}"
    )
    run(tmp_path, steps=10, overwrite=True)  # the advice works
    assert torch.load(last, weights_only=True)["step"] == 10


def test_a_finished_run_rewrites_a_deleted_best_pt(tmp_path, caplog):
    run(tmp_path, steps=5)
    (tmp_path / "best.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="ldm.train.training"):
        run(tmp_path, steps=5)  # "already trained": it used to leave best.pt missing for good
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["step"] == 5 and best["kind"] == "vae"
    assert "best.pt was missing: rewrote it from last.pt (step 5" in caplog.text


def test_an_unfinished_run_writes_a_deleted_best_pt_at_its_next_validation(tmp_path):
    run(tmp_path, steps=5)
    (tmp_path / "best.pt").unlink()
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    last["best_score"] = 1e9  # the lost best.pt scored better than any later validation will
    torch.save(last, tmp_path / "last.pt")
    run(tmp_path, steps=10)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == 10


def test_disk_full_without_a_path_names_the_output_folder(capsys):
    from ldm.phases.predict_ldm import PredictConfig

    def fn(_cfg):  # a write() on a full disk: the OSError carries no file name
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(typer.Exit) as exc:
        run_phase("predict_ldm", PredictConfig, None, ["out_dir=/x/out"], fn)
    assert exc.value.exit_code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: writing in /x/out: No space left on device; free space on that disk (or choose "
        "another out_dir), then rerun"
    )


def test_an_out_dir_below_a_file_says_so(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    for phase in ("prepare_data", "train_vae_pair"):
        line = error_line(run_script(phase, "--set", f"out_dir={blocker / 'out'}"))
        assert line == (
            f"error: {blocker} is a file, not a folder, so out_dir {blocker / 'out'} cannot be "
            "made below it; choose another out_dir"
        )
    assert blocker.read_text() == "x"
    e = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(blocker / "a" / "b"))
    assert os_error_message(e) == (
        f"{blocker / 'a' / 'b'}: {blocker} is a file, not a folder; choose another path"
    )


def test_a_config_folder_says_a_config_file_is_needed(tmp_path):
    line = error_line(run_script("prepare_data", "--config", ROOT / "configs" / "demo"))
    assert line == (
        f"error: {ROOT / 'configs' / 'demo'} is a folder, not a config file; pass --config "
        f"{ROOT / 'configs' / 'demo' / 'prepare_data.yaml'}"
    )
    line = error_line(run_script("prepare_data", "--config", tmp_path))
    assert line == (
        f"error: {tmp_path} is a folder, not a config file; pass a YAML file such as "
        "configs/<profile>/prepare_data.yaml"
    )


def _strict_json(text: str):
    """json.loads as jq or JavaScript read it: a bare Infinity or NaN is an error."""

    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_metrics_json_has_no_bare_infinity_and_agrees_with_the_csv(tmp_path):
    per_case = {"a": {"baseline": {"psnr": math.inf, "ssim": 1.0, "contrast": math.nan},
                      "restorer": {"psnr": 31.5, "ssim": 0.9, "contrast": 1.0}}}  # fmt: skip
    metrics = {"cases": per_case, "mean": {"baseline": {"psnr": math.inf}}}
    data = _strict_json(json.dumps(finite_json(metrics)))
    assert data["cases"]["a"]["baseline"]["psnr"] is None
    assert data["cases"]["a"]["restorer"]["psnr"] == 31.5
    assert "equals the HR" in data["non_finite"]["note"]
    assert {"path": ["cases", "a", "baseline", "psnr"], "value": "inf"} in data["non_finite"][
        "values"
    ]
    back = restore_non_finite(data)
    assert back["cases"]["a"]["baseline"]["psnr"] == math.inf
    assert math.isnan(back["cases"]["a"]["baseline"]["contrast"]) and "non_finite" not in back
    csv = save_metrics_csv(per_case, tmp_path / "metrics.csv").read_text().splitlines()
    assert csv[1].startswith("baseline,a,inf,1.0")  # the same value, as spreadsheets read it


def test_evaluate_psnr_of_an_input_equal_to_its_target_writes_valid_json(tiny_pipeline, tmp_path):
    test_hr = sorted((tiny_pipeline.data_dir / "test" / "volumes").glob("*_hr.npy"))[0]
    out = tmp_path / "eval"
    result = run_script(
        "evaluate_psnr", "--set", f"data_dir={tiny_pipeline.data_dir}",
        "--set", f"vae_checkpoint={tiny_pipeline.vae}", "--set", f"out_dir={out}",
        "--set", "device=cpu", "--input", test_hr, "--target", test_hr,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = _strict_json((out / "metrics.json").read_text())
    name = next(iter(data["cases"]))
    assert data["cases"][name]["baseline"]["psnr"] is None
    assert data["non_finite"]["values"][0]["value"] == "inf"


# ---------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_outside_training_drops_the_staged_output_and_exits_130(tmp_path):
    out = tmp_path / "ds"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ldm", "prepare_data", "--set", f"out_dir={out}",
         "--set", "phantom.num_cases=30", "--set", "phantom.shape=[48, 48, 48]"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    deadline = time.time() + 60
    while not list(tmp_path.glob(".ds.*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".ds.*.tmp")), "the phase never staged its output"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"prepare_data interrupted (SIGTERM); {out} is as it was"
    assert not list(tmp_path.glob(".ds.*")) and not out.exists()  # nothing left behind


def test_training_still_defers_sigterm_inside_the_phase_handler():
    with sigterm_as_interrupt():
        with deferred_interrupts() as flag:  # what the training loop runs in
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert flag == [signal.SIGTERM]  # no exception: the loop saves first
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
