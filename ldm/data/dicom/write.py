"""Writing a volume as a NEW DICOM series that files under the patient and study of its source.

``save_dicom_series`` writes one file per slice, int16 with one RescaleSlope/RescaleIntercept for
all slices (values round-trip within (max - min) / 60000), new SeriesInstanceUID and
SOPInstanceUIDs ("2.25." + uuid4), and the patient/study tags of the source series when the
volume's meta names one (``VolumeMeta.source`` / ``series_uid``). The series is written into a
temporary sibling folder and renamed into place; an existing folder is never written over.
"""

from __future__ import annotations

import locale
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from ldm.core.errors import DataError, UserError
from ldm.core.files import UMASK, _remove_stale
from ldm.data.dicom.series import _header, _sitk_message, _tag, _unreadable, list_series
from ldm.data.io import VolumeMeta

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


def new_uid() -> str:
    """A globally unique DICOM UID without a registered root: "2.25." + the uuid4 as decimal."""
    return "2.25." + str(uuid.uuid4().int)


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
    saved = locale.setlocale(locale.LC_ALL)
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
        locale.setlocale(locale.LC_ALL, saved)  # GDCM's writer leaves LC_CTYPE at "C"
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _refuse_existing(folder: Path) -> None:
    if folder.exists() or folder.is_symlink():
        raise UserError(
            f"{folder} already exists; a DICOM series is written only into a new folder, "
            f"never over an existing one: choose another name or move the old one away"
        )
