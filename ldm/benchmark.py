"""Speed and memory measurements (not tests): each case runs in its own child process so its
peak memory (RSS on CPU, max allocated on CUDA) is its own.

Networks use the shapes of configs/*.yaml with random weights: timing does not depend on the
weights. The DDIM/DDPM quality sweep needs trained checkpoints and uses them when present.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.config import REPO_ROOT, load_config
from ldm.diffusion.latent_diffusion import LatentDiffusion, SamplerConfig
from ldm.diffusion.schedule import make_schedule, training_loss
from ldm.distributed import pick_device
from ldm.inference import autoencode_volume
from ldm.nets import UNet3d, VAE3d
from ldm.phases.predict_ldm import PredictConfig, predict_volume
from ldm.phases.train_diffusion import TrainDiffusionConfig
from ldm.phases.train_vae_pair import TrainVAEConfig

CASES: dict[str, Callable[..., dict[str, Any]]] = {}


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


def _train_step(model, loss_fn, device) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with _amp(device):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@case
def vae_train(device: torch.device, reps: int = 5) -> dict[str, Any]:
    cfg = load_config(TrainVAEConfig, REPO_ROOT / "configs" / "train_vae_pair.yaml")
    patch = (32, 32, 32)
    model = VAE3d(cfg.model).to(device).train()
    b = cfg.train.batch_size
    x = torch.randn(2 * b, 1, *patch, device=device)  # LR and HR halves, as in training

    def loss():
        recon, mu, logvar = model(x)
        return recon.float().abs().mean()

    sec = _timed(_train_step(model, loss, device), device, 2, reps)
    vox = 2 * b * int(np.prod(patch))
    return {"batch_pairs": b, "patch": list(patch), "step_s": sec, "voxels_per_s": vox / sec,
            "samples_per_s": 2 * b / sec, "channels": list(cfg.model.channels)}  # fmt: skip


@case
def unet_train(device: torch.device, reps: int = 5) -> dict[str, Any]:
    cfg = load_config(TrainDiffusionConfig, REPO_ROOT / "configs" / "train_diffusion.yaml")
    latent = (8, 8, 8)  # 32^3 patches with f = 4
    model = UNet3d(cfg.model).to(device).train()
    schedule = make_schedule(cfg.diffusion)
    b = cfg.train.batch_size
    z = torch.randn(b, cfg.model.in_channels, *latent, device=device)
    cond = torch.randn(b, cfg.model.cond_channels, *latent, device=device)
    sec = _timed(
        _train_step(
            model, lambda: training_loss(model, schedule, z, extra_args={"cond": cond}), device
        ),
        device,
        2,
        reps,
    )  # noqa: E501
    vox = b * int(np.prod(latent))
    return {"batch": b, "latent": list(latent), "step_s": sec, "latent_voxels_per_s": vox / sec,
            "samples_per_s": b / sec, "channels": list(cfg.model.channels)}  # fmt: skip


def _random_ldm(device: torch.device) -> LatentDiffusion:
    vcfg = load_config(TrainVAEConfig, REPO_ROOT / "configs" / "train_vae_pair.yaml")
    dcfg = load_config(TrainDiffusionConfig, REPO_ROOT / "configs" / "train_diffusion.yaml")
    vae, unet = VAE3d(vcfg.model).to(device).eval(), UNet3d(dcfg.model).to(device).eval()
    return LatentDiffusion(vae, unet, make_schedule(dcfg.diffusion), 1.0, device, 0, 0)


@case
def predict_128(device: torch.device, steps: int = 50, size: int = 128) -> dict[str, Any]:
    cfg = load_config(PredictConfig, REPO_ROOT / "configs" / "predict_ldm.yaml")
    cfg = dataclasses.replace(cfg, sampler=SamplerConfig(steps=steps))
    ldm = _random_ldm(device)
    lr = np.random.default_rng(0).random((size,) * 3, dtype=np.float32)
    window = tuple(cfg.window or (32, 32, 32))
    with _amp(device):
        sec = _timed(lambda: predict_volume(ldm, lr, cfg, window), device, 0, 1)
    return {"size": size, "ddim_steps": steps, "window": list(window), "overlap": cfg.overlap,
            "batch_size": cfg.batch_size, "seconds": sec}  # fmt: skip


@case
def sliding_window(device: torch.device, size: int = 64) -> dict[str, Any]:
    vcfg = load_config(TrainVAEConfig, REPO_ROOT / "configs" / "train_vae_pair.yaml")
    vae = VAE3d(vcfg.model).to(device).eval()
    vol = np.random.default_rng(0).random((size,) * 3, dtype=np.float32)
    with torch.no_grad(), _amp(device):
        sec = _timed(lambda: autoencode_volume(vae, vol, (32, 32, 32), batch_size=8, device=device,
                                               progress=False), device, 0, 1)  # fmt: skip
    return {"size": size, "window": [32, 32, 32], "overlap": 0.5, "seconds": sec,
            "voxels_per_s": size**3 / sec}  # fmt: skip


@case
def sampler_quality(
    device: torch.device,
    config: str = "configs/demo/predict_ldm.yaml",
    ddim_steps: tuple[int, ...] = (5, 10, 20, 50),
    ddpm: bool = True,
) -> dict[str, Any]:
    """PSNR/SSIM and time of DDIM at several step counts and of DDPM (all T steps) on the first
    test case, with the trained checkpoints named by a predict_ldm config."""
    from ldm.data.dataset import iter_test_cases, load_manifest
    from ldm.diffusion.latent_diffusion import load_ldm
    from ldm.metrics import psnr, ssim

    cfg = load_config(PredictConfig, REPO_ROOT / config)
    ldm = load_ldm(cfg.vae_checkpoint, cfg.diffusion_checkpoint, device)
    window = tuple(cfg.window or load_manifest(cfg.data_dir)["patch_size"])
    case = next(iter_test_cases(cfg.data_dir))
    hr = case.to_original(case.hr)
    runs = [SamplerConfig("ddim", s) for s in ddim_steps]
    runs += [SamplerConfig("ddpm")] if ddpm else []
    rows = []
    for sampler in runs:
        c = dataclasses.replace(cfg, sampler=sampler, num_samples=1)
        t0 = time.perf_counter()
        out, _ = predict_volume(ldm, case.lr, c, window)
        seconds = time.perf_counter() - t0
        vol = case.to_original(out)
        steps = sampler.steps if sampler.sampler == "ddim" else ldm.schedule.num_train_timesteps
        rows.append({"sampler": sampler.sampler, "steps": steps, "psnr": psnr(vol, hr),
                     "ssim": ssim(vol, hr), "seconds": seconds})  # fmt: skip
    return {"case": case.name, "shape": list(case.hr.shape), "config": config,
            "baseline_psnr": psnr(case.to_original(case.lr), hr), "runs": rows}  # fmt: skip


@case
def particles(device: torch.device, num_particles: int = 50_000) -> dict[str, Any]:
    from ldm.phases.particles_gif import benchmark

    return {"num_particles": num_particles, **benchmark(num_particles, 1000, 512, 5)}


@case
def quality(device: torch.device, **kwargs: Any) -> dict[str, Any]:
    """The quality bench (ldm/quality_bench.py): trains every variant, so only on request."""
    from ldm.quality_bench import bench_case

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
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return result


def run_in_child(name: str, device_name: str, threads: int, **kwargs: Any) -> dict[str, Any]:
    code = (
        "import json, sys, torch; from ldm.benchmark import run_case; "
        f"torch.set_num_threads({threads}); "
        f"print('RESULT ' + json.dumps(run_case({name!r}, {device_name!r}, {kwargs!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}


def environment(device_name: str, threads: int) -> dict[str, Any]:
    device = pick_device(device_name)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"device": str(device), "device_name": name or platform.machine(), "threads": threads,
            "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip


def save(report: dict[str, Any], out: Path) -> Path:
    from ldm.io import save_json

    return save_json(report, out)


PLAN = [
    ("vae_train", {}),
    ("unet_train", {}),
    ("predict_128", {"steps": 50, "size": 128}),
    ("sliding_window", {"size": 64}),
    ("sliding_window", {"size": 128}),
    ("sliding_window", {"size": 256}),
    ("particles", {"num_particles": 10_000}),
    ("particles", {"num_particles": 50_000}),
    ("sampler_quality", {}),  # needs the demo checkpoints (python scripts/run_all.py)
]
OPT_IN = [("quality", {})]  # tens of CPU minutes: run only when named in --only


def _describe(name: str, r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    if name == "vae_train":
        return (
            f"{r['step_s']:.2f} s/step (batch {r['batch_pairs']} pairs of 32^3), "
            f"{r['voxels_per_s'] / 1e6:.2f} M voxels/s, {r['samples_per_s']:.1f} samples/s"
        )
    if name == "unet_train":
        return (
            f"{r['step_s']:.3f} s/step (batch {r['batch']} x 8^3 latents), "
            f"{r['samples_per_s']:.1f} samples/s"
        )
    if name == "predict_128":
        return f"{r['seconds']:.1f} s for 128^3, {r['ddim_steps']} DDIM steps, window {r['window']}"
    if name == "sliding_window":
        mvox = r["voxels_per_s"] / 1e6
        return f"{r['size']}^3 VAE denoise: {r['seconds']:.2f} s ({mvox:.2f} M vox/s)"
    if name == "sampler_quality":
        runs = ", ".join(f"{x['sampler']} {x['steps']}: {x['psnr']:.2f} dB {x['seconds']:.0f} s"
                         for x in r["runs"])  # fmt: skip
        return f"{r['case']} (baseline {r['baseline_psnr']:.2f} dB): {runs}"
    if name == "quality":
        return r["summary"]
    if name == "particles":
        return (
            f"{r['num_particles']} particles x 1000 steps 512^2 + GIF: {r['total_s']:.1f} s "
            f"total ({r['cpu_s']:.1f} s CPU), {r['steps_per_s']:.0f} steps/s"
        )
    return str(r)


def run_plan(device: str, threads: int, only: str, out: Path, echo=print) -> list[dict]:
    """Run the chosen cases (each in a child process), print a line each, save after each."""
    env = environment(device, threads)
    echo(f"benchmark on {env['device']} ({env['device_name']}), {threads} threads, "
         f"torch {env['torch']}")  # fmt: skip
    names = only.split(",") if only else []
    chosen = [(n, kw) for n, kw in PLAN + OPT_IN if n in names] if names else list(PLAN)
    rows = []
    for name, kwargs in chosen:
        r = run_in_child(name, device, threads, **kwargs)
        rows.append({"case": name, **kwargs, **r})
        save({"environment": env, "results": rows}, out)  # after every case: nothing is lost
        mem = f"{r['peak_mem_mb']:8.0f} MB" if "peak_mem_mb" in r else " " * 11
        echo(f"{name:<16}{mem}  {_describe(name, r)}")
    echo(f"written {out}")
    return rows
