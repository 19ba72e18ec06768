"""The ``ldm3d`` command: one subcommand per phase, plus run_all and benchmark.

``ldm3d predict_ldm --input scan.nii.gz``, ``python -m ldm predict_ldm ...`` and
``python scripts/predict_ldm.py ...`` all run the same function. Each command is a thin typed
layer: parse options, load the config, call one library function, print its summary.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ldm.cli.common import (
    ConfigOption,
    OverwriteOption,
    SetOption,
    make_app,
    one_line_errors,
    run_phase,
    setup_logging,
    sigterm_as_interrupt,
)
from ldm.core.registry import PHASES, get_phase

app = make_app("ldm3d: cleaner, sharper 3D volumes with a latent diffusion model, phase by phase.")
app.info.no_args_is_help = True
COMMANDS: dict[str, tuple[Callable[..., Any], str]] = {}


def command(name: str, help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as ``ldm3d <name>`` and as the script scripts/<name>.py."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        COMMANDS[name] = (fn, help_text)
        app.command(name=name, help=help_text)(fn)
        return fn

    return deco


def script_app(name: str) -> typer.Typer:
    """A one-command app for scripts/<name>.py (same function and options as ``ldm3d name``)."""
    fn, help_text = COMMANDS[name]
    single = make_app(help_text)
    single.command(help=help_text)(fn)
    return single


def _run(name: str, config: Path | None, set_: list[str] | None, **kwargs: Any) -> None:
    phase = get_phase(name)
    run_phase(name, phase.config_cls(), config, set_,
              lambda cfg: phase.run_fn()(cfg, **kwargs))  # fmt: skip


def _plain(name: str) -> Callable[..., None]:
    def main(
        config: ConfigOption = None, set_: SetOption = None, overwrite: OverwriteOption = False
    ) -> None:
        _run(name, config, set_, overwrite=overwrite)

    return main


InputOption = Annotated[
    Optional[Path],  # noqa: UP045  (typer needs Optional on Python 3.10)
    typer.Option("--input", help="a 3D LR volume (.nii.gz, .raw+.mhd, .npy, or a DICOM series "
                 "folder, folder@SeriesInstanceUID), not the test set"),  # fmt: skip
]
TargetOption = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--target", help="the HR reference of --input (same grid): adds the score table"),
]
FolderOption = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--folder", help="a folder of external volumes (with --input-glob); "
                 "sharded over torchrun ranks, finished cases kept on a rerun"),
    # fmt: skip
]
InputGlobOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--input-glob", help="LR files in --folder, e.g. '*_lr.nii.gz'"),
]
TargetGlobOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--target-glob", help="HR files in --folder, paired by the '*' part"),
]
ResampleOption = Annotated[
    bool,
    typer.Option(
        "--resample",
        help="run the models at the training voxel spacing, resample outputs back to the input",
    ),
]
ImageOption = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--image", help="PNG/JPEG to rebuild; default: the config's image or built-in"),
]


def _external(
    input_path: Path | None, target: Path | None, folder: Path | None, input_glob: str | None,
    target_glob: str | None, resample: bool,
) -> Any:  # fmt: skip
    from ldm.data.external import ExternalInputs

    return ExternalInputs(input_path, target, folder, input_glob, target_glob, resample)


def _with_external(name: str) -> Callable[..., None]:
    """The command of a phase that also scores external volumes (predict_ldm, evaluate_psnr)."""

    def main(
        config: ConfigOption = None,
        set_: SetOption = None,
        overwrite: OverwriteOption = False,
        input_path: InputOption = None,
        target: TargetOption = None,
        folder: FolderOption = None,
        input_glob: InputGlobOption = None,
        target_glob: TargetGlobOption = None,
        resample: ResampleOption = False,
    ) -> None:
        external = _external(input_path, target, folder, input_glob, target_glob, resample)
        _run(name, config, set_, overwrite=overwrite, external=external)

    return main


def _with_image(name: str) -> Callable[..., None]:
    """The command of a phase that takes a picture (particles_gif)."""

    def main(
        config: ConfigOption = None,
        set_: SetOption = None,
        overwrite: OverwriteOption = False,
        image: ImageOption = None,
    ) -> None:
        _run(name, config, set_, overwrite=overwrite, image=image)

    return main


BUILDERS = {"": _plain, "external": _with_external, "image": _with_image}  # by Phase.inputs
for _phase in PHASES:
    command(_phase.name, _phase.summary)(BUILDERS[_phase.inputs](_phase.name))


@command("run_all", "every phase in order on a profile (demo, default, mri: configs/mri)")
def run_all(
    profile: Annotated[
        str, typer.Option(help="demo (configs/demo), default (configs) or mri (configs/mri)")
    ] = "demo",
    phases: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="comma-separated subset, e.g. prepare_data,train_vae_pair"),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="default/mri profile: replace existing outputs (demo always does)")
    ] = False,
) -> None:
    from ldm.cli.run_all import format_report
    from ldm.cli.run_all import run_all as run

    setup_logging()
    with one_line_errors(), sigterm_as_interrupt():  # exit 2, or 130 when interrupted
        names = [p.strip() for p in phases.split(",")] if phases else None
        report = run(profile, names, overwrite, on_phase=_phase_line)
    typer.echo(format_report(profile, report))


def _phase_line(i: int, n: int, name: str, seconds: float, result: Any) -> None:
    typer.echo(f"[{i}/{n}] {name:<20} {seconds:7.1f} s   {result.headline}")


@command("benchmark", "speed and memory of the hot paths (not a test); writes benchmark.json")
def benchmark(
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    only: Annotated[str, typer.Option(help="comma-separated case names")] = "",
    out: Annotated[Path, typer.Option()] = Path("results/benchmark/benchmark.json"),
    quick: Annotated[
        bool, typer.Option(help="only the target figures, BM4D on 32^3, no run_all")
    ] = False,
) -> None:
    from ldm.tools.benchmark import run_plan

    with one_line_errors():
        run_plan(device, threads, only, out.resolve(), echo=typer.echo, quick=quick)


def main() -> None:
    """Console-script entry point (``ldm3d``)."""
    app()
