"""Scores in metrics.json: JSON has no infinity or NaN, so non-finite scores are written as null
with a note listing them, and read back to floats."""

from __future__ import annotations

from typing import Any

import numpy as np

NON_FINITE_NOTE = (
    "null marks a score that is not a finite number (JSON has no infinity or NaN); 'values' "
    "lists each with its path and value, e.g. psnr inf when an output equals the HR exactly "
    "(MSE 0); metrics.csv writes the same scores as inf / nan"
)


def finite_json(obj: Any) -> Any:
    """``obj`` ready for a metrics.json: every non-finite float (PSNR is +inf when an output
    equals the HR, contrast NaN for a constant output) becomes null, and a top-level dict gets
    ``"non_finite": {"note": NON_FINITE_NOTE, "values": [{"path": [...], "value": "inf"}]}``.

    json.dumps would write bare ``Infinity`` / ``NaN``, which strict JSON readers (jq,
    JavaScript, most other languages) reject. metrics.csv keeps writing ``inf`` / ``nan``, which
    spreadsheets and pandas read as numbers; the table prints them as ``inf``.
    :func:`restore_non_finite` turns such a file back into the scores.
    """
    found: list[dict[str, Any]] = []

    def walk(x: Any, path: list) -> Any:
        if isinstance(x, (float, np.floating)) and not np.isfinite(x):
            found.append({"path": path, "value": str(float(x))})  # 'inf', '-inf' or 'nan'
            return None
        if isinstance(x, dict):
            return {k: walk(v, [*path, str(k)]) for k, v in x.items()}  # JSON keys
        if isinstance(x, (list, tuple)):
            return [walk(v, [*path, i]) for i, v in enumerate(x)]
        return x

    out = walk(obj, [])
    if found and isinstance(out, dict):
        out["non_finite"] = {"note": NON_FINITE_NOTE, "values": found}
    return out


def restore_non_finite(data: Any) -> Any:
    """The scores of a metrics.json written through :func:`finite_json` (inf back for null)."""
    listed = data.pop("non_finite", None) if isinstance(data, dict) else None
    for item in (listed or {}).get("values", []):
        *head, last = item["path"]
        node = data
        for key in head:
            node = node[key]
        node[last] = float(item["value"])
    return data
