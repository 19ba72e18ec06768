"""Speed and memory of the pipeline's hot paths (not a test): prints a table and writes
results/benchmark/benchmark.json. CPU by default; CUDA (with bf16 autocast) when present."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ldm.benchmark import environment, run_in_child, save
from ldm.config import REPO_ROOT

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

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
    if name == "particles":
        return (
            f"{r['num_particles']} particles x 1000 steps 512^2 + GIF: {r['total_s']:.1f} s "
            f"total ({r['cpu_s']:.1f} s CPU), {r['steps_per_s']:.0f} steps/s"
        )
    return str(r)


@app.command(help=__doc__)
def main(
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    only: Annotated[str, typer.Option(help="comma-separated case names")] = "",
    out: Annotated[Path, typer.Option()] = REPO_ROOT / "results" / "benchmark" / "benchmark.json",
) -> None:
    env = environment(device, threads)
    typer.echo(
        f"benchmark on {env['device']} ({env['device_name']}), {threads} threads, "
        f"torch {env['torch']}"
    )
    chosen = [(n, kw) for n, kw in PLAN if not only or n in only.split(",")]
    rows = []
    for name, kwargs in chosen:
        r = run_in_child(name, device, threads, **kwargs)
        rows.append({"case": name, **kwargs, **r})
        save({"environment": env, "results": rows}, out)  # after every case: nothing is lost
        mem = f"{r['peak_mem_mb']:8.0f} MB" if "peak_mem_mb" in r else " " * 11
        typer.echo(f"{name:<16}{mem}  {_describe(name, r)}")
    typer.echo(f"written {out}")


if __name__ == "__main__":
    app()
