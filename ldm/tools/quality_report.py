"""The quality bench's report: per-dataset tables of the scored rows, and merging the reports of
several runs (one process per dataset) into one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ldm.core.files import save_json
from ldm.tools.quality_scoring import ldm_label

# (header, figure, format) of the per-dataset table
COLUMNS = (("PSNR", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.4f}"), ("ESR", "esr", "{:.3f}"),
           ("HFER", "hfer", "{:.3f}"), ("FSC hi", "fsc", "{:.3f}"),
           ("bias %", "bias_pct", "{:+.2f}"), ("contrast %", "contrast_pct", "{:+.2f}"),
           ("predict s", "seconds", "{:.1f}"))  # fmt: skip
# rows of the compact generalisation table (PSNR), those a result has
GENERAL_ROWS = ("Baseline", "Gaussian (tuned)", "NLM (tuned)", "BM4D (tuned)", "Restorer",
                "Oracle", ldm_label(1), ldm_label(8))  # fmt: skip
TABLE_NOTE = (
    "ESR = edge gradient / HR's on HR's top 5 % edges, HFER = spectral energy / HR's above 0.25 "
    "cycles/voxel (both ideal 1), FSC hi = Fourier shell correlation with HR there; bias and "
    "contrast - 1 in % of the HR range; predict s = wall seconds per volume (w rows: the mean "
    "of 8's); var/err = mean std^2 / MSE of the mean of 8 (calibrated: 8/9 = 0.89, std with "
    "ddof 1), AUSE (0 = std ranks the errors perfectly; random order for scale); S = ||D(z_HR) "
    "- D(z_sample)||^2 / ||HR - mu||^2 (< 1: the latent cannot fix much of the restorer's error)"
)


def _cell(scores: dict[str, float], key: str, fmt: str) -> str:
    v = scores.get(key)
    return "-" if v is None or not np.isfinite(v) else fmt.format(v)


def _aligned(rows: list[list[str]], left: int) -> list[str]:
    """Rows of cells as aligned text, the first ``left`` columns left-aligned, a rule under the
    header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]  # fmt: skip
    lines.insert(1, "-" * max(len(x) for x in lines))
    return lines


def _variant_notes(variant: str, r: dict[str, Any]) -> str:
    """Training, calibration and latent sensitivity of one result, one line."""
    parts = []
    if r.get("steps"):
        steps = ", ".join(f"{k} {v}" for k, v in r["steps"].items())
        parts.append(f"train {r['train_cpu_minutes']:.1f} CPU min ({r['train_minutes']:.1f} "
                     f"wall), steps {steps}")  # fmt: skip
    if r.get("params"):
        parts.append("params " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in r["params"].items()))
    test = r["scores"].get("test", {})
    for label, s in test.items():
        if "var_err_ratio" in s:
            parts.append(f"{label}: var/err {s['var_err_ratio']:.3f}, AUSE {s['ause']:.3f} "
                         f"(random {s['ause_random']:.3f})")  # fmt: skip
        if "latent_sensitivity" in s:
            parts.append(f"latent sensitivity S {s['latent_sensitivity']:.3f} ({label})")
    n = r.get("num_test", "?")
    return f"{variant} ({n} test volume{'' if n == 1 else 's'}): " + "; ".join(parts)


def format_table(report: dict[str, Any]) -> str:
    """One table per dataset: the test-set rows of every variant (PSNR, SSIM, ESR, HFER, FSC,
    bias, contrast, predict seconds), a line per variant (training, calibration of the mean of
    8, latent sensitivity S), then the PSNR of the main rows in each generalisation setting."""
    by_dataset: dict[str, list[tuple[str, dict]]] = {}
    for key, r in report["results"].items():
        dataset, _, variant = key.partition("/")
        by_dataset.setdefault(dataset, []).append((variant or dataset, r))
    lines: list[str] = []
    for dataset, entries in by_dataset.items():
        rows = [["variant", "method", *(h for h, _, _ in COLUMNS)]]
        for variant, r in entries:
            for i, (m, s) in enumerate(r["scores"].get("test", {}).items()):
                rows.append([variant if i == 0 else "", m,
                             *(_cell(s, k, f) for _, k, f in COLUMNS)])  # fmt: skip
        lines += [f"== {dataset} ==", *_aligned(rows, 2)]
        lines += [_variant_notes(v, r) for v, r in entries]
        general = [(v, st, sc) for v, r in entries for st, sc in r["scores"].items()
                   if st != "test"]  # fmt: skip
        if general:
            cols = [m for m in GENERAL_ROWS if any(m in sc for _, _, sc in general)]
            grows = [["variant", "setting", *cols]]
            for v, st, sc in general:
                grows.append([v, st, *(_cell(sc.get(m, {}), "psnr", "{:.2f}") for m in cols)])
            lines += ["generalisation PSNR (dB):", *_aligned(grows, 2)]
        lines.append("")
    return "\n".join(lines + [TABLE_NOTE])


summary_table = format_table  # --combine and --profile-model print the same tables


def combine(paths: list[Path], out: Path) -> dict[str, Any]:
    """Merge per-dataset reports (one process per dataset) into ``out``."""
    report: dict[str, Any] = {"results": {}}
    for p in paths:
        part = json.loads(Path(p).read_text())
        report.update({k: v for k, v in part.items() if k != "results"})
        report["results"].update(part["results"])
    save_json(report, out)
    return report
