"""DICOM series in and out through SimpleITK (GDCM): slice order, spacing, origin, direction.

Reading: a folder holding one DICOM series is a volume (``ldm.data.io.load_volume`` reads it). A
folder with several series needs one chosen by its SeriesInstanceUID, spelled ``folder@UID``
(e.g. ``scans/patient1@1.2.840.113619.2.55.3``) wherever a path is given -- ``--input``, a
config, ``load_volume`` -- or passed as ``series_uid=`` to ``load_dicom_series``; without one
the ``DataError`` lists the series (UID, SeriesDescription, number of slices). The array is
(z, y, x) with spacing and origin reversed into that order and the direction as SimpleITK
gives it, as for MetaImage in ``ldm.data.io``; GDCM applies each slice's RescaleSlope/Intercept,
so values are in real units (HU for CT). Before reading, the slices are checked: one
orientation (ImageOrientationPatient), one size, and regular steps along the slice normal
(a step more than 1 % off the median is a gap: missing or unreadable slices). Every problem is
one ``DataError`` naming the folder.

Writing: ``save_dicom_series`` writes a NEW series, one file per slice, int16 with one
RescaleSlope/RescaleIntercept for all slices (values round-trip within (max - min) / 60000),
new SeriesInstanceUID and SOPInstanceUIDs ("2.25." + uuid4), and the patient/study tags of
the source series when the volume's meta names one (``VolumeMeta.source`` /
``series_uid``), so the result files under the same patient and study. The series is
written into a temporary sibling folder and renamed into place; an existing folder is never
written over.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.core.errors import DataError, UserError
from ldm.core.files import UMASK, _remove_stale
from ldm.data.io import VolumeMeta

SERIES_SEP = "@"  # folder@SeriesInstanceUID selects one series of several
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
GAP_TOLERANCE = 0.01  # a slice step this far (relative) from the median step is a gap
_IOP_TOLERANCE = 1e-4  # ImageOrientationPatient values that differ by more: another orientation

# copied from the source series into a written one: patient, study and frame of reference
SOURCE_TAGS = {
    "0008|0005": "SpecificCharacterSet",
    "0010|0010": "PatientName",
    "0010|0020": "PatientID",
    "0010|0030": "PatientBirthDate",
    "0010|0040": "PatientSex",
    "0010|1010": "PatientAge",
    "0020|000d": "StudyInstanceUID",
    "0020|0010": "StudyID",
    "0008|0020": "StudyDate",
    "0008|0030": "StudyTime",
    "0008|0050": "AccessionNumber",
    "0008|0090": "ReferringPhysicianName",
    "0008|1030": "StudyDescription",
    "0008|0080": "InstitutionName",
    "0008|0060": "Modality",
    "0018|0015": "BodyPartExamined",
    "0018|5100": "PatientPosition",
    "0020|0052": "FrameOfReferenceUID",
}
# single-frame storage classes GDCM writes with per-slice position and rescale tags; other
# modalities are written as Secondary Capture (GDCM would pick e.g. Enhanced MR, multi-frame)
_SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2": "implicit VR little endian",
                    "1.2.840.10008.1.2.1": "explicit VR little endian",
                    "1.2.840.10008.1.2.2": "explicit VR big endian"}  # fmt: skip
_COMPRESSED_SYNTAXES = {
    "1.2.840.10008.1.2.1.99": "deflate",
    "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.51": "JPEG extended",
    "1.2.840.10008.1.2.4.57": "JPEG lossless",
    "1.2.840.10008.1.2.4.70": "JPEG lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
    "1.2.840.10008.1.2.5": "RLE lossless",
}


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series of a folder, as GDCM groups and orders its files."""

    uid: str
    description: str
    files: tuple[str, ...]

    def line(self) -> str:
        what = f" ({self.description!r})" if self.description else ""
        return f"{self.uid}{what}: {len(self.files)} slice(s)"


def new_uid() -> str:
    """A globally unique DICOM UID without a registered root: "2.25." + the uuid4 as decimal."""
    return "2.25." + str(uuid.uuid4().int)


