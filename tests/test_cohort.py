"""predict_ldm and evaluate_psnr over a folder: sharded over torchrun ranks, resumable per case,
the same volumes and scores whatever the number of processes (eta = 0, fixed seed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ldm.data.io import load_volume, save_volume
from tests.helpers.cli import run_script
from tests.helpers.phases import FAST_TUNE, evaluate_args, predict_args

ROOT = Path(__file__).resolve().parents[1]


def _folder(tp, tmp_path) -> Path:
    """4 cases: the tiny test volumes and flipped copies, as NIfTI."""
    manifest = json.loads((tp.data_dir / "manifest.json").read_text())
    folder = tmp_path / "scans"
    folder.mkdir()
    vols = [np.load(tp.data_dir / c["volume"]["lr"]) * 100.0
            for c in manifest["cases"].values() if c["split"] == "test"]
    v = vols[0]
    flips = [v[::-1], v[:, ::-1], v[:, :, ::-1], v.transpose(1, 0, 2)]
    vols = [np.ascontiguousarray(f) for v in vols for f in (v, *flips)][:4]
    assert len(vols) == 4
    for i, v in enumerate(vols):
        save_volume(folder / f"case{i}_lr.nii.gz", v.astype(np.float32))
    return folder


def _args(tp, folder: Path, out: Path) -> list[str]:
    return ["--folder", str(folder), "--input-glob", "*_lr.nii.gz",
            *predict_args(tp, out, num_samples=2, gif=False)]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
                          encoding="utf-8", errors="replace")  # fmt: skip


def _volumes(out: Path) -> dict[str, np.ndarray]:
    return {p.name: load_volume(p)[0] for p in sorted(out.glob("case*/*.nii.gz"))}


def test_two_processes_give_the_single_process_volumes_bit_for_bit(tiny_pipeline, tmp_path):
    folder = _folder(tiny_pipeline, tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _run([sys.executable, "-m", "ldm", "predict_ldm", *_args(tiny_pipeline, folder, one)])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--standalone", "-m", "ldm", "predict_ldm",
               *_args(tiny_pipeline, folder, two)])  # fmt: skip
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = _volumes(one), _volumes(two)
    assert sorted(a) == sorted(b) and len(a) == 8  # 4 cases x (mean, std)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    summary = json.loads((two / "metrics.json").read_text())
    assert sorted(summary["cases"]) == ["case0", "case1", "case2", "case3"]
    assert summary["world_size"] == 2


def test_a_rerun_redoes_only_the_unfinished_case(tiny_pipeline, tmp_path):
    folder = _folder(tiny_pipeline, tmp_path)
    out = tmp_path / "out"
    args = ["predict_ldm", *_args(tiny_pipeline, folder, out)]
    assert run_script(*args).exit_code == 0
    done = {p: p.stat().st_mtime_ns for p in out.glob("case[012]/*")}
    lost = out / "case3"
    before = load_volume(lost / "case3_ldm.nii.gz")[0]
    # a kill during case3: its folder never reached its final name, a partial staging is left
    os.replace(lost, out / ".stage-0-999999999")
    (out / ".stage-0-999999999" / "case3_ldm.nii.gz").write_bytes(b"partial")
    result = run_script(*args)  # same settings: no --overwrite needed
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("case[012]/*")} == done
    assert np.array_equal(load_volume(lost / "case3_ldm.nii.gz")[0], before)
    assert not list(out.glob(".stage-*"))
    assert len(json.loads((out / "metrics.json").read_text())["cases"]) == 4


def test_other_settings_or_foreign_files_are_refused(tiny_pipeline, tmp_path):
    folder = _folder(tiny_pipeline, tmp_path)
    out = tmp_path / "out"
    args = ["predict_ldm", *_args(tiny_pipeline, folder, out)]
    assert run_script(*args).exit_code == 0
    result = run_script(*args, "--set", "seed=1")
    assert result.exit_code == 2 and "other settings" in result.output
    assert run_script(*args, "--set", "seed=1", "--overwrite").exit_code == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = run_script("predict_ldm", *_args(tiny_pipeline, folder, foreign)[0:], "--overwrite")
    assert result.exit_code == 2 and "did not write" in result.output
    assert (foreign / "notes.txt").read_text() == "keep me"


# evaluate_psnr: the same shared cohort logic (ldm/core/cohort.py) -------------------------------


def _pairs(tp, tmp_path) -> Path:
    """4 LR/HR pairs: a tiny test case and flipped copies, as NIfTI."""
    manifest = json.loads((tp.data_dir / "manifest.json").read_text())
    case = next(c for c in manifest["cases"].values() if c["split"] == "test")
    lr, hr = (np.load(tp.data_dir / case["volume"][k]) * 100.0 for k in ("lr", "hr"))
    folder = tmp_path / "pairs"
    folder.mkdir()
    flips = (lambda v: v, lambda v: v[::-1], lambda v: v[:, ::-1], lambda v: v.transpose(1, 0, 2))
    for i, flip in enumerate(flips):
        for kind, v in (("lr", lr), ("hr", hr)):
            v = np.ascontiguousarray(flip(v), np.float32)
            save_volume(folder / f"case{i}_{kind}.nii.gz", v)
    return folder


def _eval_args(tp, out: Path, folder: Path | None = None) -> list[str]:
    pairs = [] if folder is None else ["--folder", str(folder), "--input-glob", "*_lr.nii.gz",
                                       "--target-glob", "*_hr.nii.gz"]  # fmt: skip
    return [*pairs, *evaluate_args(tp.data_dir, tp.vae, out), *FAST_TUNE]


def test_evaluate_two_processes_give_the_single_process_scores(tiny_pipeline, tmp_path):
    folder = _pairs(tiny_pipeline, tmp_path)
    one, two, single = tmp_path / "one", tmp_path / "two", tmp_path / "single"
    result = run_script("evaluate_psnr", *_eval_args(tiny_pipeline, one, folder))
    assert result.exit_code == 0, result.output
    r2 = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--standalone", "-m", "ldm", "evaluate_psnr",
               *_eval_args(tiny_pipeline, two, folder)])  # fmt: skip
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert list(b["cases"]) == ["case0", "case1", "case2", "case3"]
    for key in ("cases", "mean", "tuned", "external"):
        assert a[key] == b[key], key
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert (one / "metrics.csv").read_bytes() == (two / "metrics.csv").read_bytes()
    for d in (one, two):
        assert (d / "comparison.png").is_file() and len(list(d.glob("case*/comparison.png"))) == 4
    # the single-process writer (one pair, no cohort) scores that case the same
    lr, hr = folder / "case0_lr.nii.gz", folder / "case0_hr.nii.gz"
    args = ["--input", str(lr), "--target", str(hr), *_eval_args(tiny_pipeline, single)]
    assert run_script("evaluate_psnr", *args).exit_code == 0
    plain = json.loads((single / "metrics.json").read_text())
    assert list(plain["cases"].values()) == [a["cases"]["case0"]]


def test_evaluate_rerun_keeps_finished_cases_and_replaces_only_its_own_results(
    tiny_pipeline, tmp_path
):
    folder = _pairs(tiny_pipeline, tmp_path)
    out = tmp_path / "out"
    args = ["evaluate_psnr", *_eval_args(tiny_pipeline, out, folder)]
    assert run_script("evaluate_psnr", *_eval_args(tiny_pipeline, out)).exit_code == 0  # test set
    result = run_script(*args)  # a single-process run's results: replaced only with --overwrite
    assert result.exit_code == 2 and "pass --overwrite" in result.output
    assert run_script(*args, "--overwrite").exit_code == 0
    scores = json.loads((out / "metrics.json").read_text())["cases"]
    assert list(scores) == ["case0", "case1", "case2", "case3"]
    done = {p: p.stat().st_mtime_ns for p in out.glob("case[012]/*")}
    # a kill during case3: its folder never reached its final name, a partial staging is left
    os.replace(out / "case3", out / ".stage-0-999999999")
    (out / ".stage-0-999999999" / "metrics.json").write_text("{")
    result = run_script(*args)  # same settings: no --overwrite needed
    assert result.exit_code == 0, result.output
    assert "3 case(s) were done in an earlier run and kept" in result.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("case[012]/*")} == done
    assert json.loads((out / "metrics.json").read_text())["cases"] == scores
    assert not list(out.glob(".stage-*"))
    result = run_script(*args, "--set", "overlap=0.25")
    assert result.exit_code == 2 and "other settings" in result.output
    # a single-process run replaces the cohort folder whole with --overwrite
    plain = run_script("evaluate_psnr", *_eval_args(tiny_pipeline, out), "--overwrite")
    assert plain.exit_code == 0, plain.output
    assert not list(out.glob("case*")) and not (out / ".evaluate_psnr.json").exists()
