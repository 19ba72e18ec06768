"""What the benchmark prints: one line per case (``describe``), then each target figure next to
its target, met or missed.

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


def _predict_seconds(rows: Rows) -> float:
    """predict_ldm on 128^3 with the default sampler and number of samples (predict_vs_bm4d
    reports it with or without BM4D)."""
    return _case(rows, "predict_vs_bm4d", size=128)["seconds"]


def _disk_ratio(rows: Rows) -> float:
    """The largest disk ratio of the dataset_scaling runs (ldm/tools/bench_dataset.py)."""
    ratios = [r["disk_ratio"] for r in rows if r["case"] == "dataset_scaling" and "error" not in r]
    if not ratios:
        raise KeyError("dataset_scaling")
    return max(ratios)


TARGETS = [
    Target("predict_ldm 128^3, default sampler and N", _predict_seconds, "<=", 15.0, "s"),
    Target("predict_ldm 96^3, MRI profile (configs/mri)",
           lambda r: _case(r, "predict_mri_profile")["seconds"], "<=", 15.0, "s"),
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
    Target("run_all --profile demo", lambda r: _case(r, "run_all_demo")["seconds"], "<=", 210.0,
           "s"),
    Target("dataset + latents disk / (source + latents)", _disk_ratio, "<=", 2.0, "x"),
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


def _samples(r: dict[str, Any]) -> str:
    n = r.get("num_samples", 1)
    return f"{n} sample{'' if n == 1 else 's'} per window"


def describe(name: str, r: dict[str, Any]) -> str:
    """One line of what case ``name`` measured (its result row ``r``), or its error."""
    if "error" in r:
        return f"error: {r['error']}"
    if name == "vae_train":
        return (
            f"{r['step_s']:.2f} s/step (batch {r['batch_pairs']} pairs of 32^3), "
            f"{r['voxels_per_s'] / 1e6:.2f} M voxels/s, {r['samples_per_s']:.1f} samples/s, "
            f"{r['precision']}"
        )
    if name == "unet_train":
        return (
            f"{r['step_s']:.3f} s/step (batch {r['batch']} x 8^3 latents), "
            f"{r['samples_per_s']:.1f} samples/s, {r['precision']}"
        )
    if name in ("predict_128", "predict_mri_profile"):
        return (f"{r.get('profile', 'default')} configs: {r['seconds']:.1f} s for "
                f"{r['size']}^3, {r['ddim_steps']} DDIM steps, "
                f"{_samples(r)}, window {r['window']}")  # fmt: skip
    if name == "sliding_window":
        mvox = r["voxels_per_s"] / 1e6
        return f"{r['size']}^3 first stage (restorer): {r['seconds']:.2f} s ({mvox:.2f} M vox/s)"
    if name == "sampler_quality":
        runs = ", ".join(f"{x['sampler']} {x['steps']}: {x['psnr']:.2f} dB {x['seconds']:.0f} s"
                         for x in r["runs"])  # fmt: skip
        return f"{r['test_case']} (baseline {r['baseline_psnr']:.2f} dB): {runs}"
    if name == "window_quality":
        runs = ", ".join(f"{x['window'][0]}^3 overlap {x['overlap']}: {x['psnr']:.2f} dB "
                         f"{x['seconds']:.1f} s" for x in r["runs"])  # fmt: skip
        return f"{len(r['cases'])} test cases, DDIM {r['steps']}: {runs}"
    if name == "quality":
        return r["summary"]
    if name == "particles":
        return (
            f"{r['num_particles']} particles x 1000 steps, 512x384, {r['frames']:.0f} frames + "
            f"GIF on {r['device']}: {r['total_s']:.2f} s total ({r['cpu_s']:.1f} s CPU), "
            f"{r['ms_per_step']:.2f} ms/step, {r['ms_per_frame']:.2f} ms/frame, "
            f"GIF {r['gif_s']:.2f} s"
        )
    if name == "predict_vs_bm4d":
        line = (f"predict_ldm {r['size']}^3, {r['ddim_steps']} DDIM steps, {_samples(r)}: "
                f"{r['seconds']:.1f} s; ")  # fmt: skip
        if "bm4d_ratio" not in r:
            return line + f"BM4D skipped: {r.get('bm4d_skipped', 'not run')}"
        return line + (
            f"BM4D {r['bm4d_size']}^3 {r['bm4d_measured_s']:.1f} s -> {r['size']}^3 "
            f"~{r['bm4d_s']:.0f} s: {r['bm4d_ratio']:.1f}x"
        )
    if name in ("vae_vs_monai", "unet_vs_monai"):
        return (
            f"ours {r['ours_s']:.3f} s/step, MONAI {r['monai_s']:.3f} s/step "
            f"({r['speedup']:.2f}x, reps {r['speedup_range'][0]:.2f}-"
            f"{r['speedup_range'][1]:.2f}x, {r['precision']}); "
            f"train memory ours {r['ours_train_mb']:.0f} MB, "
            f"MONAI {r['monai_train_mb']:.0f} MB (kept for backward {r['ours_saved_mb']:.0f} / "
            f"{r['monai_saved_mb']:.0f} MB); params {r['ours_params']:,} / "
            f"{r['monai_params']:,}"
        )
    if name == "dataset_scaling":
        from ldm.tools.bench_dataset import describe as describe_dataset

        return describe_dataset(r)
    if name == "run_all_demo":
        return f"{r['seconds']:.0f} s (1-min load average at the end {r['load_avg_1min']:.1f})"
    return str(r)
