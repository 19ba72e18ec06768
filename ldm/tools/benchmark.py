"""Speed and memory measurements (not tests): each case runs in its own child process so its
peak memory (RSS on CPU, max allocated on CUDA) is its own.

Networks use the shapes of configs/*.yaml with random weights: timing does not depend on the
weights. The first stage is the restorer + residual autoencoder (ldm/nets/restorer.py), the UNet
gets the input and condition channels train_diffusion gives it (``bench_monai.model_configs``).
The DDIM/DDPM quality sweep needs trained checkpoints and uses them when present
(``ldm/tools/bench_quality.py``); ``dataset_scaling`` is in ``ldm/tools/bench_dataset.py``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.core.config import REPO_ROOT, load_config
from ldm.core.device import pick_device
from ldm.core.errors import ConfigError
from ldm.core.files import check_writable_folder
from ldm.diffusion.latent_diffusion import LatentDiffusion, SamplerConfig
from ldm.diffusion.schedule import make_schedule, training_loss
from ldm.evaluate.inference import first_stage_volume
from ldm.nets import UNet
from ldm.nets.loading import inference_layout
from ldm.nets.restorer import RestorerAE
from ldm.phases.predict_ldm import PredictConfig, predict_volume
from ldm.phases.train_vae_pair import first_stage_loss
from ldm.tools import bench_dataset, bench_quality
from ldm.tools.bench_monai import latent_patch, model_configs
from ldm.train.optim import precision_label, timed_step

CASES: dict[str, Callable[..., dict[str, Any]]] = {
    **bench_dataset.CASES, **bench_quality.CASES,  # + @case below
}


def case(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    CASES[fn.__name__] = fn
    return fn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def _amp(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@case
def vae_train(device: torch.device, reps: int = 5) -> dict[str, Any]:
    """One train_vae_pair step: restorer (L1) + residual autoencoder (MSE + KL) on pairs."""
    cfg, _ = model_configs()
    patch = (32, 32, 32)
    model = RestorerAE(cfg.model).to(device).train()
    b = cfg.train.batch_size
    lr, hr = torch.randn(2, b, 1, *patch, device=device)  # b (LR, HR) pairs, as in training

    def loss():
        return first_stage_loss(model, lr, hr, cfg)[0]  # the training loss itself

    sec = _timed(timed_step(model, loss, device, cfg.train), device, 2, reps)
    vox = b * int(np.prod(patch))
    return {"batch_pairs": b, "patch": list(patch), "step_s": sec, "voxels_per_s": vox / sec,
            "samples_per_s": b / sec, "channels": list(cfg.model.restorer.channels),
            "residual_channels": list(cfg.model.residual_ae.channels),
            "precision": precision_label(cfg.train, device)}  # fmt: skip


@case
def unet_train(device: torch.device, reps: int = 5) -> dict[str, Any]:
    vcfg, cfg = model_configs()
    latent = latent_patch(vcfg)  # 32^3 patches / f
    model = UNet(cfg.model).to(device).train()
    schedule = make_schedule(cfg.diffusion)
    b = cfg.train.batch_size
    z = torch.randn(b, cfg.model.in_channels, *latent, device=device)
    cond = torch.randn(b, cfg.model.cond_channels, *latent, device=device)
    sec = _timed(
        timed_step(
            model, lambda: training_loss(model, schedule, z, extra_args={"cond": cond}), device,
            cfg.train,
        ),
        device,
        2,
        reps,
    )  # noqa: E501
    vox = b * int(np.prod(latent))
    return {"batch": b, "latent": list(latent), "step_s": sec, "latent_voxels_per_s": vox / sec,
            "samples_per_s": b / sec, "channels": list(cfg.model.channels),
            "precision": precision_label(cfg.train, device)}  # fmt: skip


def _random_ldm(device: torch.device, profile: str = "") -> LatentDiffusion:
    """The LDM of configs/<profile>/train_vae_pair.yaml + train_diffusion.yaml (default: configs/),
    random weights."""
    vcfg, dcfg = model_configs(REPO_ROOT / "configs" / profile)
    vae, unet = RestorerAE(vcfg.model).to(device).eval(), UNet(dcfg.model).to(device).eval()
    vae, unet = inference_layout(vae), inference_layout(unet)  # as load_vae / load_unet
    return LatentDiffusion(vae, unet, make_schedule(dcfg.diffusion), 1.0, device, 0, 0)


def default_num_samples() -> int:
    """Samples per window of the default predict_ldm config (configs/predict_ldm.yaml: 8)."""
    return load_config(PredictConfig, REPO_ROOT / "configs" / "predict_ldm.yaml").num_samples


@case
def predict_128(
    device: torch.device, steps: int = 50, size: int = 128, num_samples: int | None = None,
    profile: str = "",
) -> dict[str, Any]:
    """predict_volume on a random size^3 volume with the window, overlap, batch size and (by
    default) number of samples per window of configs/<profile>/predict_ldm.yaml (default:
    configs/) and that profile's nets, DDIM ``steps``."""
    cfg = load_config(PredictConfig, REPO_ROOT / "configs" / profile / "predict_ldm.yaml")
    n = cfg.num_samples if num_samples is None else num_samples
    cfg = dataclasses.replace(cfg, sampler=SamplerConfig(steps=steps), num_samples=n)
    ldm = _random_ldm(device, profile)
    lr = np.random.default_rng(0).random((size,) * 3, dtype=np.float32)
    window = tuple(cfg.window or (32, 32, 32))
    with _amp(device):
        sec = _timed(lambda: predict_volume(ldm, lr, cfg, window), device, 0, 1)
    return {"size": size, "ddim_steps": steps, "num_samples": n, "window": list(window),
            "overlap": cfg.overlap, "batch_size": cfg.batch_size, "seconds": sec}  # fmt: skip


