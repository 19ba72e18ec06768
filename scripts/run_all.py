"""Run every phase in order: the demo (configs/demo/, CPU-minutes) or the full default configs."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldm.cli import fail, make_app, setup_logging
from ldm.errors import UserError
from ldm.run_all import run_all, summary_table

app = make_app(__doc__)


def _line(i: int, n: int, name: str, seconds: float, result) -> None:
    typer.echo(f"[{i}/{n}] {name:<20} {seconds:7.1f} s   {result.key}")


@app.command()
def main(
    profile: Annotated[str, typer.Option(help="demo (configs/demo) or default (configs)")] = "demo",
    phases: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="comma-separated subset, e.g. prepare_data,train_vae_pair"),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="default profile: replace existing outputs (demo always does)")
    ] = False,
) -> None:
    setup_logging()
    try:
        names = [p.strip() for p in phases.split(",")] if phases else None
        report = run_all(profile, names, overwrite, on_phase=_line)
    except UserError as e:
        raise fail(str(e)) from None
    typer.echo(f"\nrun_all ({profile}): {len(report.rows)} phases in {report.seconds:.1f} s")
    for name, seconds, result in report.rows:
        typer.echo(f"  {name:<20} {seconds:7.1f} s   {result.key}")
    table = summary_table(report)
    if table:
        typer.echo("\n" + table)


if __name__ == "__main__":
    app()
