"""Cohort runs: a list of cases sharded over torchrun ranks, each case committed whole as it
finishes, finished cases skipped on a rerun, rank 0 merging at the end (docs/design.md,
"Cohort inference"). predict_ldm and evaluate_psnr use it; what a case is, how it is written and
what the merged summary holds stay with the phase.

The output folder ``out`` of a cohort run holds:
- ``.<phase>.json``: the signature of the settings that make two runs' case outputs
  interchangeable, and every case this phase wrote with the source it came from (what a rerun
  may keep and what ``--overwrite`` may remove); ``.ldm3d.json`` lists the same entries for the
  single-process writers (``ldm.core.outdir``), so either kind of run can replace the other's
  folder with ``--overwrite``;
- ``<case>/``: one folder per finished case, written into ``.stage-<rank>-<pid>/<case>/`` and
  renamed when complete, so a case folder holding ``done_file`` is complete;
- the summary files rank 0 writes after every rank has finished its cases.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from ldm.core.distributed import DistInfo
from ldm.core.errors import UserError
from ldm.core.files import load_json, pid_alive, save_json
from ldm.core.outdir import (
    MARKER,
    check_replaceable,
    rank0_holds,
    read_marker,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
# how long a rank that finished its cases waits for the others at the end: the gloo and NCCL
# default (30 / 10 minutes) is shorter than one large case can take
WAIT_FOR_RANKS = timedelta(hours=24)


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """Rank r of W takes the items i with i % W == r: the same split on every rank, and nothing
    about an item's work depends on which rank does it."""
    return list(items[info.rank :: info.world_size])


class Cohort:
    """An opened cohort folder (see :func:`open_cohort`)."""

    def __init__(self, out: Path, phase: str, info: DistInfo, summary_files: Sequence[str],
                 done_file: str) -> None:  # fmt: skip
        self.out, self.phase, self.info = Path(out), phase, info
        self.summary_files, self.done_file = tuple(summary_files), done_file
        self.kept: list[str] = []  # rank 0: the cases done in an earlier run (kept)
        self._group: Any = None  # a gloo group with a long timeout for the final wait

    @property
    def marker(self) -> Path:
        return self.out / f".{self.phase}.json"

    def done(self, name: str) -> bool:
        return (self.out / name / self.done_file).is_file()

    def run(self, names: Sequence[str], work: Callable[[str, Path], object]) -> dict | None:
        """This rank's share of ``names``: ``work(name, folder)`` writes each unfinished case
        into ``folder`` (empty, hidden), which is then renamed to ``out/<name>``. After every
        rank is done, rank 0 gets each case's ``done_file`` (name -> JSON, in ``names`` order);
        the other ranks get None."""
        stage = self.out / f".stage-{self.info.rank}-{os.getpid()}"
        try:
            for name in shard(names, self.info):
                if self.done(name):
                    log.info("%s: done in an earlier run, skipped", name)
                    continue
                shutil.rmtree(stage, ignore_errors=True)
                (stage / name).mkdir(parents=True)
                work(name, stage / name)
                shutil.rmtree(self.out / name, ignore_errors=True)  # a partial folder: not ours
                os.replace(stage / name, self.out / name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        if self._group is not None:
            dist.barrier(group=self._group)
        if not self.info.is_main:
            return None
        what = f"{self.phase} case result"
        return {n: load_json(self.out / n / self.done_file, what) for n in names}

    def kept_text(self) -> str:
        n = len(self.kept)
        return f"\n{n} case(s) were done in an earlier run and kept" if n else ""

    # rank 0, under the folder's lock -----------------------------------------------------

    def prepare(self, signature: dict, sources: dict[str, str], overwrite: bool,
                settings: str) -> None:  # fmt: skip
        """Make ``out`` ready for this run; refuse a folder this phase did not write or wrote
        with other settings (unless ``overwrite``: then remove only what it wrote)."""
        out = self.out
        signature = json.loads(json.dumps(signature, default=str))  # as read back (lists)
        for stage in out.glob(".stage-*-*") if self.marker.is_file() else ():  # killed runs'
            pid = stage.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(stage, ignore_errors=True)
        if out.exists() and any(out.iterdir()):
            if not self.marker.is_file():
                self._take_over_single_run(overwrite)
            else:
                old = load_json(self.marker, f"{self.phase} marker")
                old_sources = _sources(old)
                if old.get("signature") == signature:  # resume: finished cases are kept
                    for name, source in sources.items():
                        if old_sources.get(name) not in (None, source):  # another input now
                            shutil.rmtree(out / name, ignore_errors=True)
                    self._write_markers(signature, {**old_sources, **sources})
                    self.kept = [n for n in sources if self.done(n)]
                    return
                if not overwrite:
                    raise UserError(
                        f"{out} holds a {self.phase} cohort run with other settings ({settings}); "
                        "pass --overwrite to replace it or choose another out_dir"
                    )
                for name in old_sources:
                    shutil.rmtree(out / name, ignore_errors=True)
                for name in self.summary_files:
                    (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        self._write_markers(signature, sources)  # before any case: what --overwrite may remove

    def _take_over_single_run(self, overwrite: bool) -> None:
        """A non-empty ``out`` without the cohort marker: replaced under the rule of every
        output folder (``outdir.check_replaceable``: this phase's single-process run, nothing
        foreign, ``overwrite``); only the outputs its marker lists go."""
        check_replaceable(self.out, self.phase, overwrite)
        single = read_marker(self.out) or {"outputs": []}  # None: only our temp leftovers
        for name in single["outputs"]:
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        (self.out / MARKER).unlink(missing_ok=True)

    def _write_markers(self, signature: dict, sources: dict[str, str]) -> None:
        save_json({"signature": signature, "cases": sources}, self.marker)
        listed = sorted({self.marker.name, *sources, *self.summary_files})
        save_json({"phase": self.phase, "outputs": listed}, self.out / MARKER)


def _sources(marker: dict) -> dict[str, str | None]:
    """name -> source of a cohort marker's cases (a plain list: sources unknown)."""
    cases = marker.get("cases", {})
    return dict(cases) if isinstance(cases, dict) else dict.fromkeys(cases)


@contextlib.contextmanager
def open_cohort(
    out: Path, phase: str, info: DistInfo, signature: dict, sources: dict[str, str], *,
    overwrite: bool, inputs: Iterable[Path | None], summary_files: Sequence[str],
    settings: str, done_file: str = "metrics.json",
) -> Iterator[Cohort]:  # fmt: skip
    """The cohort folder ``out`` of a run over the cases ``sources`` (name -> where the case
    comes from, e.g. its input files: a case kept from an earlier run must come from the same
    place) with the settings ``signature`` (``settings`` names them in the refusal). Rank 0
    checks the folder (a safe place, not an input; see ``prepare``) and holds its lock for the
    block; its refusal is raised on every rank, before any work."""
    cohort = Cohort(out, phase, info, summary_files, done_file)
    with rank0_holds(cohort.out, inputs, info,
                     lambda: cohort.prepare(signature, sources, overwrite, settings)):  # fmt: skip
        if info.enabled and dist.is_initialized():  # every rank, at the same point
            cohort._group = dist.new_group(backend="gloo", timeout=WAIT_FOR_RANKS)
        yield cohort