@case
def sliding_window(device: torch.device, size: int = 64) -> dict[str, Any]:
    """The first stage on a whole volume (first_stage_volume: the restorer mu(LR), as
    evaluate_psnr and predict_ldm's restorer row), 32^3 windows with 0.5 overlap."""
    vcfg, _ = model_configs()
    vae = RestorerAE(vcfg.model).to(device).eval()
    vol = np.random.default_rng(0).random((size,) * 3, dtype=np.float32)
    with torch.no_grad(), _amp(device):
        sec = _timed(lambda: first_stage_volume(vae, vol, (32, 32, 32), batch_size=8,
                                                device=device, progress=False),
                     device, 0, 1)  # fmt: skip
    return {"size": size, "window": [32, 32, 32], "overlap": 0.5, "seconds": sec,
            "voxels_per_s": size**3 / sec}  # fmt: skip


def default_steps() -> int:
    """DDIM steps of the default predict_ldm config (configs/predict_ldm.yaml)."""
    return load_config(PredictConfig, REPO_ROOT / "configs" / "predict_ldm.yaml").sampler.steps


@case
def predict_vs_bm4d(device: torch.device, size: int = 128, bm4d_size: int = 64) -> dict[str, Any]:
    """predict_ldm on a size^3 volume with the default sampler and number of samples (always
    reported), then, when the optional bm4d package is installed, BM4D in the same process on a
    bm4d_size^3 volume, its time scaled by (size / bm4d_size)^3 (BM4D is about linear in the
    voxel count; bm4d_size = size measures it directly). Without bm4d (or when it fails) the
    row has ``bm4d_skipped`` instead of the ratio: the predict time still counts."""
    from ldm.evaluate.classical import bm4d_available, bm4d_denoise

    r = predict_128(device, steps=default_steps(), size=size)
    if not bm4d_available():
        return {**r, "bm4d_skipped": "bm4d not installed (pip install bm4d)"}
    vol = torch.from_numpy(np.random.default_rng(1).random((bm4d_size,) * 3, dtype=np.float32))
    t0 = time.perf_counter()
    try:
        bm4d_denoise(vol, 0.1)
    except Exception as e:  # noqa: BLE001 - the predict figure is kept whatever BM4D does
        return {**r, "bm4d_skipped": f"BM4D failed: {type(e).__name__}: {e}"}
    measured = time.perf_counter() - t0
    scaled = measured * (size / bm4d_size) ** 3
    return {**r, "bm4d_size": bm4d_size, "bm4d_measured_s": measured, "bm4d_s": scaled,
            "bm4d_ratio": scaled / r["seconds"]}  # fmt: skip


@case
def predict_mri_profile(device: torch.device, size: int = 96) -> dict[str, Any]:
    """predict_ldm with the MRI profile's configs (configs/mri: its sampler, N, windows and
    nets, 16 latent channels) on a size^3 volume, random weights."""
    steps = load_config(PredictConfig, REPO_ROOT / "configs" / "mri" / "predict_ldm.yaml")
    r = predict_128(device, steps=steps.sampler.steps, size=size, profile="mri")
    return {**r, "profile": "mri"}


@case
def vae_vs_monai(device: torch.device, reps: int = 7) -> dict[str, Any]:
    from ldm.tools.bench_monai import compare

    return compare("vae", torch.get_num_threads(), reps, device)


@case
def unet_vs_monai(device: torch.device, reps: int = 7) -> dict[str, Any]:
    from ldm.tools.bench_monai import compare

    return compare("unet", torch.get_num_threads(), reps, device)


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a child that runs the repo's scripts from another folder: the repo first
    on PYTHONPATH, the caller's entries kept after it (packages installed there stay found)."""
    path = [str(REPO_ROOT), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**environ, "PYTHONPATH": os.pathsep.join(path)}


