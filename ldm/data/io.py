"""Volume I/O: .raw + .mhd, .nii/.nii.gz, .npy, and DICOM series (a folder, ``ldm.data.dicom``).

Arrays are numpy, axis order as stored: for .raw/.mhd the array is (z, y, x) -- MetaImage's
DimSize lists x first; for NIfTI the nibabel order (i, j, k) with its affine kept; a DICOM
series is (z, y, x) like MetaImage, in real units (RescaleSlope/Intercept applied). A folder
is read as one DICOM series; ``folder@SeriesInstanceUID`` chooses one of several.
Every writer goes through a temporary name and an atomic rename (``ldm.core.files``), so a crash
never leaves a half-written file under the final name (a DICOM series: a whole folder).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldm.core.errors import DataError, UserError
from ldm.core.files import UMASK, atomic_path

_MET_TYPES = {
    "MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2",
    "MET_UINT": "u4", "MET_INT": "i4", "MET_ULONG_LONG": "u8", "MET_LONG_LONG": "i8",
    "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}  # fmt: skip
_DTYPE_TO_MET = {np.dtype(v).str[1:]: k for k, v in _MET_TYPES.items()}
REAL_KINDS = "biuf"  # numpy dtype kinds a volume may hold: bool, integers, floats


@dataclass(frozen=True)
class RawSpec:
    """How to read a headerless .raw file: array shape (z, y, x), dtype and byte order."""

    shape: tuple[int, ...] | None = None
    dtype: str = "float32"
    byte_order: str = "little"  # little | big

    def __post_init__(self) -> None:
        try:
            kind = np.dtype(self.dtype).kind
        except TypeError:
            kind = None
        if kind not in REAL_KINDS:
            raise UserError(
                f"raw.dtype: {self.dtype!r} is not a real number type; use e.g. float32, int16 "
                f"or uint8"
            )
        if self.shape is not None and (
            not self.shape or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                  for n in self.shape)
        ):  # fmt: skip
            raise UserError(
                f"raw.shape must be positive sizes (z, y, x), got {list(self.shape)}; fix "
                f"raw.shape in the config"
            )
        if self.byte_order not in ("little", "big"):
            raise UserError(f"raw.byte_order must be 'little' or 'big', got {self.byte_order!r}")


@dataclass
class VolumeMeta:
    """Where a volume came from, enough to write a result back in the same format and space."""

    format: str  # raw | nifti | npy | dicom
    spacing: tuple[float, ...] = ()
    origin: tuple[float, ...] = ()
    affine: list[list[float]] | None = None
    dtype: str = "float32"
    # MetaImage orientation (TransformMatrix) as SimpleITK gives it: row-major, x/y/z order;
    # None = identity
    direction: tuple[float, ...] | None = None
    # DICOM: the folder the series was read from (absolute) and its SeriesInstanceUID, so a
    # result can be written as a new series of the same patient and study; None otherwise
    source: str | None = None
    series_uid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"format": self.format, "spacing": list(self.spacing), "origin": list(self.origin),
             "affine": self.affine, "dtype": self.dtype}  # fmt: skip
        if self.direction is not None:
            d["direction"] = list(self.direction)
        for key in ("source", "series_uid"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumeMeta:
        direction = d.get("direction")
        return cls(d["format"], tuple(d.get("spacing", ())), tuple(d.get("origin", ())),
                   d.get("affine"), d.get("dtype", "float32"),
                   tuple(direction) if direction is not None else None,
                   d.get("source"), d.get("series_uid"))  # fmt: skip


FORMATS = ("raw", "nifti", "npy", "dicom")


def volume_format(path: Path) -> str:
    """raw | nifti | npy by the extension; dicom for a folder or a ``folder@UID`` spelling."""
    from ldm.data.dicom import is_series_path

    if is_series_path(path):
        return "dicom"
    name = Path(path).name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".raw", ".mhd")):
        return "raw"
    if name.endswith(".npy"):
        return "npy"
    raise DataError(
        f"{path}: unknown volume format (use .raw/.mhd, .nii, .nii.gz, .npy or a folder holding "
        f"a DICOM series)"
    )


def load_volume(path: str | Path, raw: RawSpec | None = None) -> tuple[np.ndarray, VolumeMeta]:
    """Read a volume as float32; NaN/Inf or a .raw of the wrong byte size is a DataError.

    A folder is read as a DICOM series (``ldm.data.dicom.load_dicom_series``); when it holds
    several, choose one with ``folder@SeriesInstanceUID`` (the DataError lists them).
    """
    path = Path(path)
    fmt = volume_format(path)
    if fmt == "dicom":
        from ldm.data.dicom import load_dicom_series

        data, meta = load_dicom_series(path)
    elif not path.is_file():
        raise DataError(f"volume file not found: {path} (check the path in your config)")
    elif fmt == "raw":
        data, meta = _load_raw(path, raw)
    elif fmt == "nifti":
        data, meta = _load_nifti(path)
    else:
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: not a readable .npy file ({e})") from None
        check_dtype(data.dtype, path)
        meta = VolumeMeta("npy", dtype=data.dtype.name)
    if data.size == 0:
        raise DataError(f"{path}: the volume is empty (shape {data.shape}); give a non-empty one")
    data = np.ascontiguousarray(data, dtype=np.float32)
    check_finite(data, path)
    return data, meta


def check_dtype(dtype: np.dtype, path: str | Path) -> None:
    """Refuse what has no meaning as intensities, before a cast to float32 would mangle it."""
    if dtype.kind == "c":
        raise DataError(
            f"{path}: complex values ({dtype.name}); the imaginary part would be lost: save the "
            f"magnitude instead (e.g. np.abs(volume))"
        )
    if dtype.kind not in REAL_KINDS:
        raise DataError(
            f"{path}: holds non-numeric values (dtype {dtype.str}); save the volume as "
            f"float32 or an integer type"
        )


def check_finite(data: np.ndarray, path: str | Path) -> None:
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise DataError(f"{path}: volume has {bad} NaN/Inf voxels; clean or mask them before use")


def _parse_mhd(mhd: Path) -> dict[str, str]:
    try:
        text = mhd.read_text(errors="replace")
    except OSError as e:
        raise DataError(f"{mhd}: cannot read ({e.strerror or e}); check its permissions") from None
    fields = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            fields[k.strip()] = v.strip()
    return fields


def _check_mhd(mhd: Path) -> None:
    """Clear errors for the header problems users meet, before SimpleITK reads the file."""
    h = _parse_mhd(mhd)
    try:
        dims = [int(v) for v in h["DimSize"].split()]
        dtype = np.dtype(_MET_TYPES[h["ElementType"]])
        ndims = int(h.get("NDims", len(dims)))
        for key in ("ElementSpacing", "Offset", "Origin", "TransformMatrix"):
            [float(v) for v in h.get(key, "").split()]
    except KeyError as e:
        raise DataError(f"{mhd}: MetaImage header lacks or has an unknown {e}") from None
    except ValueError as e:
        raise DataError(f"{mhd}: malformed MetaImage header field ({e}); fix the .mhd") from None
    if ndims != len(dims) or ndims not in (2, 3, 4):
        raise DataError(f"{mhd}: DimSize has {len(dims)} values but NDims = {ndims}; fix the .mhd")
    if min(dims) < 1:
        raise DataError(f"{mhd}: DimSize {dims} must be positive sizes; fix the .mhd")
    data_file = h.get("ElementDataFile", "")
    compressed = h.get("CompressedData", "False").lower() == "true"
    if not data_file:
        raise DataError(f"{mhd}: MetaImage header lacks ElementDataFile")
    if data_file.upper() == "LOCAL" or compressed or " " in data_file or "%" in data_file:
        _check_memory(mhd, math.prod(dims) * dtype.itemsize, dims)
        return  # embedded, compressed or multi-file data: SimpleITK checks the sizes
    path = mhd.parent / data_file
    if not path.is_file():
        raise DataError(f"raw data file not found: {path} (named by {mhd})")
    _check_size(path, tuple(reversed(dims)), dtype, "the .mhd")


def _check_memory(mhd: Path, nbytes: int, dims: list[int]) -> None:
    """Refuse a header whose image could not fit in this machine's memory (Python ints)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): SimpleITK decides
        return
    if nbytes > memory:
        raise DataError(
            f"{mhd}: DimSize {dims} needs {nbytes / 2**30:.3g} GiB, more than this machine's "
            f"{memory / 2**30:.3g} GiB of memory; fix the .mhd or crop the volume"
        )


