"""Small DICOM series made with SimpleITK's writer (no download), for the DICOM tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ldm.data.dicom import new_uid

SHAPE = (12, 20, 16)  # (z, y, x): 12 slices of 20 rows x 16 columns
SPACING = (0.8, 0.9, 2.5)  # SimpleITK order (x, y, z)
ORIGIN = (10.0, -20.0, 5.0)
SLOPE, INTERCEPT = 0.5, -100.0
PATIENT = {
    "0010|0010": "Doe^Jane",
    "0010|0020": "PID-0042",
    "0010|0030": "19700101",
    "0010|0040": "F",
    "0020|000d": "1.2.826.0.1.3680043.8.498.1",
    "0020|0010": "S77",
    "0008|0020": "20240131",
    "0008|0030": "101500",
    "0008|0050": "ACC123",
    "0008|0060": "CT",
    "0020|0052": "1.2.826.0.1.3680043.8.498.2",
}


def rotation() -> np.ndarray:
    a, b = 0.3, 0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


DIRECTION = tuple(rotation().ravel())


def stored_values(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-500, 1500, SHAPE).astype(np.int16)


def write_series(
    folder: Path,
    stored: np.ndarray,
    uid: str | None = None,
    description: str = "source CT",
    iop: dict[int, str] | None = None,
    compressed: tuple[int, ...] = (),
) -> str:
    """int16 ``stored`` values as a series with slope 0.5 / intercept -100 and the geometry
    above, the way SimpleITK's "Dicom Series From Array" example writes one; ``iop`` replaces
    the orientation of some slices, ``compressed`` slices are written as JPEG 2000."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or new_uid()
    img = sitk.GetImageFromArray(stored.astype(np.float64) * SLOPE + INTERCEPT)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    d = DIRECTION
    tags = {**PATIENT, "0020|000e": uid, "0008|103e": description, "0020|0011": "3",
            "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|1053": str(SLOPE), "0028|1052": str(INTERCEPT), "0028|0100": "16",
            "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"}  # fmt: skip
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(stored.shape[0]):
        one = img[:, :, z]
        for k, v in tags.items():
            one.SetMetaData(k, v)
        if iop and z in iop:
            one.SetMetaData("0020|0037", iop[z])
        ipp = img.TransformIndexToPhysicalPoint((0, 0, z))
        one.SetMetaData("0020|0032", "\\".join(str(v) for v in ipp))
        one.SetMetaData("0020|0013", str(z + 1))
        one.SetMetaData("0008|0018", new_uid())
        writer.SetFileName(str(folder / f"{uid[-6:]}_{z:03d}.dcm"))
        writer.SetUseCompression(z in compressed)
        writer.Execute(one)
    return uid


def read_series(folder: Path) -> tuple[sitk.Image, list[str]]:
    (uid,) = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute(), files


def tags_of(file: str) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.ReadImageInformation()
    return {k: reader.GetMetaData(k).rstrip(" \x00") for k in reader.GetMetaDataKeys()}