@case
def run_all_demo(device: torch.device) -> dict[str, Any]:
    """Wall time of ``scripts/run_all.py --profile demo`` in an empty temporary folder."""
    import tempfile

    env = child_env(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "run_all.py"),
                               "--profile", "demo"], cwd=tmp, env=env, capture_output=True,
                              text=True)  # fmt: skip
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run_all failed: {proc.stderr.strip().splitlines()[-1:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    return {"seconds": seconds, "phases": lines, "load_avg_1min": os.getloadavg()[0]}


@case
def particles(device: torch.device, num_particles: int = 50_000) -> dict[str, Any]:
    from ldm.phases.particles_gif import benchmark

    steps = 1000
    r = benchmark(num_particles, steps, 512, 5, device=device)
    return {"num_particles": num_particles, **r, "device": device.type,
            "ms_per_step": 1e3 * r["simulate_s"] / steps,
            "ms_per_frame": 1e3 * r["render_s"] / r["frames"]}  # fmt: skip


def _peak_rss_mb() -> float:
    """Peak RSS of this process since exec (VmHWM; ru_maxrss would include the parent's)."""
    try:
        from ldm.tools.bench_monai import status_mb

        return status_mb("VmHWM")
    except (OSError, RuntimeError):  # no /proc: macOS reports bytes, Linux kB
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024


@case
def quality(device: torch.device, **kwargs: Any) -> dict[str, Any]:
    """The quality bench (ldm/tools/quality_bench.py): trains every variant, so only on request."""
    from ldm.tools.quality_bench import bench_case

    return bench_case(**kwargs)


def run_case(name: str, device_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run one case here (in the child process) and add its peak memory."""
    device = pick_device(device_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = CASES[name](device, **kwargs)
    result["peak_mem_mb"] = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else _peak_rss_mb()
    )
    return result


def run_in_child(name: str, device_name: str, threads: int, **kwargs: Any) -> dict[str, Any]:
    from ldm.tools.bench_monai import child_result

    return child_result(
        "import json, sys, torch; from ldm.tools.benchmark import run_case; "
        f"torch.set_num_threads({threads}); "
        f"print('RESULT ' + json.dumps(run_case({name!r}, {device_name!r}, {kwargs!r})))"
    )


def environment(device_name: str, threads: int) -> dict[str, Any]:
    device = pick_device(device_name)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"device": str(device), "device_name": name or platform.machine(), "threads": threads,
            "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip


def save(report: dict[str, Any], out: Path) -> Path:
    from ldm.core.files import save_json

    return save_json(report, out)


QUICK = [  # every target figure but run_all: a few minutes on 2 idle cores
    ("predict_vs_bm4d", {"size": 128, "bm4d_size": 32}),
    ("predict_mri_profile", {"size": 96}),
    ("particles", {"num_particles": 50_000}),
    ("vae_vs_monai", {"reps": 5}),
    ("unet_vs_monai", {"reps": 5}),
    ("sampler_quality", {}),  # needs the demo checkpoints (python scripts/run_all.py)
]
PLAN = [
    ("vae_train", {}),
    ("unet_train", {}),
    ("predict_vs_bm4d", {"size": 128, "bm4d_size": 64}),
    ("predict_mri_profile", {"size": 96}),
    ("sliding_window", {"size": 64}),
    ("sliding_window", {"size": 128}),
    ("particles", {"num_particles": 10_000}),
    ("particles", {"num_particles": 50_000}),
    ("vae_vs_monai", {}),
    ("unet_vs_monai", {}),
    ("sampler_quality", {}),
    ("window_quality", {}),
    ("run_all_demo", {}),
    ("dataset_scaling", {"sizes": [96] * 8}),  # issue 26: dataset + latents grow with volumes
    ("dataset_scaling", {"sizes": [96] * 8 + [256]}),
]
OPT_IN = [("quality", {})]  # tens of CPU minutes: run only when named in --only


def run_plan(
    device: str, threads: int, only: str, out: Path, echo=print, quick: bool = False
) -> list[dict]:
    """Run the chosen cases (each in a child process), print a line each, save after each;
    then print every target figure next to its target (ldm/tools/bench_targets.py)."""
    from ldm.tools.bench_targets import check_targets, describe, format_targets

    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    plan = QUICK if quick else PLAN
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {n for n, _ in plan + OPT_IN}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"--only: unknown case {', '.join(unknown)}{' in a quick run' if quick else ''}; "
            f"choose from {', '.join(sorted(known))}"
        )
    check_writable_folder(out.parent, "choose another --out")
    env = environment(device, threads)  # an unavailable --device stops here, before any case
    env["load_avg_start"] = list(os.getloadavg())
    echo(f"benchmark on {env['device']} ({env['device_name']}), {threads} threads, "
        f"torch {env['torch']}, load average {env['load_avg_start'][0]:.1f}"
        f"{' (quick)' if quick else ''}")  # fmt: skip
    chosen = [(n, kw) for n, kw in plan + OPT_IN if n in names] if names else list(plan)
    rows: list[dict] = []
    report: dict[str, Any] = {"environment": env, "quick": quick, "results": rows}
    for name, kwargs in chosen:
        r = run_in_child(name, device, threads, **kwargs)
        rows.append({"case": name, **kwargs, **r})
        save(report, out)  # after every case: nothing is lost
        mem = f"{r['peak_mem_mb']:8.0f} MB" if "peak_mem_mb" in r else " " * 11
        echo(f"{name:<16}{mem}  {describe(name, r)}")
    env["load_avg_end"] = list(os.getloadavg())
    report["targets"] = check_targets(rows)
    save(report, out)
    for line in format_targets(report["targets"]):
        echo(line)
    echo(f"written {out}")
    return rows