def _check_size(path: Path, shape: tuple[int, ...], dtype: np.dtype, fix: str) -> None:
    expected = math.prod(int(n) for n in shape) * dtype.itemsize  # Python ints: no overflow
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(
            f"{path}: file has {actual} bytes but shape {shape} x {dtype.itemsize} bytes "
            f"({dtype.name}) needs {expected}; fix {fix}"
        )


def _load_raw(path: Path, raw: RawSpec | None) -> tuple[np.ndarray, VolumeMeta]:
    """MetaImage through SimpleITK (spacing, origin, direction, LOCAL and compressed data);
    a headerless .raw through ``raw`` (shape, dtype, byte order)."""
    mhd = path if path.suffix.lower() == ".mhd" else path.with_suffix(".mhd")
    if mhd.is_file():
        import SimpleITK as sitk

        _check_mhd(mhd)
        try:
            img = sitk.ReadImage(str(mhd))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else "unreadable"
            raise DataError(f"{mhd}: SimpleITK cannot read it ({first})") from None
        data = sitk.GetArrayFromImage(img)  # (z, y, x)
        spacing = tuple(float(v) for v in reversed(img.GetSpacing()))
        origin = tuple(float(v) for v in reversed(img.GetOrigin()))
        direction = tuple(float(v) for v in img.GetDirection())
        identity = tuple(float(v) for v in np.eye(img.GetDimension()).ravel())
        return data, VolumeMeta(
            "raw", spacing, origin, dtype=data.dtype.name,
            direction=None if direction == identity else direction,
        )  # fmt: skip
    if raw is None or raw.shape is None:
        raise DataError(
            f"{path}: no .mhd header beside it; give raw.shape (z, y, x), raw.dtype and "
            f"raw.byte_order in the config"
        )
    shape = tuple(raw.shape)
    dtype = np.dtype(raw.dtype).newbyteorder("<" if raw.byte_order == "little" else ">")
    _check_size(path, shape, dtype, "raw.shape/raw.dtype in the config")
    try:
        data = np.fromfile(path, dtype=dtype).reshape(shape)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check its permissions") from None
    return data, VolumeMeta("raw", (), (), dtype=dtype.name)


