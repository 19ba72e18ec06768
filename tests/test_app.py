"""The ldm3d command: every phase a subcommand; scripts and `python -m ldm` run the same code."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from ldm.cli.app import app
from ldm.core.pipeline import PHASES
from tests.helpers.cli import ROOT, run_script


def test_help_lists_every_phase_in_pipeline_order():
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    names = [p.name for p in PHASES] + ["run_all", "benchmark"]
    positions = [out.index(f" {n} ") for n in names]
    assert positions == sorted(positions)


def test_phase_help_shows_its_options():
    out = CliRunner().invoke(app, ["predict_ldm", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--config", "--set", "--overwrite", "--input"):
        assert option in out
    out = CliRunner().invoke(app, ["particles_gif", "--help"], env={"COLUMNS": "200"}).output
    assert "--image" in out and "--input" not in out


def test_subcommand_and_script_give_the_same_error(tmp_path):
    args = ["--set", f"data_dir={tmp_path / 'missing'}", "--set", f"out_dir={tmp_path / 'out'}"]
    via_app = CliRunner().invoke(app, ["train_vae_pair", *args])
    via_script = run_script("train_vae_pair", *args)
    assert via_app.exit_code == via_script.exit_code == 2
    assert via_app.output == via_script.output and "run prepare_data first" in via_app.output


def test_python_dash_m_ldm_runs_the_app():
    p = subprocess.run([sys.executable, "-m", "ldm", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env={"COLUMNS": "200", "PATH": ""})  # fmt: skip
    assert p.returncode == 0 and "prepare_data" in p.stdout and "ddim_similar_noise" in p.stdout


def test_no_phase_module_imports_another_phase():
    phases = ROOT / "ldm" / "phases"
    for path in phases.rglob("*.py"):
        own = path.relative_to(phases).parts[0].removesuffix(".py")
        for line in path.read_text().splitlines():
            if "ldm.phases." in line and ("import" in line):
                target = line.split("ldm.phases.")[1].split()[0].split(".")[0]
                assert target == own, f"{path}: {line.strip()}"


def test_benchmark_bad_input_is_one_error_line_before_any_case(tmp_path, monkeypatch):
    # each case runs for seconds to minutes: a typo or an unusable option must stop it at once
    import ldm.tools.benchmark
    from tests.helpers.cli import error_line

    ran: list[str] = []
    monkeypatch.setattr(ldm.tools.benchmark, "run_in_child", lambda name, *a, **k: ran.append(name))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    out = tmp_path / "b.json"
    line = error_line(CliRunner().invoke(app, ["benchmark", "--only", "partcles", "--out", out]))
    assert "unknown case partcles" in line and "particles" in line
    line = error_line(CliRunner().invoke(app, ["benchmark", "--device", "cuda", "--out", out]))
    assert "no CUDA GPU" in line
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = error_line(CliRunner().invoke(app, ["benchmark", "--out", blocker / "b.json"]))
    assert str(blocker) in line and "not a folder" in line and "--out" in line
    assert ran == [] and not out.exists()
