"""Reading one DICOM series of a folder as a (z, y, x) volume, checked before it is read.

A folder holding one series is read as it is; a folder with several needs one chosen by its
SeriesInstanceUID, ``folder@UID`` or ``series_uid=`` (``ldm.data.dicom.series``); without one the
``DataError`` lists the series (UID, SeriesDescription, number of slices). The array is (z, y, x)
with spacing and origin reversed into that order and the direction as SimpleITK gives it, as for
MetaImage in ``ldm.data.io``; GDCM applies each slice's RescaleSlope/Intercept, so values are in
real units (HU for CT). Before reading, the slices are checked: one orientation
(ImageOrientationPatient), one size, and regular steps along the slice normal (a step more than
1 % off the median is a gap: missing or unreadable slices). Every problem is one ``DataError``
naming the folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldm.core.errors import DataError, UserError
from ldm.data.dicom.series import (
    SERIES_SEP,
    SeriesInfo,
    _header,
    _quiet,
    _sitk_message,
    _tag,
    _unreadable,
    list_series,
    split_series_path,
)
from ldm.data.io import VolumeMeta

GAP_TOLERANCE = 0.01  # a slice step this far (relative) from the median step is a gap
_IOP_TOLERANCE = 1e-4  # ImageOrientationPatient values that differ by more: another orientation


def _plain_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _choose(folder: Path, series: list[SeriesInfo], uid: str | None) -> SeriesInfo:
    listing = "; ".join(s.line() for s in series)
    if uid is not None:
        for s in series:
            if s.uid == uid:
                return s
        raise DataError(f"{folder}: no DICOM series {uid} there; it holds {listing}")
    if len(series) > 1:
        raise DataError(
            f"{folder}: holds {len(series)} DICOM series, choose one as {folder}{SERIES_SEP}UID: "
            f"{listing}"
        )
    return series[0]


def _floats(header, key: str, n: int) -> np.ndarray | None:
    value = _tag(header, key)
    try:
        v = np.array([float(x) for x in value.split("\\")]) if value else None
    except ValueError:
        return None
    return v if v is not None and v.size == n and np.isfinite(v).all() else None


def _stray_note(folder: Path, series: list[SeriesInfo]) -> str:
    listed = {Path(f).name for s in series for f in s.files}
    stray = [p.name for p in _plain_files(folder) if p.name not in listed]
    if not stray:
        return ""
    return (
        f"; {len(stray)} file(s) there are in no series, unreadable or corrupt DICOM "
        f"(e.g. {stray[0]})"
    )


def _check_geometry(
    folder: Path, s: SeriesInfo, headers: list, series: list[SeriesInfo]
) -> list[str]:
    """The files sorted along the slice normal; a DataError for mixed orientations or sizes,
    missing position tags, repeated positions or irregular steps (a gap)."""
    files = [Path(f).name for f in s.files]
    sizes = [tuple(h.GetSize()[:2]) for h in headers]
    odd = [f for f, size in zip(files, sizes) if size != sizes[0]]
    if odd:
        raise DataError(
            f"{folder}: series {s.uid} mixes slice sizes: {odd[0]} is {sizes[files.index(odd[0])]}"
            f" pixels, {files[0]} {sizes[0]} ({len(odd)} of {len(files)} slices differ)"
        )
    iop = [_floats(h, "0020|0037", 6) for h in headers]
    ipp = [_floats(h, "0020|0032", 3) for h in headers]
    for f, o, p in zip(files, iop, ipp):
        if o is None or p is None:
            raise DataError(
                f"{folder}: {f} lacks a valid ImagePositionPatient/ImageOrientationPatient "
                f"(0020|0032 / 0020|0037), so the slices cannot be placed in space"
            )
    ref = iop[0]
    odd = [i for i, o in enumerate(iop) if np.abs(o - ref).max() > _IOP_TOLERANCE]
    if odd:
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        raise DataError(
            f"{folder}: series {s.uid} mixes slice orientations: {len(odd)} of {len(files)} "
            f"slices have an ImageOrientationPatient other than {fmt(ref)} of {files[0]} (e.g. "
            f"{files[odd[0]]}: {fmt(iop[odd[0]])}); export each orientation as its own series"
        )
    normal = np.cross(ref[:3], ref[3:])
    pos = np.array([float(p @ normal) for p in ipp])
    order = np.argsort(pos, kind="stable")
    pos, names = pos[order], [files[i] for i in order]
    steps = np.diff(pos)
    if len(steps) == 0:
        return [s.files[i] for i in order]
    same = np.flatnonzero(steps <= 1e-6 * max(1.0, float(np.abs(pos).max())))
    if same.size:
        i = int(same[0])
        raise DataError(
            f"{folder}: series {s.uid}: {names[i]} and {names[i + 1]} lie at the same position "
            f"({pos[i]:.4g} mm along the slice normal); the series repeats slices (several "
            f"acquisitions or time points?); export one volume per series"
        )
    median = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - median) > GAP_TOLERANCE * median)
    if bad.size:
        i = int(bad[0])
        missing = round(steps[i] / median) - 1
        why = f"about {missing} slice(s) missing" if missing >= 1 else "irregular spacing"
        raise DataError(
            f"{folder}: series {s.uid} has irregular slice spacing: a step of "
            f"{steps[i]:.4g} mm between {names[i]} and {names[i + 1]} (at {pos[i]:.4g} and "
            f"{pos[i + 1]:.4g} mm along the slice normal) where the median step is "
            f"{median:.4g} mm ({why}; {bad.size} such gap(s)){_stray_note(folder, series)}"
        )
    return [s.files[i] for i in order]


def load_dicom_series(
    path: str | Path, series_uid: str | None = None
) -> tuple[np.ndarray, VolumeMeta]:
    """Read one DICOM series of a folder as a (z, y, x) array in real units.

    ``path`` is the folder or ``folder@UID``; ``series_uid`` chooses the series too (it must
    agree with a UID in the path). The meta has format "dicom", spacing/origin in (z, y, x)
    order, the direction as SimpleITK gives it (row-major, x/y/z), the dtype SimpleITK reads,
    and ``source`` (the folder, absolute) and ``series_uid`` for ``save_dicom_series``.
    """
    import SimpleITK as sitk

    folder, uid = split_series_path(path)
    if series_uid is not None and uid is not None and series_uid != uid:
        raise UserError(f"{path}: names series {uid} but series_uid={series_uid!r} was given")
    uid = series_uid or uid
    if not folder.is_dir():
        raise DataError(f"DICOM folder not found: {folder} (check the path)")
    series = list_series(folder)
    if not series:
        files = _plain_files(folder)
        what = (
            f"none of its {len(files)} file(s) is a readable DICOM image, e.g. {files[0].name}"
            if files
            else "it is empty"
        )
        raise DataError(
            f"{folder}: no DICOM series found ({what}); give a folder that holds the files of "
            f"one DICOM series"
        )
    chosen = _choose(folder, series, uid)
    headers = []
    for f in chosen.files:
        try:
            headers.append(_header(f))
        except RuntimeError as e:
            raise _unreadable(folder, f, e) from None
    if len(chosen.files) == 1:
        size = headers[0].GetSize()
        if len(size) < 3 or size[2] <= 1:
            raise DataError(
                f"{folder}: series {chosen.uid} is a single 2D slice "
                f"({Path(chosen.files[0]).name}); a 3D series with several slices is needed"
            )
        files = list(chosen.files)  # one multi-frame file: GDCM places its frames
    else:
        files = _check_geometry(folder, chosen, headers, series)
    rescale = {(_tag(h, "0028|1053"), _tag(h, "0028|1052")) for h in headers}
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames(files)
    if len(rescale) > 1:  # slopes differ per slice (PET): keep each slice's own in float
        reader.SetOutputPixelType(sitk.sitkFloat64)
    try:
        with _quiet():
            img = reader.Execute()
    except RuntimeError as e:
        raise _culprit(folder, files, e) from None
    data = sitk.GetArrayFromImage(img)
    if data.ndim != 3:
        raise DataError(f"{folder}: series {chosen.uid} is not 3D (shape {data.shape})")
    meta = VolumeMeta(
        "dicom",
        tuple(float(v) for v in reversed(img.GetSpacing())),
        tuple(float(v) for v in reversed(img.GetOrigin())),
        dtype=data.dtype.name,
        direction=tuple(float(v) for v in img.GetDirection()),
        source=str(folder.resolve()),
        series_uid=chosen.uid,
    )
    return data, meta


def _culprit(folder: Path, files: list[str], e: Exception) -> DataError:
    """The DataError for a series SimpleITK cannot read: names the first file that fails."""
    import SimpleITK as sitk

    for f in files:
        try:
            with _quiet():
                sitk.ReadImage(f, imageIO="GDCMImageIO")
        except RuntimeError as one:
            return _unreadable(folder, f, one)
    return DataError(f"{folder}: SimpleITK cannot read the series ({_sitk_message(e)})")
