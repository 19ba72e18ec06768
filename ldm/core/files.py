"""Crash-safe output writing: temporary names and atomic renames for files, staged output
folders swapped in whole, JSON reports.

A crash never leaves a half-written file under its final name, and a rerun never destroys
earlier results before the new ones are complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ldm.core.errors import DataError, UserError

UMASK = os.umask(0)  # the process umask (read by setting it and back)
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temp name ends with the real name, so writers that look at the suffix (.nii.gz) work
    _remove_stale(path.parent, rf"\.tmp-(\d+)-.*-{re.escape(path.name)}")
    fd, tmp = tempfile.mkstemp(
        prefix=f".tmp-{os.getpid()}-", suffix=f"-{path.name}", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~UMASK)  # mkstemp makes 0600; final files get normal modes
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def check_writable_folder(folder: Path, fix: str) -> None:
    """Make ``folder`` (and its parents) and write a probe file there, before any long work;
    an OS error becomes a UserError naming the folder and ``fix``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder; {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-probe-"):
            pass  # created and removed: the folder takes new files
    except OSError as e:
        raise UserError(
            f"{folder}: cannot write there ({e.strerror or e}); fix its permissions or {fix}"
        ) from None


def atomic_write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_json(obj: Any, path: Path) -> Path:
    return atomic_write_text(Path(path), json.dumps(obj, indent=2, default=_json_default) + "\n")


def load_json(path: Path, what: str = "file", fix: str = "") -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}{'; ' + fix if fix else ''}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: corrupt JSON ({e.msg} at line {e.lineno}){'; ' + fix if fix else ''}"
        ) from None


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def staged_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success it replaces ``final``.

    An existing non-empty ``final`` is an error unless ``overwrite`` is set; then it is removed
    only after the new folder is complete, so a failed run leaves the previous results intact.
    """
    final = Path(final)
    if final.parent.is_dir():
        _recover_swap(final)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise UserError(
            f"{final} already exists; pass --overwrite to replace it, or choose another output "
            f"folder (--set out_dir=...)"
        )
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(final.parent, rf"\.{re.escape(final.name)}\.(\d+)\..*\.tmp")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp",
                                    dir=final.parent))  # fmt: skip
    except OSError as e:  # name the folder the user gave, not the temp folder beside it
        raise UserError(
            f"{final}: cannot create the output folder there ({e.strerror or e}); fix the "
            f"permissions of {final.parent} or choose another out_dir"
        ) from None
    os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or an absurd number): leave its files alone
    return True


def _remove_stale(folder: Path, pattern: str) -> None:
    """Delete temp files/folders in ``folder`` named by ``pattern`` (group 1 = the writer's pid)
    whose writer is dead: what a killed run left behind. A live writer's files are kept."""
    regex = re.compile(pattern)
    for entry in folder.glob(".*"):
        m = regex.fullmatch(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _recover_swap(final: Path) -> None:
    """Finish or undo a folder swap that a kill interrupted (see ``staged_dir``)."""
    regex = re.compile(rf"\.{re.escape(final.name)}\.old-(\d+)")
    for old in final.parent.glob(f".{final.name}.old-*"):
        m = regex.fullmatch(old.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # the new folder is in place: drop the old one
        else:
            os.replace(old, final)  # killed between the two renames: put the old results back
