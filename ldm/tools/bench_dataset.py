"""Benchmark case ``dataset_scaling``: disk, peak memory and time of prepare_data and
prepare_latents on phantom volumes (issue 26: the dataset and its latents grow with the volumes,
not with volume / stride^3).

Source volumes (LR + HR float32 ``.npy`` pairs, phantom + the default degradation) go through
``scripts/prepare_data.py`` (source ``pairs``, the MRI profile's patch rule by default: 32^3
patches at stride 4) and ``scripts/prepare_latents.py``, each in its own child process: its wall
time and its peak RSS (``ru_maxrss`` of that child from ``os.wait4``; ``getrusage(
RUSAGE_CHILDREN)`` would report the largest child so far, not each). The first stage is
untrained (random weights): the time does not depend on the weights. ``first_stage``
``config`` is the network of configs/train_vae_pair.yaml, ``tiny`` 8 channels per level (tests).
Registered in ``ldm/tools/benchmark.py`` (``CASES``).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MB = 2**20


def _peak_kb_to_mb(ru_maxrss: int) -> float:
    return ru_maxrss / MB if sys.platform == "darwin" else ru_maxrss / 1024  # bytes on macOS


def run_measured(args: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``python args`` in a child; its wall seconds, peak RSS (MB), and the error if any."""
    from ldm.tools.benchmark import child_env

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env=child_env(os.environ), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out: dict[str, Any] = {"seconds": time.perf_counter() - t0,
                           "peak_rss_mb": _peak_kb_to_mb(usage.ru_maxrss)}  # fmt: skip
    if proc.returncode != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        out["error"] = lines[-1] if lines else f"exit code {proc.returncode}"
    return out


def folder_mb(folder: Path, exclude: str | None = None) -> float:
    """Bytes of the files under ``folder`` (not under its subfolder ``exclude``), in MB."""
    skip = folder / exclude if exclude else None
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and (skip is None or skip not in p.parents)) / MB  # fmt: skip


def write_sources(folder: Path, sizes: list[int], seed: int = 0) -> float:
    """Phantom HR volumes of the given cube sizes and their simulated LR, as ``.npy`` pairs;
    returns their size in MB."""
    from ldm.data.degrade import DegradeConfig, degrade
    from ldm.data.phantom import PhantomConfig, make_phantom

    folder.mkdir(parents=True)
    for i, s in enumerate(sizes):
        hr = make_phantom((s, s, s), seed + i, PhantomConfig()).astype(np.float32)
        np.save(folder / f"case{i:02d}_{s}_hr.npy", hr)
        np.save(folder / f"case{i:02d}_{s}_lr.npy", degrade(hr, DegradeConfig(), seed + i))
    return folder_mb(folder)


def untrained_first_stage(path: Path, first_stage: str) -> dict[str, Any]:
    """A train_vae_pair checkpoint of random weights (the benchmark's nets: ``config``, or a
    ``tiny`` one); its model config."""
    from ldm.core.checkpoint import save_checkpoint
    from ldm.nets.restorer import RestorerAE, RestorerAEConfig
    from ldm.nets.vae import VAEConfig
    from ldm.tools.bench_monai import model_configs

    if first_stage == "tiny":
        small = {"channels": (8, 8, 8), "norm_groups": 4}
        cfg = RestorerAEConfig(VAEConfig(lr_skip=True, residual=True, **small),
                               VAEConfig(latent_channels=4, **small))  # fmt: skip
    elif first_stage == "config":
        cfg = model_configs()[0].model
    else:
        raise ValueError(f"first_stage must be tiny or config, got {first_stage!r}")
    torch.manual_seed(0)
    weights = RestorerAE(cfg).state_dict()
    save_checkpoint({"kind": "vae", "model_config": dataclasses.asdict(cfg), "model": weights,
                     "ema": {f"module.{k}": v for k, v in weights.items()}, "step": 0,
                     "extra": {}}, path)  # fmt: skip
    return dataclasses.asdict(cfg)


