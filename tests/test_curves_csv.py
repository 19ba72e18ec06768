"""curves.png of training runs (ldm.evaluate.curves) and metrics.csv of the score table
(ldm.evaluate.baselines)."""

from __future__ import annotations

import csv
import json
import logging
import math

import pytest
from matplotlib.axes import Axes
from PIL import Image

import ldm.evaluate.baselines as baselines
import ldm.evaluate.curves as curves
from ldm.core.config import load_config
from ldm.core.errors import DataError
from ldm.evaluate.baselines import LABELS, SCORES, SHARPNESS, mean_scores, save_metrics_csv
from ldm.evaluate.curves import best_step, plot_training_curves, read_rows, running_mean, val_keys
from ldm.phases.evaluate_psnr import EvaluateConfig, evaluate_psnr
from ldm.train.run_dir import STAGING, Interrupted
from tests.helpers.tiny_train import run

# a VAE run: psnr is the score; the best score (31.0) comes twice: best.pt is the first (step 20)
ROWS = [
    {"step": 5, "loss": 0.9, "lr": 1e-3, "grad_norm": 1.0, "time": 0.1},
    {"step": 10, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.0, "time": 0.2},
    {"step": 10, "val": {"psnr": 25.0, "baseline_psnr": 20.0, "hr_psnr": 33.0, "score": 25.0}},
    {"step": 15, "loss": 0.4, "lr": 1e-3, "grad_norm": 1.0, "time": 0.3},
    {"step": 20, "loss": 0.3, "lr": 1e-3, "grad_norm": 1.0, "time": 0.4},
    {"step": 20, "val": {"psnr": 31.0, "baseline_psnr": 20.0, "hr_psnr": 34.0, "score": 31.0}},
    {"step": 25, "loss": 0.35, "lr": 1e-3, "grad_norm": 1.0, "time": 0.5},
    {"step": 30, "val": {"psnr": 31.0, "baseline_psnr": 20.0, "hr_psnr": 35.0, "score": 31.0}},
    {
        "step": 35,
        "val": {"psnr": math.nan, "baseline_psnr": 20.0, "hr_psnr": 35.0, "score": math.nan},
    },  # fmt: skip
]


def _write_rows(path, rows, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > 0 and im.size[1] > 0
        return im.size


@pytest.fixture
def vlines(monkeypatch):
    """The x of every vertical line drawn (the best-step marks)."""
    xs: list[float] = []
    real = Axes.axvline

    def spy(self, x=0, *args, **kwargs):
        xs.append(x)
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(Axes, "axvline", spy)
    return xs


def test_best_step_is_the_first_highest_score_as_training_picks_best_pt(tmp_path):
    assert best_step(ROWS) == 20  # 31.0 again at step 30 is no improvement; NaN never wins
    rising = [{"step": 3, "val": {"score": -2.0}}, {"step": 6, "val": {"score": -1.0}}]
    assert best_step(rising) == 6
    assert best_step(ROWS[:2]) is None  # no validation yet
    assert best_step([{"step": 4, "val": {"mse": 1.0}}]) is None  # no score
    # score repeats psnr (VAE) or -latent_mse (diffusion): no panel of its own
    assert val_keys(ROWS) == ["psnr", "baseline_psnr", "hr_psnr"]
    diffusion = [{"step": s, "val": {"latent_mse": m, "psnr": 20.0 + s, "score": -m}}
                 for s, m in ((5, 0.5), (10, 0.25))]  # fmt: skip
    assert val_keys(diffusion) == ["latent_mse", "psnr"]
    other = [{"step": 5, "val": {"mse": 0.5, "score": 2.0}}]
    assert val_keys(other) == ["mse", "score"]  # a score of its own is drawn
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, ROWS, tail='{"step": 40, "loss"')  # a torn last line (a kill)
    rows = read_rows(path)
    assert len(rows) == len(ROWS) and best_step(rows) == 20


def test_running_mean_is_trailing():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([4.0], 5).tolist() == [4.0]


def test_curves_png_marks_the_best_step_in_every_panel(tmp_path, vlines):
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, ROWS)
    out = plot_training_curves(path, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    width, height = _png(out)
    assert width > 600 and height > 400  # loss + 3 validation panels
    assert vlines == [20] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


@pytest.mark.parametrize(
    "rows",
    [
        [],  # empty: a picture that says so
        [ROWS[0]],  # one loss row
        [ROWS[2]],  # one validation row
        [{"step": 2, "val": {"mse": 1.0}}],  # a validation without a score
    ],
)
def test_curves_of_an_empty_or_one_row_file(tmp_path, vlines, rows):
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, rows)
    _png(plot_training_curves(path, tmp_path / "curves.png"))
    assert vlines == ([10, 10, 10, 10] if rows == [ROWS[2]] else [])


def test_empty_file_says_no_data(tmp_path, monkeypatch):
    texts: list[str] = []
    real = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **k: texts.append(s)
                        or real(self, x, y, s, *a, **k))  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("")
    _png(plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png"))
    assert texts == ["no data yet: metrics.jsonl has no rows"]
    with pytest.raises(DataError, match="missing.jsonl: not found"):
        plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "c.png")