def _load_nifti(path: Path) -> tuple[np.ndarray, VolumeMeta]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        check_dtype(np.dtype(img.get_data_dtype()), path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except DataError:
        raise
    except Exception as e:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: not a readable NIfTI file ({e})") from None
    zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    return data, VolumeMeta(
        "nifti", zooms, affine=img.affine.tolist(), dtype=str(img.get_data_dtype())
    )


def save_volume(
    path: str | Path,
    data: np.ndarray,
    meta: VolumeMeta | None = None,
    fmt: str | None = None,
) -> Path:
    """Write ``data`` by the extension of ``path`` (.raw writes a .mhd beside it); atomic.

    ``fmt`` (raw | nifti | npy | dicom) overrides the extension. A DICOM series is written
    when ``fmt="dicom"`` or when ``path`` has no extension and ``meta.format`` is "dicom":
    a new folder ``path``, one file per slice (``ldm.data.dicom.save_dicom_series``); an existing
    folder is a UserError. Returns the path written (the .raw, or the series folder).
    """
    path = Path(path)
    if fmt is None:
        dicom = meta is not None and meta.format == "dicom" and not path.suffix
        fmt = "dicom" if dicom else volume_format(path)
    elif fmt not in FORMATS:
        raise UserError(f"{path}: unknown volume format {fmt!r} (one of {', '.join(FORMATS)})")
    data = np.asarray(data)
    meta = meta or VolumeMeta(fmt)
    if fmt == "dicom":
        from ldm.data.dicom import save_dicom_series

        return save_dicom_series(path, data, meta)
    if fmt == "npy":
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, data)
    elif fmt == "nifti" and meta.affine is None and meta.format in ("dicom", "raw") and (
        meta.origin or meta.direction is not None
    ):
        _save_nifti_from_itk(path, data, meta)  # scanner geometry (LPS) -> NIfTI (RAS)
    elif fmt == "nifti":
        import nibabel as nib

        affine = (
            np.asarray(meta.affine)
            if meta.affine is not None
            else np.diag(list(meta.spacing or (1.0,) * data.ndim) + [1.0])
        )
        img = nib.Nifti1Image(data, affine)
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
    else:
        path = _save_metaimage(path, data, meta)
    return path


def _itk_image(data: np.ndarray, meta: VolumeMeta, path: Path):
    """A SimpleITK image of a (z, y, x) array with the meta's spacing, origin and direction."""
    import SimpleITK as sitk

    arr = np.ascontiguousarray(data)
    if arr.dtype.str[1:] not in _DTYPE_TO_MET:
        raise UserError(f"{path}: dtype {arr.dtype} cannot be written as MetaImage or NIfTI")
    img = sitk.GetImageFromArray(arr.astype(arr.dtype.newbyteorder("=")))
    if meta.spacing:
        img.SetSpacing([float(v) for v in reversed(meta.spacing)])
    if meta.origin:
        img.SetOrigin([float(v) for v in reversed(meta.origin)])
    if meta.direction is not None:
        img.SetDirection([float(v) for v in meta.direction])
    return img


def _save_nifti_from_itk(path: Path, data: np.ndarray, meta: VolumeMeta) -> None:
    """NIfTI through SimpleITK, which turns the scanner's LPS geometry (DICOM, MetaImage) into
    the NIfTI affine (RAS), so a viewer overlays the output on the input; atomic."""
    import SimpleITK as sitk

    img = _itk_image(data, meta, path)
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("NiftiImageIO")
    with atomic_path(path) as tmp:
        writer.SetFileName(str(tmp))
        writer.Execute(img)


def _save_metaimage(path: Path, data: np.ndarray, meta: VolumeMeta) -> Path:
    """.mhd header + .raw data through SimpleITK (spacing, origin and direction kept).

    Both files are written into a temporary folder under their final names (the header names
    its data file), then renamed into place, data first: never a header without its data.
    """
    import SimpleITK as sitk

    raw_path, mhd_path = path.with_suffix(".raw"), path.with_suffix(".mhd")
    img = _itk_image(data, meta, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.stem}-", dir=path.parent))
    try:
        sitk.WriteImage(img, str(tmp / mhd_path.name), useCompression=False)
        for f in (tmp / raw_path.name, tmp / mhd_path.name):
            os.chmod(f, 0o666 & ~UMASK)
        os.replace(tmp / raw_path.name, raw_path)
        os.replace(tmp / mhd_path.name, mhd_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return raw_path
