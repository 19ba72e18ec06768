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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ldm.core.errors import DataError, UserError, file_in_the_way
from ldm.core.outdir import (
    MARKER,
    check_replaceable,
    folder_lock,
    marker_for,
    refuse_unsafe_out_dir,
)

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


def cached_json(path: Path, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """(value, True) from ``path`` (``{"key": key, "params": value}``) when its key matches, else
    (``compute()``, False) saved there. Processes that miss at once (the ranks of a torchrun
    cohort, two phases on one dataset) take turns on an flock of ``<path>.lock``: one computes,
    the others wait and read its result. A folder that cannot be written only means no cache."""
    path = Path(path)
    found = _read_cached(path, key)
    if found is not None:
        return found, True
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
    with _waiting_lock(path.with_name(path.name + ".lock")):
        found = _read_cached(path, key)  # written while this process waited
        if found is not None:
            return found, True
        value = compute()
        with contextlib.suppress(OSError):
            save_json({"key": key, "params": value}, path)
    return value, False


def _read_cached(path: Path, key: str) -> Any:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # no cache yet, or an unreadable one
    return data.get("params") if isinstance(data, dict) and data.get("key") == key else None


@contextlib.contextmanager
def _waiting_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path``, waiting for another holder; without a lock where
    the file cannot be made (or on Windows). The file stays: removing it would let a waiter
    lock a file that a newcomer no longer sees."""
    try:
        import fcntl
    except ImportError:
        fcntl = None  # type: ignore[assignment]
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        if fd is not None:
            with contextlib.suppress(OSError):  # a filesystem without locks: none
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def staged_dir(
    final: Path, overwrite: bool = False, *, phase: str, inputs: Iterable[Path | None] = ()
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success it replaces ``final``.

    The rules of ``ldm.core.outdir`` apply: ``final`` must be a safe place that holds none of
    ``inputs``; an existing non-empty ``final`` is replaced only when ``phase`` wrote it, it
    holds nothing else, and ``overwrite`` is set; the folder is locked for the whole block. The
    old folder is removed only after the new one is complete, so a failed run leaves the
    previous results intact. The new folder gets the marker naming ``phase`` and its outputs.
    """
    final = Path(final)
    refuse_unsafe_out_dir(final, inputs)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(_cannot_create(final, e)) from None
    with folder_lock(final):
        _recover_swap(final)
        check_replaceable(final, phase, overwrite)
        try:
            _remove_stale(final.parent, rf"\.{re.escape(final.name)}\.(\d+)\..*\.tmp")
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp",
                                        dir=final.parent))  # fmt: skip
        except OSError as e:  # name the folder the user gave, not the temp folder beside it
            raise UserError(_cannot_create(final, e)) from None
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700
        try:
            yield tmp
            save_json(marker_for(tmp, phase), tmp / MARKER)
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


def _cannot_create(final: Path, e: OSError) -> str:
    blocker = file_in_the_way(final.parent)
    if blocker is not None:
        return (
            f"{final}: cannot create the output folder there: {blocker} is a file, not a "
            "folder; choose another out_dir"
        )
    return (
        f"{final}: cannot create the output folder there ({e.strerror or e}); fix the "
        f"permissions of {final.parent} or choose another out_dir"
    )


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