def split_series_path(path: str | Path) -> tuple[Path, str | None]:
    """``folder@UID`` -> (folder, UID); any other path -> (path, None). A path that exists as
    written is never split, so a folder whose own name contains ``@`` still works."""
    path = Path(path)
    if SERIES_SEP in path.name and not path.exists():
        name, uid = path.name.rsplit(SERIES_SEP, 1)
        if name and _UID.fullmatch(uid):
            return path.with_name(name), uid
    return path, None


def is_series_path(path: str | Path) -> bool:
    """True for a folder (read as a DICOM series) or a ``folder@UID`` spelling."""
    folder, uid = split_series_path(path)
    return uid is not None or folder.is_dir()


def series_name(path: str | Path) -> str:
    """A case name for a series path: the folder name, plus the last part of a chosen UID."""
    folder, uid = split_series_path(path)
    return folder.name if uid is None else f"{folder.name}_{uid.rsplit('.', 1)[-1]}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ITK's warnings (no series found, non-uniform sampling) on stderr: the checks
    here turn the problems they describe into DataErrors."""
    import SimpleITK as sitk

    was = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(was)


def _sitk_message(e: Exception) -> str:
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    return (lines[-1] if lines else "unreadable")[:200]


def _header(file: str):
    """The file's header (metadata, size) without its pixel data; RuntimeError if unreadable."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(file)
    reader.ReadImageInformation()
    return reader


def _tag(header, key: str) -> str | None:
    return header.GetMetaData(key).rstrip(" \x00") if header.HasMetaDataKey(key) else None


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """The DICOM series GDCM finds in ``folder`` (not its subfolders), files in slice order."""
    import SimpleITK as sitk

    folder = Path(folder)
    out = []
    try:
        with _quiet():
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
                files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
                try:
                    description = (_tag(_header(files[0]), "0008|103e") or "") if files else ""
                except RuntimeError:
                    description = ""
                out.append(SeriesInfo(uid, description, files))
    except RuntimeError as e:
        raise DataError(
            f"{folder}: SimpleITK cannot scan it for DICOM ({_sitk_message(e)})"
        ) from None
    return out


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