def test_training_writes_curves_png_beside_metrics(tmp_path, vlines):
    run(tmp_path, steps=10)  # validations at 5 and 10
    rows = read_rows(tmp_path / "metrics.jsonl")
    _png(tmp_path / "curves.png")
    assert best_step(rows) in (5, 10) and vlines == [best_step(rows)] * 2  # loss + mse panels
    assert not list(tmp_path.glob(".tmp-*"))

    # --overwrite: the new run's curves land in the run folder once it committed, not staged
    before = (tmp_path / "curves.png").read_bytes()
    run(tmp_path, steps=6, overwrite=True)
    assert not (tmp_path / STAGING).exists()
    assert (tmp_path / "curves.png").read_bytes() != before
    assert max(r["step"] for r in read_rows(tmp_path / "metrics.jsonl")) == 6


def test_interrupted_training_draws_curves_with_its_last_pt(tmp_path):
    with pytest.raises(Interrupted, match="interrupted at step 7"):
        run(tmp_path, steps=20, interrupt_at=7)
    assert (tmp_path / "last.pt").is_file()
    _png(tmp_path / "curves.png")
    # an --overwrite run stopped before its first save is dropped: the old picture stays
    before = (tmp_path / "curves.png").read_bytes()
    with pytest.raises(Interrupted, match="before this --overwrite run's first checkpoint"):
        run(tmp_path, steps=20, overwrite=True, interrupt_at=3)
    assert (tmp_path / "curves.png").read_bytes() == before


def test_a_failure_to_draw_is_only_a_warning(tmp_path, monkeypatch, caplog):
    def broken(metrics, out):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(curves, "plot_training_curves", broken)
    with caplog.at_level(logging.WARNING, logger="ldm.train.training"):
        run(tmp_path, steps=5)
    assert (tmp_path / "last.pt").is_file() and not (tmp_path / "curves.png").exists()
    assert "curves.png not drawn (RuntimeError: no fonts)" in caplog.text


def test_training_phases_write_curves_png(tiny_pipeline):
    for run_dir in (tiny_pipeline.vae.parent, tiny_pipeline.diffusion.parent):
        assert (run_dir / "metrics.jsonl").is_file()
        _png(run_dir / "curves.png")


def _scores(p: float, s: float, b: float = 0.0) -> dict[str, float]:
    return {"psnr": p, "ssim": s, "bias": b, "bias_pct": 10 * b, "contrast": 1.0 + b}


def _read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_save_metrics_csv_round_trips(tmp_path):
    per_case = {
        "a": {"gaussian": _scores(30.123456789, 0.9, 0.1), "baseline": _scores(20.0, 0.5)},
        "b": {"gaussian": _scores(26.0, 0.7, 0.3), "baseline": _scores(22.0, 0.7)},
    }
    per_case["b"]["ldm"] = {"psnr": 27.0, "ssim": 0.75, "seconds": 1.5}  # other keys, fewer
    path = save_metrics_csv(per_case, tmp_path / "out" / "metrics.csv")
    assert path == tmp_path / "out" / "metrics.csv"
    fields, rows = _read_csv(path)
    assert fields == ["method", "case", *SCORES, "seconds", "label"]
    assert [(r["case"], r["method"]) for r in rows] == [
        ("a", "baseline"), ("a", "gaussian"),  # in table order
        ("b", "baseline"), ("b", "gaussian"), ("b", "ldm"),
        ("mean", "baseline"), ("mean", "gaussian"),  # mean over the methods every case has
    ]  # fmt: skip
    mean = mean_scores(per_case)
    want = {**{(c, m): s for c, ms in per_case.items() for m, s in ms.items()},
            **{("mean", m): s for m, s in mean.items()}}  # fmt: skip
    for r in rows:
        scores = want[r["case"], r["method"]]
        assert r["label"] == LABELS[r["method"]]
        for k in (*SCORES, "seconds"):
            assert (float(r[k]) == scores[k]) if k in scores else (r[k] == ""), (r, k)
    assert rows[1]["psnr"] == "30.123456789"  # full precision
    assert not list((tmp_path / "out").glob(".tmp-*"))

    fields, rows = _read_csv(save_metrics_csv({}, tmp_path / "empty.csv"))
    assert fields == ["method", "case", *SCORES, "label"] and rows == []


def test_evaluate_psnr_writes_metrics_csv(tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(baselines, "bm4d_available", lambda: False)
    out = tmp_path / "res"
    cfg = load_config(EvaluateConfig, None, [
        f"data_dir={tiny_pipeline.data_dir}", f"vae_checkpoint={tiny_pipeline.vae}",
        f"out_dir={out}", "device=cpu", "tune.max_patches=2", "tune.gaussian_sigmas=[0.0, 0.5]",
        "tune.heat_steps=[0, 2]", "tune.tv_weights=[0.05]", "tune.nlm_hs=[0.05]",
        "tune.filter_max_patches=1",
    ])  # fmt: skip
    result = evaluate_psnr(cfg)
    assert out / "metrics.csv" in result.outputs and "metrics.csv" in result.text
    metrics = json.loads((out / "metrics.json").read_text())
    fields, rows = _read_csv(out / "metrics.csv")
    assert fields == ["method", "case", *SCORES, *SHARPNESS, "label"]  # evaluate adds sharpness
    cases = list(metrics["cases"])
    methods = list(metrics["mean"])
    assert [(r["case"], r["method"]) for r in rows] == [
        *((c, m) for c in cases for m in methods),
        *(("mean", m) for m in methods),
    ]
    tables = {**metrics["cases"], "mean": metrics["mean"]}
    for r in rows:
        want = tables[r["case"]][r["method"]]
        assert [float(r[k]) for k in (*SCORES, *SHARPNESS)] == [
            want[k] for k in (*SCORES, *SHARPNESS)]  # fmt: skip
        assert r["label"] == LABELS[r["method"]]
    assert {"restorer", "oracle"} <= set(methods)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
