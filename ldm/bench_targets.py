"""The speed targets of the benchmark: each figure next to its target, met or missed.

A target is (figure, how to read it from the benchmark rows, comparison, limit, unit). A figure
whose case did not run (or failed) is listed as "not run" and counts as neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Target:
    figure: str
    read: Callable[[Rows], float | None]
    op: str  # "<=" | ">="
    limit: float
    unit: str

    def check(self, rows: Rows) -> dict[str, Any]:
        try:
            value = self.read(rows)
        except (KeyError, TypeError, ZeroDivisionError, IndexError):
            value = None
        met = None if value is None else (value <= self.limit if self.op == "<=" else
                                          value >= self.limit)  # fmt: skip
        return {"figure": self.figure, "value": value, "target": f"{self.op} {self.limit:g}",
                "unit": self.unit, "met": met}  # fmt: skip


def _case(rows: Rows, name: str, **match: Any) -> dict[str, Any]:
    """The first row of case ``name`` whose keys equal ``match`` and that did not fail."""
    for r in rows:
        if r["case"] == name and "error" not in r and all(r.get(k) == v for k, v in match.items()):
            return r
    raise KeyError(name)


def _quality_gap(rows: Rows) -> float:
    """PSNR of the default step count minus PSNR of DDIM 50 on the demo checkpoints (dB)."""
    r = _case(rows, "sampler_quality")
    by_steps = {x["steps"]: x["psnr"] for x in r["runs"] if x["sampler"] == "ddim"}
    return by_steps[r["default_steps"]] - by_steps[50]


TARGETS = [
    Target("predict_ldm 128^3, default sampler", lambda r: _case(r, "predict_vs_bm4d")["seconds"],
           "<=", 10.0, "s"),
    Target("BM4D time / predict_ldm time (128^3)",
           lambda r: _case(r, "predict_vs_bm4d")["bm4d_ratio"], ">=", 10.0, "x"),
    Target("default DDIM steps: PSNR minus DDIM 50 (demo)", _quality_gap, ">=", -0.05, "dB"),
    Target("particles 50k: time per step",
           lambda r: _case(r, "particles", num_particles=50_000)["ms_per_step"], "<=", 1.0, "ms"),
    Target("particles 50k: time per rendered frame",
           lambda r: _case(r, "particles", num_particles=50_000)["ms_per_frame"], "<=", 2.5, "ms"),
    Target("particles 50k: 1000 steps + GIF",
           lambda r: _case(r, "particles", num_particles=50_000)["total_s"], "<=", 2.0, "s"),
    Target("VAE train step: MONAI time / ours", lambda r: _case(r, "vae_vs_monai")["speedup"],
           ">=", 1.2, "x"),
    Target("VAE train memory: ours / MONAI",
           lambda r: _case(r, "vae_vs_monai")["ours_train_mb"]
           / _case(r, "vae_vs_monai")["monai_train_mb"], "<=", 1.0, "x"),
    Target("UNet train step: MONAI time / ours", lambda r: _case(r, "unet_vs_monai")["speedup"],
           ">=", 1.2, "x"),
    Target("UNet train memory: ours / MONAI",
           lambda r: _case(r, "unet_vs_monai")["ours_train_mb"]
           / _case(r, "unet_vs_monai")["monai_train_mb"], "<=", 1.0, "x"),
    Target("run_all --profile demo", lambda r: _case(r, "run_all_demo")["seconds"], "<=", 180.0,
           "s"),
]  # fmt: skip


def check_targets(rows: Rows) -> list[dict[str, Any]]:
    return [t.check(rows) for t in TARGETS]


def format_targets(checks: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'figure':<48}{'value':>10}  {'target':<10} status"]
    for c in checks:
        value = "-" if c["value"] is None else f"{c['value']:.3g} {c['unit']}"
        status = {None: "not run", True: "met", False: "MISSED"}[c["met"]]
        lines.append(f"{c['figure']:<48}{value:>10}  {c['target'] + ' ' + c['unit']:<10} {status}")
    return lines