def dataset_scaling(
    device: torch.device,
    sizes: tuple[int, ...] = (96,) * 8,
    patch: int = 32,
    stride: int = 4,
    first_stage: str = "config",
) -> dict[str, Any]:
    """prepare_data + prepare_latents on phantom cubes of ``sizes``: disk of the source, of
    dataset/ (without latents/) and of latents/, per phase wall time and peak RSS, and the size
    the per-patch latents (format 2: mu and z per patch) would have had."""
    from ldm.core.files import load_json

    repo = Path(__file__).resolve().parents[2]
    sizes = tuple(int(s) for s in sizes)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source_mb = write_sources(tmp / "source", list(sizes))
        cfg = untrained_first_stage(tmp / "vae.pt", first_stage)
        data = tmp / "dataset"
        p, s = f"[{patch}, {patch}, {patch}]", f"[{stride}, {stride}, {stride}]"
        sets = ["source=pairs", f"pairs.folder={tmp / 'source'}", "pairs.lr_glob=*_lr.npy",
                "pairs.hr_glob=*_hr.npy", "pairs.resample=none", f"out_dir={data}",
                f"patches.size={p}", f"patches.stride={s}", "patches.foreground_threshold=0.2",
                "patches.min_foreground=0.05", "patches.background_keep=0.1"]  # fmt: skip
        row: dict[str, Any] = {"sizes": list(sizes), "patch": patch, "stride": stride,
                               "first_stage": f"{first_stage} (untrained)",
                               "source_mb": source_mb}  # fmt: skip
        row["prepare_data"] = run_measured(
            [str(repo / "scripts" / "prepare_data.py"), *_flags(sets)], tmp
        )
        if "error" in row["prepare_data"]:
            raise RuntimeError(f"prepare_data failed: {row['prepare_data']['error']}")
        lat_sets = [f"data_dir={data}", f"vae_checkpoint={tmp / 'vae.pt'}",
                    f"device={device.type}"]  # fmt: skip
        row["prepare_latents"] = run_measured(
            [str(repo / "scripts" / "prepare_latents.py"), *_flags(lat_sets)], tmp
        )
        if "error" in row["prepare_latents"]:
            raise RuntimeError(f"prepare_latents failed: {row['prepare_latents']['error']}")
        manifest = load_json(data / "manifest.json")
        counts = {k: v["num_patches"] for k, v in manifest["splits"].items()}
        row["patches"] = counts
        row["dataset_mb"] = folder_mb(data, exclude="latents")
        row["latents_mb"] = folder_mb(data / "latents")
    ae = cfg["residual_ae"]
    f, c = 2 ** (len(ae["channels"]) - 1), ae["latent_channels"]
    per_patch = patch**3 + c * (patch // f) ** 3  # mu + z floats of one patch, format 2
    row["per_patch_latents_mb"] = sum(counts.values()) * per_patch * 4 / MB
    row["disk_ratio"] = disk_ratio(row)
    return row


def _flags(sets: list[str]) -> list[str]:
    return [a for kv in sets for a in ("--set", kv)]


def disk_ratio(r: dict[str, Any]) -> float:
    """(dataset + latents) / (source volumes + latents): the issue's target, <= 2."""
    return (r["dataset_mb"] + r["latents_mb"]) / (r["source_mb"] + r["latents_mb"])


def describe(r: dict[str, Any]) -> str:
    sizes = r["sizes"]
    groups = ", ".join(f"{sizes.count(s)} x {s}^3" for s in dict.fromkeys(sizes))
    d, lat = r["prepare_data"], r["prepare_latents"]
    return (f"{groups}, {sum(r['patches'].values()):,} patches of {r['patch']}^3 at stride "
            f"{r['stride']}: source {r['source_mb']:.0f} MB, dataset {r['dataset_mb']:.0f} MB "
            f"({d['seconds']:.1f} s, peak {d['peak_rss_mb']:.0f} MB), latents "
            f"{r['latents_mb']:.0f} MB ({lat['seconds']:.1f} s, peak {lat['peak_rss_mb']:.0f} MB; "
            f"per patch it would be {r['per_patch_latents_mb']:,.0f} MB), disk ratio "
            f"{r['disk_ratio']:.2f}")  # fmt: skip


CASES = {"dataset_scaling": dataset_scaling}
