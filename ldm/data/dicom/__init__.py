"""DICOM series in and out through SimpleITK (GDCM): slice order, spacing, origin, direction.

A folder holding one DICOM series is a volume (``ldm.data.io.load_volume`` reads it); a folder
with several needs one chosen by its SeriesInstanceUID, spelled ``folder@UID`` (e.g.
``scans/patient1@1.2.840.113619.2.55.3``) wherever a path is given -- ``--input``, a config,
``load_volume`` -- or passed as ``series_uid=`` to ``load_dicom_series``.

* ``series``: the series of a folder (``list_series``), the ``folder@UID`` spelling, headers;
* ``read``: ``load_dicom_series``, one series as a (z, y, x) array in real units, its slices
  checked first (one orientation, one size, no gaps);
* ``write``: ``save_dicom_series``, a volume as a new series (new UIDs) of the source's patient
  and study, into a new folder.
"""

from ldm.data.dicom.read import GAP_TOLERANCE, load_dicom_series
from ldm.data.dicom.series import (
    SERIES_SEP,
    SeriesInfo,
    is_series_path,
    list_series,
    series_name,
    split_series_path,
)
from ldm.data.dicom.write import SOURCE_TAGS, new_uid, save_dicom_series

__all__ = [
    "GAP_TOLERANCE",
    "SERIES_SEP",
    "SOURCE_TAGS",
    "SeriesInfo",
    "is_series_path",
    "list_series",
    "load_dicom_series",
    "new_uid",
    "save_dicom_series",
    "series_name",
    "split_series_path",
]
