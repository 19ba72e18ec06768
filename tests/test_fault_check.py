"""fault_check (ldm/tools/fault_check.py) drives the phases with the demo configs and --set
arguments: every argument it passes must fit the phases' configs (a stale key would only show
after minutes of a run)."""

from __future__ import annotations

from pathlib import Path

from ldm.core.config import REPO_ROOT, load_config
from ldm.core.registry import get_phase
from ldm.tools.fault_check import NEXT_ARGS, PHASES


def _values(args: list[str]) -> list[str]:
    assert args[::2] == ["--set"] * (len(args) // 2)
    return args[1::2]


def test_every_phase_and_probe_argument_fits_the_demo_configs(tmp_path: Path) -> None:
    runs = [(spec.name, spec.args(tmp_path, tmp_path / spec.output)) for spec in PHASES]
    runs += [(name, make(tmp_path)) for name, make in NEXT_ARGS.items()]
    for name, args in runs:
        cls = get_phase(name).config_cls()
        load_config(cls, REPO_ROOT / "configs" / "demo" / f"{name}.yaml", _values(args))
    assert {spec.next_phase for spec in PHASES if spec.next_phase} <= set(NEXT_ARGS)


def test_the_phase_scripts_it_runs_exist() -> None:
    """fault_check runs scripts/<phase>.py of the checkout in child processes: a wrong root
    (the tool moved into ldm/tools/) made every reference run fail."""
    from ldm.tools.fault_check import ROOT, _command

    for spec in PHASES:
        script = next(Path(a) for a in _command(spec.name, [], False) if a.endswith(".py"))
        assert script.is_file() and script.parent == ROOT / "scripts", script