def _transfer_syntax(file: str | Path) -> str | None:
    """TransferSyntaxUID (0002,0010) from the file meta header (explicit VR little endian by
    the standard), read by hand: SimpleITK does not report group 0002."""
    try:
        with open(file, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(head):
        group, element = struct.unpack("<HH", head[pos : pos + 4])
        if group != 2:
            return None
        vr = head[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack("<I", head[pos + 8 : pos + 12])
            start = pos + 12
        else:
            (length,) = struct.unpack("<H", head[pos + 6 : pos + 8])
            start = pos + 8
        if element == 0x10:
            return head[start : start + length].decode("ascii", "replace").rstrip(" \x00")
        pos = start + length
    return None


def _unreadable(folder: Path, file: str | Path, e: Exception) -> DataError:
    name = Path(file).name
    ts = _transfer_syntax(file)
    if ts in _COMPRESSED_SYNTAXES or (ts is not None and ts not in _NATIVE_SYNTAXES):
        what = _COMPRESSED_SYNTAXES.get(ts, "an unknown transfer syntax")
        return DataError(
            f"{folder}: cannot read {name}: its pixel data is {what} (transfer syntax {ts}) and "
            f"SimpleITK's GDCM cannot decode it, or the file is corrupt ({_sitk_message(e)}); "
            f"decompress the series first (e.g. gdcmconv --raw) or export it uncompressed"
        )
    return DataError(
        f"{folder}: cannot read {name}: corrupt or not a DICOM image ({_sitk_message(e)}); "
        f"export the series again"
    )


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


# ---------------------------------------------------------------------------------------------
# writing


def _ds(x: float) -> str:
    """A DICOM decimal string (at most 16 characters) as close to ``x`` as fits."""
    for digits in range(15, 0, -1):
        s = f"{x:.{digits}g}"
        if len(s) <= 16:
            return s
    raise ValueError(x)  # unreachable: "-1e-300" fits


def _geometry(data: np.ndarray, meta: VolumeMeta) -> tuple[np.ndarray, list, list, list]:
    """(array (z, y, x), spacing, origin, direction in SimpleITK's x/y/z order) from the meta.

    NIfTI arrays are (i, j, k) with a RAS affine: transposed, the affine split into spacing,
    direction and origin and turned into DICOM's LPS (x and y negated), as ITK reads NIfTI.
    """
    if meta.format == "nifti":
        zyx = np.ascontiguousarray(data.transpose(2, 1, 0))
        if meta.affine is None:
            spacing = list(meta.spacing) if len(meta.spacing) == 3 else [1.0] * 3
            return zyx, spacing, [0.0] * 3, np.eye(3).ravel().tolist()
        a = np.asarray(meta.affine, dtype=np.float64)
        spacing = np.linalg.norm(a[:3, :3], axis=0)
        lps = np.diag([-1.0, -1.0, 1.0])
        direction = lps @ (a[:3, :3] / spacing)
        return zyx, spacing.tolist(), (lps @ a[:3, 3]).tolist(), direction.ravel().tolist()
    spacing = list(reversed(meta.spacing)) if len(meta.spacing) == 3 else [1.0] * 3
    origin = list(reversed(meta.origin)) if len(meta.origin) == 3 else [0.0] * 3
    direction = list(meta.direction) if meta.direction is not None else np.eye(3).ravel().tolist()
    return np.ascontiguousarray(data), spacing, origin, direction


def _rescale(data: np.ndarray) -> tuple[str, str, bool]:
    """(RescaleSlope, RescaleIntercept, integer) for int16 storage: slope 1 / intercept 0 for
    integer values that fit; else 65000 levels over [min, max] (error <= (max - min) / 130000)."""
    lo, hi = float(data.min()), float(data.max())
    if lo >= -32768 and hi <= 32767 and np.array_equal(data, np.round(data)):
        return "1", "0", True
    slope = _ds((hi - lo) / 65000) if hi > lo else "1"
    return slope, _ds((hi + lo) / 2), False


def _source_tags(meta: VolumeMeta) -> dict[str, str]:
    """Patient/study tags of the series ``meta`` names (first slice), or {} when none."""
    if not meta.source:
        return {}
    folder = Path(meta.source)
    gone = (
        f"{folder}: the source DICOM series {meta.series_uid or ''} named by the volume's meta "
        f"is not there any more, so its patient and study tags cannot be copied; restore it, or "
        f"set meta.source = None to write a series without them"
    )
    if not folder.is_dir():
        raise DataError(gone)
    series = list_series(folder)
    if meta.series_uid is not None:
        series = [s for s in series if s.uid == meta.series_uid]
    if not series or not series[0].files:
        raise DataError(gone)
    try:
        header = _header(series[0].files[0])
    except RuntimeError as e:
        raise _unreadable(folder, series[0].files[0], e) from None
    tags = {k: _tag(header, k) for k in SOURCE_TAGS}
    tags = {k: v for k, v in tags.items() if v}
    number = _tag(header, "0020|0011")
    tags["_series_number"] = number if number and number.lstrip("-").isdigit() else ""
    return tags


def save_dicom_series(
    folder: Path,
    data: np.ndarray,
    meta: VolumeMeta,
    description: str = "ldm3d",
    series_number: int | None = None,
    series_offset: int = 1000,
) -> Path:
    """Write ``data`` as a new DICOM series into the new folder ``folder``; returns it.

    One file per slice (00001.dcm ...), int16 with one RescaleSlope/Intercept for all slices.
    The geometry comes from ``meta`` (a DICOM or MetaImage (z, y, x) array with spacing,
    origin, direction; a NIfTI array with its affine; else 1 mm, identity). When ``meta``
    names a source series, its patient/study tags and FrameOfReferenceUID are copied; the
    series gets new UIDs, SeriesDescription ``description`` and SeriesNumber
    ``series_number`` (default: the source's + ``series_offset``). An existing ``folder`` is
    a UserError.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    _refuse_existing(folder)
    data = np.asarray(data)
    if data.ndim != 3:
        raise UserError(f"{folder}: a DICOM series needs a 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise UserError(f"{folder}: the volume has NaN/Inf voxels; DICOM cannot store them")
    zyx, spacing, origin, direction = _geometry(data.astype(np.float64), meta)
    slope, intercept, integer = _rescale(zyx)
    img = sitk.GetImageFromArray(zyx.astype(np.int16) if integer else zyx)
    try:
        img.SetSpacing([float(v) for v in spacing])
        img.SetOrigin([float(v) for v in origin])
        img.SetDirection([float(v) for v in direction])
    except RuntimeError as e:
        raise UserError(f"{folder}: the volume's geometry is not valid for DICOM "
                        f"({_sitk_message(e)})") from None  # fmt: skip

    source = _source_tags(meta)
    if series_number is None:
        series_number = int(source.pop("_series_number", "") or 0) + series_offset
    source.pop("_series_number", None)
    modality = source.get("0008|0060", "OT")
    date, now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    d = img.GetDirection()
    normal = np.array([d[2], d[5], d[8]])
    tags = {
        **source,
        "0008|0060": modality,
        "0008|0016": _SOP_CLASS.get(modality, _SECONDARY_CAPTURE),
        "0020|000d": source.get("0020|000d") or new_uid(),
        "0020|0052": source.get("0020|0052") or new_uid(),
        "0020|000e": new_uid(),
        "0020|0011": str(series_number),
        "0008|103e": description[:64],
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|0021": date,
        "0008|0031": now,
        "0008|0012": date,
        "0008|0013": now,
        "0020|0037": "\\".join(_ds(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0018|0050": _ds(spacing[2]),
        "0018|0088": _ds(spacing[2]),
        "0028|1053": slope,
        "0028|1052": intercept,
    }
    if not integer:  # float pixels: GDCM stores (value - intercept) / slope, rounded, as int16
        tags.update({"0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"})

    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent, rf"\.{re.escape(folder.name)}\.(\d+)\..*\.tmp")
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=".tmp",
                                    dir=parent))  # fmt: skip
    except OSError as e:
        raise UserError(f"{folder}: cannot create it ({e.strerror or e}); fix the permissions "
                        f"of {parent} or choose another folder") from None  # fmt: skip
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()  # keep the UIDs set here instead of GDCM's own
        for z in range(img.GetDepth()):
            ipp = img.TransformIndexToPhysicalPoint((0, 0, z))
            one = img[:, :, z]
            for key, value in tags.items():
                one.SetMetaData(key, value)
            one.SetMetaData("0020|0032", "\\".join(_ds(v) for v in ipp))
            one.SetMetaData("0020|1041", _ds(float(np.dot(ipp, normal))))
            one.SetMetaData("0020|0013", str(z + 1))
            one.SetMetaData("0008|0018", new_uid())
            path = tmp / f"{z + 1:05d}.dcm"
            writer.SetFileName(str(path))
            writer.Execute(one)
            os.chmod(path, 0o666 & ~UMASK)
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700
        _refuse_existing(folder)  # created meanwhile: rename would replace an empty folder
        os.rename(tmp, folder)
    except RuntimeError as e:
        raise UserError(f"{folder}: SimpleITK cannot write the DICOM series "
                        f"({_sitk_message(e)})") from None  # fmt: skip
    except OSError as e:
        raise UserError(f"{folder}: cannot write the DICOM series ({e.strerror or e}); fix the "
                        f"permissions of {parent} or choose another folder") from None  # fmt: skip
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _refuse_existing(folder: Path) -> None:
    if folder.exists() or folder.is_symlink():
        raise UserError(
            f"{folder} already exists; a DICOM series is written only into a new folder, "
            f"never over an existing one: choose another name or move the old one away"
        )
