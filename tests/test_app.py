"""The ldm3d command: every phase a subcommand; scripts and `python -m ldm` run the same code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ldm.cli.app import app
from ldm.cli.common import run_phase
from ldm.core.registry import PHASES
from ldm.phases.train_vae_pair import TrainVAEConfig
from ldm.train.run_dir import Interrupted
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


def cross_phase_imports(phases: Path = ROOT / "ldm" / "phases") -> list[str]:
    """'module imports target' for every import (inside functions too) by a phase module of
    another phase's module; ``from ldm.phases import x`` and relative imports count.
    (tests/test_layers.py allows phases -> phases: the phase package itself is this test's.)"""
    bad = []
    for path in sorted(phases.rglob("*.py")):
        rel = path.relative_to(phases)
        own = rel.parts[0].removesuffix(".py")
        package = ["ldm", "phases", *rel.parts[:-1]]  # what a relative import starts from
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module.split(".") if node.module else []
                if node.level:
                    base = package[: len(package) - node.level + 1] + base
                names = [".".join([*base, a.name]) for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[:2] == ["ldm", "phases"] and len(parts) > 2 and parts[2] != own:
                    bad.append(f"{rel} imports {name}")
    return bad


def test_no_phase_module_imports_another_phase():
    assert cross_phase_imports() == []


def test_an_import_of_another_phase_is_caught(tmp_path):
    (tmp_path / "predict_ldm").mkdir()
    (tmp_path / "predict_ldm" / "cohort.py").write_text(
        "from ldm.phases.predict_ldm import report\n"  # its own package: allowed
        "from . import report\nfrom .report import write\n"  # the same, relative
        "from ldm.phases import evaluate_psnr\n"
        "from ldm.phases.train_diffusion import TrainConfig\n"
        "def f():\n    import ldm.phases.prepare_data\n"
        "from .. import prepare_latents\n"
    )  # fmt: skip
    assert sorted(cross_phase_imports(tmp_path)) == [
        f"predict_ldm/cohort.py imports ldm.phases.{name}" for name in (
            "evaluate_psnr", "prepare_data", "prepare_latents", "train_diffusion.TrainConfig")
    ]  # fmt: skip


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
