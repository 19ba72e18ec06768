"""The DICOM series of a folder: finding them, the ``folder@UID`` spelling that chooses one, and
reading a slice's header.

``list_series`` lists the series SimpleITK's GDCM finds in a folder (SeriesInstanceUID,
SeriesDescription, files in slice order). A path ``folder@UID`` names one series of a folder that
holds several (``split_series_path``; a path that exists as written is never split). The header
helpers here are shared by reading (``ldm.data.dicom.read``) and writing
(``ldm.data.dicom.write``, which copies the source series' tags); ``_unreadable`` turns a file
GDCM cannot read into a ``DataError`` that says why (compressed pixel data, or corrupt).
"""

from __future__ import annotations

import contextlib
import locale
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ldm.core.errors import DataError

SERIES_SEP = "@"  # folder@SeriesInstanceUID selects one series of several
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
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
def keep_locale() -> Iterator[None]:
    """Put back the process locale after SimpleITK/GDCM work: GDCM leaves LC_CTYPE at "C"
    after reading or writing some tags, and Python's default text encoding (subprocess output,
    open() without encoding) would then be ASCII for the rest of the process."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ITK's warnings (no series found, non-uniform sampling) on stderr: the checks
    here turn the problems they describe into DataErrors. The locale is kept (keep_locale)."""
    import SimpleITK as sitk

    was = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with keep_locale():
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
