"""Where prepare_data gets its cases: the built-in phantom, LR/HR pairs, HR-only volumes, or
blocks of the MNI152 brain template (ldm/data/mni152.py)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ldm.core.errors import ConfigError, DataError
from ldm.data.degrade import DegradeConfig, degrade, resample_to
from ldm.data.dicom import is_series_path, series_name
from ldm.data.io import RawSpec, VolumeMeta, load_volume
from ldm.data.phantom import PhantomConfig, make_phantom

if TYPE_CHECKING:
    from ldm.data.mni152 import MNI152Source

log = logging.getLogger(__name__)

SOURCES = ("phantom", "pairs", "hr_only", "mni152")
RESAMPLE_MODES = ("trilinear", "nearest", "none")


@dataclass(frozen=True)
class PhantomSource:
    num_cases: int = 12
    shape: tuple[int, int, int] = (96, 96, 96)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)

    def __post_init__(self) -> None:
        if self.num_cases < 2:
            raise ConfigError(
                f"phantom.num_cases must be >= 2 (train and test), got {self.num_cases}"
            )


@dataclass(frozen=True)
class PairsSource:
    """Paired volumes: explicit lists ``lr``/``hr`` or a ``folder`` with two glob patterns."""

    lr: tuple[Path, ...] = ()
    hr: tuple[Path, ...] = ()
    folder: Path | None = None
    lr_glob: str = "*_lr.nii.gz"
    hr_glob: str = "*_hr.nii.gz"
    resample: str = "trilinear"  # LR of another grid -> HR grid: trilinear | nearest | none

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE_MODES:
            raise ConfigError(
                f"pairs.resample must be one of {', '.join(RESAMPLE_MODES)}, got {self.resample!r}"
            )


@dataclass(frozen=True)
class HROnlySource:
    """High-quality volumes only; the LR side is simulated with the ``degrade`` section."""

    hr: tuple[Path, ...] = ()
    folder: Path | None = None
    glob: str = "*.nii.gz"


@dataclass
class Case:
    name: str
    lr: np.ndarray  # (D, H, W) float32, original units, on the HR grid
    hr: np.ndarray  # (D, H, W) float32, original units
    meta: VolumeMeta  # of the HR file (or the phantom), to write results back alike
    origin: dict[str, str]  # where it came from, for the manifest


def _glob(folder: Path, pattern: str, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{what}.folder not found: {folder} (check the path in your config)")
    files = sorted(folder.glob(pattern))
    if not files:
        raise DataError(f"{folder}: no files match {what} pattern {pattern!r}")
    return files


def case_name(path: Path) -> str:
    if is_series_path(path):
        return series_name(path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".raw", ".mhd", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _check_3d(data: np.ndarray, path: Path) -> None:
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")


# ---------------------------------------------------------------------------------------------
# LR/HR pairs in one folder, matched by what the globs' wildcards stand for (prepare_data's
# pairs.folder and the --folder inputs of evaluate_psnr / predict_ldm, ldm/data/external.py)

_WILDCARD = re.compile(r"\*|\?|\[!?\]?[^\]]*\]")


def _glob_regex(pattern: str) -> re.Pattern:
    """A regex with one group per wildcard (``*``, ``?``, ``[...]``) of a glob."""
    rx, pos = "", 0
    for m in _WILDCARD.finditer(pattern):
        token, rx = m.group(), rx + re.escape(pattern[pos : m.start()])
        if token in ("*", "?"):
            rx += "(.*)" if token == "*" else "(.)"
        else:  # a class; in a glob [!..] negates, and a leading ^ and backslashes are literal
            body = re.sub(r"([\\[&~|])", r"\\\1", token[1:-1])  # literal in a regex class
            body = "^" + body[1:] if body[:1] == "!" else "\\" + body if body[:1] == "^" else body
            rx += f"([{body}])"
        pos = m.end()
    flags = re.DOTALL | (re.IGNORECASE if os.path.normcase("A") == "a" else 0)  # Windows
    return re.compile(rx + re.escape(pattern[pos:]) + r"\Z", flags)


def glob_keys(folder: Path, pattern: str, flag: str) -> dict[str, Path]:
    """Files and folders (DICOM series) in ``folder`` matching ``pattern``, keyed by what its
    wildcards stand for (joined by '_'): ``c1_lr.nii.gz`` under ``*_lr.nii.gz`` is 'c1'. A
    pattern without wildcards matches one file, keyed '0000'."""
    files = sorted(p for p in folder.glob(pattern) if p.is_file() or p.is_dir())
    if not files:
        raise DataError(
            f"{folder}: no files or DICOM folders match {flag} {pattern!r}; check the pattern"
        )
    rx, keys = _glob_regex(pattern), {}
    for i, p in enumerate(files):
        m = rx.match(p.name)
        key = ("_".join(g for g in m.groups() if g) if m.groups() else f"{i:04d}") if m else ""
        key = key or case_name(p)
        if key in keys:
            raise DataError(
                f"{folder}: {keys[key].name} and {p.name} both stand for {key!r} under {flag} "
                f"{pattern!r}; rename one or narrow the pattern"
            )
        keys[key] = p
    return keys


def pair_by_globs(
    folder: Path, lr_glob: str, hr_glob: str, flags: tuple[str, str]
) -> list[tuple[str, Path, Path]]:
    """(key, LR, HR) for the files of ``folder`` whose wildcard parts agree (``flags`` name the
    two globs in messages); a file on one side without a partner is a DataError listing up to
    3 of them."""
    lr, hr = glob_keys(folder, lr_glob, flags[0]), glob_keys(folder, hr_glob, flags[1])
    same = sorted(set(lr.values()) & set(hr.values()))
    if same:
        raise DataError(f"{same[0]}: matches both {flags[0]} and {flags[1]}; narrow them")
    alone = [p for k, p in lr.items() if k not in hr] + [p for k, p in hr.items() if k not in lr]
    if alone:
        more = f" and {len(alone) - 3} more" if len(alone) > 3 else ""
        raise DataError(
            f"{folder}: {len(alone)} file(s) have no partner with the same * part under "
            f"{flags[0]} {lr_glob!r} / {flags[1]} {hr_glob!r}: "
            f"{', '.join(p.name for p in alone[:3])}{more}; add the partners or narrow the globs"
        )
    return [(k, lr[k], hr[k]) for k in lr]


def list_pairs(src: PairsSource) -> list[tuple[Path, Path]]:
    """(LR, HR) paths: a folder's files matched by the globs' wildcards, or the two lists by
    position."""
    if src.folder is not None:
        if not Path(src.folder).is_dir():
            raise DataError(f"pairs.folder not found: {src.folder} (check the path in your config)")
        flags = ("pairs.lr_glob", "pairs.hr_glob")
        return [(lr, hr) for _, lr, hr in pair_by_globs(src.folder, src.lr_glob, src.hr_glob,
                                                        flags)]  # fmt: skip
    lr, hr = list(src.lr), list(src.hr)
    if not hr:
        raise ConfigError("source 'pairs' needs pairs.lr and pairs.hr lists, or pairs.folder")
    if len(lr) != len(hr):
        raise DataError(f"pairs: {len(lr)} LR files but {len(hr)} HR files; they must pair up 1:1")
    return list(zip(lr, hr))


def _check_exist(paths: list[Path]) -> None:
    """Fail fast, before any processing, on the first missing input file."""
    for p in paths:
        if is_series_path(p):  # a DICOM series folder: read (and checked) by load_volume
            continue
        if not Path(p).is_file() and not Path(p).with_suffix(".mhd").is_file():
            raise DataError(f"volume file not found: {p} (check the path in your config)")


def iter_cases(
    source: str,
    phantom: PhantomSource,
    pairs: PairsSource,
    hr_only: HROnlySource,
    deg: DegradeConfig,
    raw: RawSpec,
    seed: int,
    mni152: MNI152Source | None = None,
) -> tuple[int, Iterator[Case]]:
    """(number of cases, iterator over them); volumes are loaded one case at a time.

    ``mni152`` is the ``MNI152Source`` section (ldm/data/mni152.py imports this module, so it is
    imported here only when that source is chosen)."""
    if source == "phantom":
        return phantom.num_cases, _phantom_cases(phantom, deg, seed)
    if source == "pairs":
        files = list_pairs(pairs)
        _check_exist([p for pair in files for p in pair])
        return len(files), _pair_cases(files, pairs.resample, raw)
    if source == "hr_only":
        hr_files = (
            _glob(hr_only.folder, hr_only.glob, "hr_only") if hr_only.folder else list(hr_only.hr)
        )
        if not hr_files:
            raise ConfigError("source 'hr_only' needs hr_only.hr (a list) or hr_only.folder")
        _check_exist(hr_files)
        return len(hr_files), _hr_only_cases(hr_files, deg, raw, seed)
    if source == "mni152":
        from ldm.data.mni152 import MNI152Source, mni152_cases

        return mni152_cases(mni152 if mni152 is not None else MNI152Source(), deg, seed)
    raise ConfigError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")


def _phantom_cases(src: PhantomSource, deg: DegradeConfig, seed: int) -> Iterator[Case]:
    for i in range(src.num_cases):
        case_seed = seed * 100_003 + i
        hr = make_phantom(tuple(src.shape), case_seed, src.phantom)
        lr = degrade(hr, deg, case_seed + 7919)
        meta = VolumeMeta("raw", spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
        yield Case(f"phantom_{i:03d}", lr, hr, meta, {"phantom_seed": str(case_seed)})


def _pair_cases(files: list[tuple[Path, Path]], resample: str, raw: RawSpec) -> Iterator[Case]:
    for lr_path, hr_path in files:
        hr, meta = load_volume(hr_path, raw)
        lr, _ = load_volume(lr_path, raw)
        _check_3d(hr, hr_path)
        _check_3d(lr, lr_path)
        if lr.shape != hr.shape and resample != "none":
            log.info("resampling %s %s onto the HR grid %s", lr_path.name, lr.shape, hr.shape)
            lr = resample_to(lr, hr.shape, resample)
        if lr.shape != hr.shape:
            raise DataError(
                f"{lr_path}: LR shape {lr.shape} != HR shape {hr.shape} of {hr_path} "
                f"(set pairs.resample to trilinear to resample LR onto the HR grid)"
            )
        yield Case(case_name(hr_path), lr, hr, meta, {"lr": str(lr_path), "hr": str(hr_path)})


def _hr_only_cases(
    files: list[Path], deg: DegradeConfig, raw: RawSpec, seed: int
) -> Iterator[Case]:
    for i, hr_path in enumerate(files):
        hr, meta = load_volume(hr_path, raw)
        _check_3d(hr, hr_path)
        lr = degrade(hr, deg, seed * 100_003 + i)
        yield Case(case_name(hr_path), lr, hr, meta, {"hr": str(hr_path)})
