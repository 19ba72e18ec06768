"""The benchmark's target table: figures read from case rows, met / missed / not run."""

from __future__ import annotations

from ldm.tools.bench_targets import check_targets, format_targets


def _by_figure(rows: list[dict]) -> dict[str, dict]:
    return {c["figure"]: c for c in check_targets(rows)}


def test_targets_read_their_figures_and_judge_them() -> None:
    rows = [
        {"case": "particles", "num_particles": 10_000, "ms_per_step": 0.1, "ms_per_frame": 0.1,
         "total_s": 0.1},
        {"case": "particles", "num_particles": 50_000, "ms_per_step": 0.8, "ms_per_frame": 3.0,
         "total_s": 2.0},
        {"case": "vae_vs_monai", "speedup": 1.5, "ours_train_mb": 300.0, "monai_train_mb": 200.0},
        {"case": "sampler_quality", "default_steps": 10,
         "runs": [{"sampler": "ddim", "steps": 10, "psnr": 24.30},
                  {"sampler": "ddim", "steps": 50, "psnr": 24.40}]},
        {"case": "unet_vs_monai", "error": "boom"},
    ]  # fmt: skip
    got = _by_figure(rows)
    assert got["particles 50k: time per step"]["met"] is True  # the 10k row is not read
    assert got["particles 50k: time per step"]["value"] == 0.8
    assert got["particles 50k: time per rendered frame"]["met"] is False
    assert got["particles 50k: 1000 steps + GIF"]["met"] is True  # <= is inclusive
    assert got["VAE train step: MONAI time / ours"]["met"] is True
    assert got["VAE train memory: ours / MONAI"]["value"] == 1.5
    assert got["VAE train memory: ours / MONAI"]["met"] is False
    gap = got["default DDIM steps: PSNR minus DDIM 50 (demo)"]
    assert abs(gap["value"] + 0.10) < 1e-9 and gap["met"] is False
    assert got["UNet train step: MONAI time / ours"]["met"] is None  # failed case: not run
    assert got["run_all --profile demo"]["value"] is None
    text = "\n".join(format_targets(check_targets(rows)))
    assert "MISSED" in text and "not run" in text and " met" in text


def test_benchmark_children_find_the_repo_and_the_callers_packages() -> None:
    # run_all_demo starts scripts from a temp folder: the repo must come first on the path, and
    # packages the caller reaches through PYTHONPATH (e.g. installed with --target) stay found
    import os

    from ldm.core.config import REPO_ROOT
    from ldm.tools.benchmark import child_env

    env = child_env({"PYTHONPATH": os.pathsep.join(["/opt/site", "/x"]), "HOME": "/h"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/opt/site", "/x"]
    assert env["HOME"] == "/h"
    assert child_env({})["PYTHONPATH"] == str(REPO_ROOT)


def test_each_case_gets_one_readable_line() -> None:
    from ldm.tools.bench_targets import describe

    row = {"ours_s": 0.35, "monai_s": 0.44, "speedup": 1.2, "speedup_range": [1.05, 1.3],
           "precision": "float32", "ours_train_mb": 320.0, "monai_train_mb": 330.0,
           "ours_saved_mb": 144.0, "monai_saved_mb": 145.0, "ours_params": 2_496_836,
           "monai_params": 2_541_380}  # fmt: skip
    line = describe("unet_vs_monai", row)
    assert "(1.20x, reps 1.05-1.30x, float32)" in line and "2,496,836" in line
    assert describe("particles", {"error": "RuntimeError: boom"}) == "error: RuntimeError: boom"


def test_a_failing_case_reports_its_last_error_line() -> None:
    # each case runs in a child; its error becomes the row's text: a user error (e.g. "needs
    # monai") reads as its message, anything else keeps its exception type
    from ldm.tools.bench_monai import child_result

    code = "from ldm.core.errors import UserError; raise UserError('needs monai')"
    assert child_result(code) == {"error": "needs monai"}
    assert child_result("raise RuntimeError('boom')") == {"error": "RuntimeError: boom"}
    assert child_result("print('RESULT {\"x\": 1}')") == {"x": 1}


def test_predict_time_counts_without_bm4d() -> None:
    # predict_vs_bm4d always reports the predict time; the BM4D ratio only with bm4d installed
    from ldm.tools.bench_targets import describe

    row = {"case": "predict_vs_bm4d", "size": 128, "bm4d_size": 32, "ddim_steps": 10,
           "num_samples": 8, "seconds": 12.0, "bm4d_skipped": "bm4d not installed"}  # fmt: skip
    got = _by_figure([row])
    predict = got["predict_ldm 128^3, default sampler and N"]
    assert predict["value"] == 12.0 and predict["met"] is True and predict["target"] == "<= 15"
    assert got["BM4D time / predict_ldm time (128^3)"]["met"] is None  # not run
    line = describe("predict_vs_bm4d", row)
    assert "8 samples per window: 12.0 s" in line and "BM4D skipped: bm4d not installed" in line
    ratio = {**row, "bm4d_measured_s": 0.5, "bm4d_s": 32.0, "bm4d_ratio": 32.0 / 12.0}
    del ratio["bm4d_skipped"]
    assert _by_figure([ratio])["BM4D time / predict_ldm time (128^3)"]["met"] is False
    assert "~32 s: 2.7x" in describe("predict_vs_bm4d", ratio)
