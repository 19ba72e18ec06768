"""Fault injection: SIGKILL each long demo phase at random moments and check nothing is lost.

Prints one row per injected fault and `N faults injected, N survived`. Takes a few minutes on
2 CPU cores; writes only under results/fault_check/ (replaced on every run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ldm.cli.common import make_app, one_line_errors
from ldm.tools.fault_check import fault_check, fault_table

app = make_app(__doc__)


@app.command()
def main(
    kills: Annotated[int, typer.Option(help="SIGKILLs per phase")] = 3,
    seed: Annotated[int, typer.Option(help="seed of the kill moments")] = 0,
    workspace: Annotated[Path, typer.Option(help="scratch folder")] = Path("results/fault_check"),
) -> None:
    with one_line_errors():
        faults = fault_check(workspace.resolve(), kills, seed, log=typer.echo)
    typer.echo("\n" + fault_table(faults))
    if not all(f.survived for f in faults):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
