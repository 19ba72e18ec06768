"""A training run's folder: checked before training, staged under --overwrite, tidied after a
kill; Ctrl-C/SIGTERM deferred to the end of a step so the loop can save first.

Files of a run: last.pt (every save_every steps and at the end), best.pt (best validation
score), metrics.jsonl (one JSON row per logged step or validation). See docs/design.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from ldm.core.errors import UserError
from ldm.core.files import atomic_write_text, check_writable_folder

STAGING = ".overwrite-staging"
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")


def commit_staged_run(run_dir: Path) -> None:
    """Move a staged run (``--overwrite``) over the old one once it has a last.pt.

    Until then the old last.pt/best.pt/metrics.jsonl stay untouched: a run that crashes or is
    killed before its first save loses nothing. Also finishes a commit a kill interrupted.
    """
    staging = run_dir / STAGING
    if not (staging / "last.pt").is_file():
        return
    for name in RUN_FILES:
        if not (staging / name).exists():
            (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FILES[::-1]:  # last.pt last: it marks the commit as done
        if (staging / name).exists():
            os.replace(staging / name, run_dir / name)
    shutil.rmtree(staging, ignore_errors=True)


def discard_staged_run(run_dir: Path) -> None:
    """Drop a staged run (``--overwrite``) that has not replaced the old one: the old run stays."""
    shutil.rmtree(run_dir / STAGING, ignore_errors=True)


def prepare_run_dir(run_dir: Path, overwrite: bool) -> Path:
    """Check that ``run_dir`` can be written before any training; tidy what a kill left.

    Returns the folder the new files go to: ``run_dir``, or a staging folder inside it when
    ``overwrite`` would replace an earlier run.
    """
    check_writable_folder(run_dir, "choose another out_dir")
    commit_staged_run(run_dir)  # a kill between first save and commit
    discard_staged_run(run_dir)  # a staged run killed before its save
    for stale in run_dir.glob(".tmp-*"):  # atomic writes a kill interrupted
        stale.unlink(missing_ok=True)
    if overwrite and any((run_dir / n).exists() for n in RUN_FILES):
        (run_dir / STAGING).mkdir()
        return run_dir / STAGING
    return run_dir


class Interrupted(UserError):
    """Ctrl-C or SIGTERM during training: last.pt was saved; exit code 130."""

    exit_code = 130


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[list[int]]:
    """SIGINT/SIGTERM set a flag that the loop checks after each step (a second one aborts)."""
    flag: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame) -> None:
        if flag:
            raise KeyboardInterrupt
        flag.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:
            continue  # a torn last line from a kill
        if row_step <= step:
            keep.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in keep))
