"""Kill, resume and --overwrite across the training loop, its run folder and the phases: a crash
or Ctrl-C before or after the first save, a killed staged run, a rerun after a finished or
interrupted run, and tools that must never replace a folder they did not write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.core.errors import UserError
from ldm.train.run_dir import STAGING, Interrupted
from tests.helpers.cli import ROOT, error_line, run_script
from tests.helpers.phases import TINY_FIRST_STAGE
from tests.helpers.tiny_train import run


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
    # the first stage trains in stages that train.steps fixes: resuming longer is refused
    assert "rerun with more train.steps and --overwrite" in result.output
    assert (cfg.read_bytes(), cfg.stat().st_mtime_ns) == before


def test_resuming_a_first_stage_in_other_stages_is_one_error_line(tiny_pipeline, tmp_path):
    """train.steps (or residual_ae_fraction) moves where the joint stage ends: a rerun that
    would resume into other stages is refused, naming both, and the run is left as it was."""
    import shutil

    run = tmp_path / "vae"
    shutil.copytree(tiny_pipeline.vae.parent, run)
    before = (run / "last.pt").read_bytes()
    common = ("train_vae_pair", "--set", f"data_dir={tiny_pipeline.data_dir}",
              "--set", f"out_dir={run}", *TINY_FIRST_STAGE, "--set", "train.batch_size=2",
              "--set", "train.val_every=1", "--set", "train.device=cpu")  # fmt: skip
    result = run_script(*common, "--set", "train.steps=4")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"error: {run / 'last.pt'} was trained in other stages (steps 0-1 | 0-1, 1-2) than this "
        "config gives (steps 0-2 | 0-2, 2-4); keep train.steps and the stage settings of that "
        "run, use another output folder, or --overwrite to start over")
    result = run_script(*common, "--set", "train.steps=2", "--set", "residual_ae_fraction=0")
    assert "than this config gives (one stage)" in error_line(result)
    assert (run / "last.pt").read_bytes() == before


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
