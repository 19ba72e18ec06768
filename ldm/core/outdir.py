"""Who may write, replace or delete an output folder.

Rules (docs/design.md "Reliability"):
- A phase only ever deletes or replaces files it wrote itself. Every output folder a phase
  writes carries a marker, ``.ldm3d.json``, naming the phase and its outputs. ``--overwrite``
  replaces only a folder marked by the same phase that holds nothing else; a folder with
  anything else in it is refused, even with ``--overwrite``.
- Some places are never an output folder: a filesystem root, the home folder, the current
  folder (or a folder holding it), a git checkout, and any folder that is or holds an input
  of the run.
- One run per output folder: a phase holds an exclusive lock, ``.<name>.lock`` beside the
  folder, from its checks to its last write; a second run gets one error line naming the
  folder and the process that holds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ldm.core.distributed import DistInfo, raise_on_all_ranks
from ldm.core.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: the lock file alone (O_EXCL) is the lock
    fcntl = None  # type: ignore[assignment]

MARKER = ".ldm3d.json"
# what our own crash-safe writers leave for a moment (files.atomic_path, staged_dir, cohorts)
_OWN_TEMP = re.compile(r"\.tmp-\d+-.*|\.tmp-probe-.*|\.stage-\d+-\d+|\..*\.(\d+)\..*\.tmp")
_PICK = "choose an empty or new out_dir (--set out_dir=...)"


def refuse_unsafe_out_dir(out: Path, inputs: Iterable[Path | None] = ()) -> None:
    """Refuse an output folder that no phase may ever replace (see the module doc)."""
    out = Path(out)
    p = out.expanduser().resolve()
    why = None
    if p == Path(p.anchor):
        why = "is a filesystem root"
    elif p == Path.home().resolve():
        why = "is your home folder"
    elif p == Path.cwd().resolve() or p in Path.cwd().resolve().parents:
        why = "is the current folder" if p == Path.cwd().resolve() else "holds the current folder"
    elif (p / ".git").exists():
        why = "is a git checkout"
    else:
        for inp in inputs:
            if inp is None:
                continue
            r = Path(inp).expanduser().resolve()
            if r == p or p in r.parents:
                why = f"{'is' if r == p else 'holds'} the input {inp}"
                break
    if why is not None:
        raise UserError(f"out_dir {out} {why}; ldm3d never writes its outputs there: {_PICK}")


def config_inputs(*objs: object) -> list[Path]:
    """Every path a run reads: the Path fields of its config dataclasses (nested ones too,
    out_dir left out) and of the other objects given (e.g. the command line's inputs)."""
    found: list[Path] = []
    for obj in objs:
        if isinstance(obj, Path):
            found.append(obj)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                if f.name != "out_dir":
                    found += config_inputs(getattr(obj, f.name))
    return found


def read_marker(folder: Path) -> dict | None:
    """The marker of an ldm3d output folder, or None (no marker, or not one we can read)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("outputs"), list):
        return None
    return data


def marker_for(folder: Path, phase: str) -> dict:
    """The marker to write into ``folder`` (complete, before it is committed): its entries."""
    names = sorted(e.name for e in Path(folder).iterdir() if e.name != MARKER)
    return {"phase": phase, "outputs": names}


def foreign_entries(folder: Path, marker: dict | None) -> list[str]:
    """Entries of ``folder`` that no ldm3d phase wrote (sorted). Our own temp names, the
    entries the marker lists and sub-folders with their own marker (a later phase's output
    inside this one, e.g. <dataset>/latents) are ours."""
    listed = set(marker["outputs"]) if marker else set()
    foreign = []
    for e in sorted(Path(folder).iterdir(), key=lambda e: e.name):
        if e.name == MARKER or e.name in listed or _OWN_TEMP.fullmatch(e.name):
            continue
        if e.is_dir() and not e.is_symlink() and read_marker(e) is not None:
            continue
        foreign.append(e.name)
    return foreign


def check_replaceable(out: Path, phase: str, overwrite: bool) -> None:
    """Refuse to replace a non-empty ``out`` unless this phase wrote it, it holds nothing
    else, and ``overwrite`` is set."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"out_dir {out} is a file, not a folder; {_PICK}")
    if not any(out.iterdir()):
        return
    marker = read_marker(out)
    foreign = foreign_entries(out, marker)
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise UserError(
            f"{out} holds files ldm3d did not write ({shown}); ldm3d only replaces folders it "
            f"wrote itself, even with --overwrite: {_PICK}"
        )
    if marker is None:  # only temp leftovers and marked sub-folders
        return
    if marker.get("phase") != phase:
        raise UserError(f"{out} holds the outputs of {marker.get('phase')}, not {phase}; {_PICK}")
    if not overwrite:
        raise UserError(
            f"{out} already exists; pass --overwrite to replace these {phase} results, or {_PICK}"
        )


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``folder`` exclusively (see the module doc); a lock whose
    process is gone is taken over (flock is released by the kernel when a process dies)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f".{folder.name}.lock"
    fd = _acquire(path, folder)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it: a waiting run re-checks the inode
        os.close(fd)


def _acquire(path: Path, folder: Path) -> int:
    for _ in range(20):
        if fcntl is None:
            try:
                return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                _busy(path, folder)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _busy(path, folder)
        try:  # the holder may have removed the file between our open and flock: retry
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise UserError(f"{folder}: could not lock the folder ({path}); try again")


def _busy(path: Path, folder: Path) -> None:
    try:
        pid = path.read_text().strip() or "unknown"
    except OSError:
        pid = "unknown"
    raise UserError(
        f"{folder} is in use by another ldm3d run (pid {pid}); wait for it to finish, or {_PICK}"
    )


def check_out_dir(out: Path, phase: str, overwrite: bool, inputs: Iterable[Path | None]) -> None:
    """The checks of ``files.staged_dir``, made at the start of a phase so that a refused
    folder costs no work (staged_dir repeats them under the lock)."""
    refuse_unsafe_out_dir(out, inputs)
    check_replaceable(out, phase, overwrite)


def mark_folder(folder: Path, owner: str) -> None:
    """Make ``folder`` with a marker naming ``owner`` (a cache ldm3d keeps inside an output,
    e.g. <dataset>/tuned_baselines), so the enclosing phase counts it as its own. An
    unwritable place is left to the caller's own error handling."""
    folder = Path(folder)
    if read_marker(folder) is not None:
        return
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text(json.dumps({"phase": owner, "outputs": []}) + "\n")


@contextlib.contextmanager
def rank0_holds(folder: Path, inputs: Iterable[Path | None], info: DistInfo,
                prepare: Callable[[], None]) -> Iterator[None]:  # fmt: skip
    """For the block: rank 0 has checked that ``folder`` is a safe place (refuse_unsafe_out_dir),
    holds its lock and has run ``prepare``; a refusal there is raised on every rank, before any
    work (under torchrun only rank 0 takes the lock)."""
    with contextlib.ExitStack() as lock:
        error: Exception | None = None
        if info.is_main:
            try:
                refuse_unsafe_out_dir(folder, inputs)
                lock.enter_context(folder_lock(folder))
                prepare()
            except (UserError, OSError) as e:
                error = e
        raise_on_all_ranks(info, error)
        yield
