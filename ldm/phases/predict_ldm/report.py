"""Pictures and the printed table of predict_ldm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.core.config import save_config
from ldm.core.files import save_json
from ldm.data.dataset import VolumeCase
from ldm.diffusion.latent_diffusion import LatentDiffusion, SamplerConfig
from ldm.evaluate.baselines import (
    TABLE_NOTE,
    format_table,
    mean_scores,
    save_metrics_csv,
    tuned_text,
)
from ldm.evaluate.scores_json import finite_json
from ldm.evaluate.viz import (
    save_comparison_png,
    save_gif,
    save_views_png,
    shared_window,
    to_uint8,
    views,
)


def case_pictures(
    folder: Path, case: VolumeCase, outputs: dict[str, np.ndarray], std: np.ndarray | None
) -> None:
    """1_input_LR, 2_target_HR, 3_output_LDM (the mean; one shared window), 4_uncertainty,
    0_comparison: LR | restorer | one sample | mean | HR | std (what HR and the restorer exist
    for)."""
    lr = case.to_original(case.lr)
    mean = outputs["LDM mean"]
    vols = {"LR": lr, "LDM": mean}
    if case.hr is not None:
        vols["HR"] = case.to_original(case.hr)
    window = shared_window(list(vols.values()))
    save_views_png(folder / "1_input_LR.png", lr, f"{case.name}: input LR", window)
    if case.hr is not None:
        save_views_png(folder / "2_target_HR.png", vols["HR"], f"{case.name}: target HR", window)
    save_views_png(folder / "3_output_LDM.png", mean, f"{case.name}: LDM output (mean)", window)
    top = None
    if std is not None:
        top = float(np.percentile(std, 99.8)) or 1.0
        title = f"{case.name}: per-voxel std over samples (uncertainty)"
        save_views_png(folder / "4_uncertainty.png", std, title, (0.0, top), cmap="magma")
    rows = {"LR": lr, **{k: v for k, v in outputs.items() if k != "Baseline"}}
    if case.hr is not None:
        rows["HR"] = vols["HR"]
    save_comparison_png(folder / "0_comparison.png", rows, case.name, window,
                        std=None if std is None else (std, (0.0, top)))  # fmt: skip


@torch.no_grad()
def reverse_process_gif(
    path: Path, ldm: LatentDiffusion, case: VolumeCase, window: tuple[int, ...],
    sampler: SamplerConfig, seed: int,
) -> Path:  # fmt: skip
    """GIF of one central window at every sampler step: mu + D(x_t) | mu + D(predicted x_0)
    (middle slice and MIP each), then the latents themselves, x_t | predicted x_0 (channel 0,
    middle slice, window +-3, nearest-upscaled to the image size): the detail the diffusion adds
    to the restorer appears as the steps go. The window is cropped to
    multiples of ``ldm.window_multiple`` that fit inside the volume; an axis shorter than one
    multiple is edge-padded to it (as the sliding windows pad)."""
    model_lr = case.model_lr  # the grid the LDM runs on (training spacing, --resample)
    m = ldm.window_multiple
    window = tuple(max(m, min(w, s // m * m)) for w, s in zip(window, model_lr.shape))
    start = [max(0, (s - w) // 2) for s, w in zip(model_lr.shape, window)]
    crop = model_lr[tuple(slice(a, a + w) for a, w in zip(start, window))]
    crop = np.pad(crop, [(0, w - s) for w, s in zip(window, crop.shape)], mode="edge")
    lr = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
    mu = ldm.restore(lr)
    cond = ldm.condition(lr, mu)
    g = torch.Generator(device=ldm.device).manual_seed(seed)
    shape = (1, ldm.vae.config.latent_channels, *cond.shape[2:])
    noise, t_start = ldm.initial_latent(shape, sampler, g)
    states: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(d: dict) -> None:
        states.append((d["x"], d["pred_original_sample"]))

    final = ldm.sample(cond, noise, sampler, generator=g, callback=keep, t_start=t_start)
    states.append((final, final))
    every = max(1, len(states) // 60)  # at most ~60 frames
    picks = states[::every] + ([states[-1]] if (len(states) - 1) % every else [])
    decoded = [(ldm.decode(x, mu)[0, 0].cpu().numpy(), ldm.decode(x0, mu)[0, 0].cpu().numpy())
               for x, x0 in picks]  # fmt: skip
    win = shared_window([lr[0, 0].numpy()])

    def chain_slice(z: torch.Tensor) -> np.ndarray:  # channel 0, middle slice, image-sized
        x = z[0, 0].float().cpu().numpy()  # scaled latent: unit scale
        return np.kron(x[x.shape[0] // 2], np.ones((ldm.factor,) * 2, np.float32))

    frames = []
    for (x_img, x0_img), (x, x0) in zip(decoded, picks):
        panels = [to_uint8(p, win) for p in (views(x_img)[0], views(x_img)[3],
                                             views(x0_img)[0], views(x0_img)[3])]  # fmt: skip
        panels += [to_uint8(chain_slice(z), (-3.0, 3.0)) for z in (x, x0)]
        row = np.concatenate([np.pad(p, 1) for p in panels], axis=1)
        frames.append(np.kron(row, np.ones((4, 4), np.uint8)))  # 4x nearest upscaling
    return save_gif(path, frames + [frames[-1]] * 5, duration_ms=150)


def summary_text(
    rows: dict[str, dict], cfg: Any, params: dict | None, external: dict | None
) -> tuple[str, str, dict[str, Any]]:
    """Header, spacing warnings, the score table of the cases with HR (methods as rows, as in
    evaluate_psnr), the tuned parameters, seconds and output paths per case."""
    s = cfg.sampler
    lines = [f"predict_ldm -> {cfg.out_dir} ({s.kind}, {s.steps} steps, eta {s.eta}, "
             f"{cfg.num_samples} sample(s))"]  # fmt: skip
    if external:
        lines += external["warnings"]
    scored = {k: r["metrics"] for k, r in rows.items() if "metrics" in r}
    means: dict[str, Any] = {}
    if scored:
        means = mean_scores(scored)
        lines.append(format_table(scored, means))
        lines.append(TABLE_NOTE)
        if params is not None:
            lines.append(tuned_text(params))
        key = (f"LDM mean {means['ldm']['psnr']:.2f} dB | sample "
               f"{means['ldm_sample']['psnr']:.2f} | restorer {means['restorer']['psnr']:.2f} | "
               f"baseline {means['baseline']['psnr']:.2f}")  # fmt: skip
        calib = [r["uncertainty_scores"] for r in rows.values() if "uncertainty_scores" in r]
        if calib:
            c = {k: float(np.mean([x[k] for x in calib])) for k in calib[0]}
            n = cfg.num_samples
            lines.append(f"uncertainty ({n} samples): variance-to-error ratio "
                         f"{c['var_err_ratio']:.2f} (calibrated: about {n / (n + 1):.2f}), AUSE "
                         f"{c['ause']:.3f} (random order {c['ause_random']:.3f}; 0 = ideal)")
            means["uncertainty"] = c
    else:
        key = f"{len(rows)} volume(s) written"
    for name, r in rows.items():
        lines.append(f"{name}: LDM in {r['seconds']:.1f} s -> {r['output']}")
    return "\n".join(lines), key, means


def write_summary(
    out: Path, rows: dict[str, dict], cfg: Any, ldm: LatentDiffusion, params: dict | None,
    external: dict | None, **extra: Any,
) -> tuple[str, str, dict[str, Any]]:  # fmt: skip
    """metrics.json (settings, per-case rows, means), metrics.csv and config.yaml into ``out``;
    returns (printed text, headline, summary)."""
    summary = {"cases": rows, "sampler": cfg.sampler.__dict__,
               "num_samples": cfg.num_samples, "detail_weight": cfg.detail_weight,
               "vae_step": ldm.vae_step, "diffusion_step": ldm.unet_step,
               "device": str(ldm.device), **extra, "tuned": params}  # fmt: skip
    if external is not None:
        summary["external"] = external
    text, key, means = summary_text(rows, cfg, params, external)
    summary["mean"] = means
    save_json(finite_json(summary), out / "metrics.json")
    scored = {k: r["metrics"] for k, r in rows.items() if "metrics" in r}
    if scored:
        save_metrics_csv(scored, out / "metrics.csv")
    save_config(cfg, out / "config.yaml")
    return text, key, summary
