from __future__ import annotations

import pytest

import ldm.cli.run_all as run_all_mod
from ldm.cli.run_all import PhaseFailed, RunAllReport, run_all, select, summary_table
from ldm.core.errors import UserError
from ldm.core.registry import PhaseResult


def test_a_failing_phase_stops_the_run_and_is_named(tmp_path, monkeypatch):
    cfg = tmp_path / "evaluate_psnr.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'nothing'}\nout_dir: {tmp_path / 'out'}\n")
    monkeypatch.setattr(run_all_mod, "config_path", lambda profile, phase: cfg)
    seen = []
    with pytest.raises(
        PhaseFailed, match="phase evaluate_psnr failed: dataset not found.*run prepare_data first"
    ):
        run_all("demo", ["evaluate_psnr", "prepare_latents"], on_phase=lambda *a: seen.append(a))
    assert seen == []  # stopped at the first phase


def test_an_interrupted_run_exits_130_and_says_how_to_go_on(tmp_path, monkeypatch):
    # Ctrl-C inside a phase: exit 130 (not 2, "failed"), and the way on differs by profile
    from typer.testing import CliRunner

    from ldm.cli.app import app
    from ldm.core.registry import Phase

    def interrupted(cfg, overwrite=False):
        raise KeyboardInterrupt

    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    monkeypatch.setattr(run_all_mod, "config_path", lambda profile, phase: cfg)
    monkeypatch.setattr(Phase, "run_fn", lambda self: interrupted)
    args = ["run_all", "--phases", "prepare_latents,train_diffusion"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1] == (
        "run_all interrupted in prepare_latents; rerun to start the demo over")
    result = CliRunner().invoke(app, [*args, "--profile", "default"])
    assert result.exit_code == 130 and "--phases prepare_latents,train_diffusion to go on" in (
        result.output)  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--profile", "default", "--overwrite"])
    assert "leave out --overwrite, which starts over" in result.output


def test_phase_selection_keeps_pipeline_order_and_rejects_unknown_names():
    assert [p.name for p in select(["predict_ldm", "prepare_data"])] == [
        "prepare_data",
        "predict_ldm",
    ]
    with pytest.raises(UserError, match="unknown phase 'train_vae'"):
        select(["train_vae"])


def test_summary_table_joins_ldm_and_classical_rows(tmp_path):
    png = tmp_path / "a.png"
    png.write_bytes(b"")
    ldm_means = {"Baseline": {"psnr": 20.0, "ssim": 0.3}, "LDM": {"psnr": 25.0, "ssim": 0.8},
                 "uncertainty": {"var_err_ratio": 0.5, "ause": 0.25, "ause_random": 0.9}}
    classical = {"baseline": {"psnr": 20.0, "ssim": 0.3}, "gaussian": {"psnr": 22.0, "ssim": 0.7}}
    predict = PhaseResult("", "", {"mean": ldm_means}, [tmp_path])
    evaluate = PhaseResult("", "", {"mean": classical})
    report = RunAllReport([("predict_ldm", 1.0, predict), ("evaluate_psnr", 1.0, evaluate)])
    table = summary_table(report)
    assert "LDM" in table and "25.00" in table and "Gaussian filter" in table
    assert table.count("Baseline") == 1 and str(png) in table
    assert "variance-to-error 0.50, AUSE 0.250 (random order 0.900)" in table
