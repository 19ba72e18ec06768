"""curves.png of a training run: the loss and every validation score against step.

Drawn from the run's metrics.jsonl (written by ``ldm.train.training``): rows with a ``loss`` are
logged training steps, rows with a ``val`` dict are validations. The best step, the validation
with the highest ``score`` (the first one on ties, as training picks best.pt), is marked in every
panel. Uses matplotlib's Agg canvas directly: no pyplot state, no display needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ldm.core.errors import DataError
from ldm.core.files import atomic_path

SMOOTH_FRACTION = 0.05  # running-mean window: this share of the loss rows, at least ...
SMOOTH_MIN, SMOOTH_MAX = 3, 50  # ... and at most this many rows
BEST_COLOR = "tab:red"


def read_rows(metrics_jsonl: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``metrics_jsonl``, one a line; blank or torn lines (a kill) skipped."""
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise DataError(f"{path}: not found; curves are drawn from a training run's metrics.jsonl")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and _is_number(row.get("step")):
            rows.append(row)
    return rows


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def loss_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(steps, losses) of the rows with a numeric ``loss``."""
    pairs = [(r["step"], r["loss"]) for r in rows if _is_number(r.get("loss"))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def val_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with a ``val`` dict."""
    return [r for r in rows if isinstance(r.get("val"), dict)]


def best_step(rows: Sequence[dict[str, Any]]) -> int | None:
    """Step of the validation with the highest ``score``, the first on ties (training saves
    best.pt only when the score rises strictly); None without a numeric score."""
    found = _best(rows)
    return None if found is None else found[0]


def _best(rows: Sequence[dict[str, Any]]) -> tuple[int, float] | None:
    best: tuple[int, float] | None = None
    for r in val_rows(rows):
        score = r["val"].get("score")
        # strictly higher, from -inf: NaN is never best, as in training._validate
        if _is_number(score) and score > (-math.inf if best is None else best[1]):
            best = (int(r["step"]), score)
    return best


def val_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The numeric validation keys, in first-seen order. ``score`` is left out when it repeats
    another key (VAE: psnr) or its negative (diffusion: -latent_mse)."""
    vals = [r["val"] for r in val_rows(rows)]
    keys: list[str] = []
    for v in vals:
        keys += [k for k, x in v.items() if _is_number(x) and k not in keys]
    scored = [v for v in vals if _is_number(v.get("score"))]
    if scored and any(_repeats(scored, k) for k in keys if k != "score"):
        keys.remove("score")
    return keys


def _repeats(scored: list[dict[str, Any]], key: str) -> bool:
    """Whether every validation's ``score`` is its ``key`` or minus it (NaN as NaN)."""
    if not all(_is_number(v.get(key)) for v in scored):
        return False
    return any(all(_same(v[key], sign * v["score"]) for v in scored) for sign in (1, -1))


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def running_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    x = np.asarray(values, dtype=np.float64)
    window = max(1, int(window))
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def plot_training_curves(metrics_jsonl: Path, out_png: Path) -> Path:
    """Draw ``out_png`` (atomically) from ``metrics_jsonl``: a loss panel (raw faint, running
    mean) and one panel per numeric validation key, the best step marked in each. A file
    without rows gives a picture that says so; a missing file is a DataError."""
    rows = read_rows(metrics_jsonl)
    steps, losses = loss_rows(rows)
    vals = val_rows(rows)
    keys = val_keys(rows)
    found = _best(rows)
    best = None if found is None else found[0]
    run_name = Path(metrics_jsonl).resolve().parent.name

    panels = 1 + len(keys)
    ncols = 1 if panels <= 2 else 2
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(6.4 * ncols, 2.9 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_axis_off()

    if not rows:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, f"no data yet: {Path(metrics_jsonl).name} has no rows",
                     ha="center", va="center", fontsize=12)  # fmt: skip
        fig.suptitle(f"{run_name}: training curves")
        return _save(fig, out_png)

    all_steps = [r["step"] for r in rows]
    pad = 0.02 * (max(all_steps) - min(all_steps))
    xlim = (min(all_steps) - pad, max(all_steps) + pad)

    ax = axes[0]
    if losses:
        window = min(len(losses), SMOOTH_MAX,
                     max(SMOOTH_MIN, round(SMOOTH_FRACTION * len(losses))))  # fmt: skip
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
        ax.plot(steps, running_mean(losses, window), color="tab:blue", lw=1.6,
                marker="o" if len(losses) == 1 else None,
                label=f"running mean of {window}")  # fmt: skip
        if min(losses) > 0 and max(losses) / min(losses) > 20:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no loss rows yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("training loss", fontsize=10)

    for ax, key in zip(axes[1:], keys):
        pts = [(r["step"], r["val"][key]) for r in vals if _is_number(r["val"].get(key))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:green", ms=3, lw=1.2)
        hit = [y for x, y in pts if x == best]
        if hit:
            ax.plot([best], hit[:1], "o", color=BEST_COLOR, ms=6, zorder=3)
            right = best > (xlim[0] + xlim[1]) / 2  # the label inside the panel
            ax.annotate(f"{hit[0]:.4g}", (best, hit[0]), textcoords="offset points",
                        xytext=(-4 if right else 4, 4), ha="right" if right else "left",
                        fontsize=8, color=BEST_COLOR)  # fmt: skip
        title = "score (best.pt: higher is better)" if key == "score" else key
        ax.set_title(f"validation {title}", fontsize=10)

    for ax in axes[:panels]:
        if best is not None:
            ax.axvline(best, color=BEST_COLOR, ls="--", lw=1.0, label=f"best step {best}")
        if xlim[1] > xlim[0]:
            ax.set_xlim(*xlim)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    if losses or best is not None:
        axes[0].legend(fontsize=8, loc="best")

    head = f"best step {best} (score {found[1]:.4g})" if found else "no validation score yet"
    fig.suptitle(f"{run_name}: training curves, {head}", fontsize=11)
    return _save(fig, out_png)


def _save(fig: Figure, out_png: Path) -> Path:
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(out_png)
