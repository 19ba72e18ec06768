"""Training steps of our VAE and UNet against MONAI's AutoencoderKL and DiffusionModelUNet.

Benchmark only (the optional extra ``bench``: ``pip install -e .[bench]``). The VAE is the first
stage's residual autoencoder (:class:`ldm.nets.VAE`, ``model.residual_ae`` of
``configs/train_vae_pair.yaml``: a plain KL autoencoder of HR - mu, as MONAI's); the restorer
has no MONAI counterpart and is left out. Both nets get the widths, residual blocks per level,
latent channels, norm groups and attention of ``configs/train_vae_pair.yaml`` /
``configs/train_diffusion.yaml`` and the same batch (``train.batch_size`` residual patches; the
UNet's input, output and condition channels as train_diffusion sets them from the latents:
:func:`model_configs`); they are not the same network: MONAI's autoencoder also has residual
blocks at full resolution (ours has only a stem conv there and one block at the end of the
decoder), and its UNet gets the condition concatenated on channels like ours. Our UNet is built
with MONAI's middle block (res, attn, res: ``mid_attention=1``) for equal depth; our default has
one attention block more there.

Time: one AdamW step (forward, loss, backward, update), the two nets alternating in one process so
that machine load hits both alike; the ratio is the median over the reps of MONAI's time over
ours. Float32 on the CPU, bf16 autocast on CUDA (both nets alike). Memory: each net trains in a
child process of its own; the figure is peak RSS (VmHWM) minus the RSS just before the net was
built on the CPU, the CUDA allocator's peak minus its use before on a GPU: weights, optimiser
state, activations (and on the CPU allocator slack) of that net.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ldm.core.config import REPO_ROOT, load_config
from ldm.core.errors import UserError
from ldm.train.optim import TrainConfig, timed_step

CPU = torch.device("cpu")
PATCH = (32, 32, 32)  # image patches of the VAE; latents of the UNet are PATCH / f


def model_configs(folder: Path | None = None) -> tuple[Any, Any]:
    """(TrainVAEConfig, TrainDiffusionConfig) of ``folder`` (default ``configs/``), the UNet's
    in/out channels set to the residual autoencoder's latent channels and its condition channels
    to space-to-depth of (mu, LR), 2 f^3: what train_diffusion sets from the latents."""
    from ldm.nets.restorer import condition_channels
    from ldm.phases.train_diffusion import TrainDiffusionConfig
    from ldm.phases.train_vae_pair import TrainVAEConfig

    folder = REPO_ROOT / "configs" if folder is None else Path(folder)
    vae = load_config(TrainVAEConfig, folder / "train_vae_pair.yaml")
    diffusion = load_config(TrainDiffusionConfig, folder / "train_diffusion.yaml")
    c = vae.model.latent_channels
    unet = dataclasses.replace(diffusion.model, in_channels=c, out_channels=c,
                               cond_channels=condition_channels(vae.model))  # fmt: skip
    return vae, dataclasses.replace(diffusion, model=unet)


def latent_patch(vae_cfg: Any) -> tuple[int, ...]:
    """The latent grid of a PATCH image patch: PATCH / f of the residual autoencoder."""
    return tuple(s // vae_cfg.model.downsample_factor for s in PATCH)


def _monai():
    try:
        from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    except ImportError as e:
        raise UserError(
            "the MONAI comparison needs monai: pip install -e .[bench] (or pip install monai)"
        ) from e
    return AutoencoderKL, DiffusionModelUNet


def build(
    kind: str, which: str, device: torch.device = CPU
) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], Any], int]:
    """(net, loss(net) on a fixed batch, batch size) for kind vae|unet, which ours|monai, on
    ``device`` (the batch is drawn on the CPU, so every device gets the same one)."""
    gen = torch.Generator().manual_seed(0)
    if kind not in ("vae", "unet"):
        raise UserError(f"kind must be vae or unet, got {kind!r}")
    vae_cfg, diffusion_cfg = model_configs()
    if kind == "vae":
        from ldm.nets import VAE

        # the residual autoencoder: one residual patch per pair of the training batch
        m, b = vae_cfg.model.residual_ae, vae_cfg.train.batch_size
        x = torch.randn(b, 1, *PATCH, generator=gen).to(device)
        if which == "ours":
            net = VAE(m)
        else:
            net = _monai()[0](
                spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=m.num_res_blocks,
                channels=m.channels, attention_levels=(False,) * len(m.channels),
                latent_channels=m.latent_channels, norm_num_groups=m.norm_groups,
                with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
            )  # fmt: skip

        def loss(net: torch.nn.Module) -> torch.Tensor:  # train_vae_pair's residual terms
            recon, mu, logvar = net(x)
            return (recon - x).square().mean() + 1e-4 * (mu.square() + logvar.exp() - logvar).mean()

        return net.to(device), loss, b
    from ldm.nets import UNet

    m, b = diffusion_cfg.model, diffusion_cfg.train.batch_size
    latent = latent_patch(vae_cfg)
    z, cond, t, target = (x.to(device) for x in (
        torch.randn(b, m.in_channels, *latent, generator=gen),
        torch.randn(b, m.cond_channels, *latent, generator=gen),
        torch.randint(0, 1000, (b,), generator=gen),
        torch.randn(b, m.out_channels, *latent, generator=gen),
    ))  # fmt: skip
    if which == "ours":
        net = UNet(dataclasses.replace(m, mid_attention=1))  # MONAI's middle block

        def loss(net: torch.nn.Module) -> torch.Tensor:
            return F.mse_loss(net(z, t, cond), target)
    else:
        net = _monai()[1](
            spatial_dims=3, in_channels=m.in_channels + m.cond_channels,
            out_channels=m.out_channels, num_res_blocks=m.num_res_blocks, channels=m.channels,
            attention_levels=tuple(m.attention and i == len(m.channels) - 1
                                   for i in range(len(m.channels))),
            norm_num_groups=m.norm_groups, num_head_channels=m.channels[-1] // m.num_heads,
            use_flash_attention=True,
        )  # fmt: skip
        zc = torch.cat([z, cond], 1)

        def loss(net: torch.nn.Module) -> torch.Tensor:
            return F.mse_loss(net(zc, t), target)

    return net.to(device), loss, b


def precision(device: torch.device) -> TrainConfig | None:
    """The comparison's precision: float32 on the CPU (None), bf16 autocast on CUDA, as our
    training runs there by default; the same for both nets."""
    return TrainConfig(amp="bf16") if device.type == "cuda" else None


def _stepper(net: torch.nn.Module, loss: Callable, device: torch.device) -> Callable[[], None]:
    net.train()
    step = timed_step(net, lambda: loss(net), device, precision(device))  # training's optimiser

    def synced() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return synced


def compare_time(
    kind: str, reps: int = 4, warmup: int = 1, device: torch.device = CPU
) -> dict[str, Any]:
    """Seconds per training step of ours and MONAI's, alternating in this process.

    Each rep times one step of each, back to back, so a change in machine load hits both; the
    speedup is the median of the reps' MONAI / ours ratios (``speedup_range``: lowest, highest),
    the step times the medians of each side.
    """
    nets = {w: build(kind, w, device) for w in ("ours", "monai")}
    steps = {w: _stepper(n, loss, device) for w, (n, loss, _) in nets.items()}
    for _ in range(warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {w: [] for w in steps}
    for _ in range(reps):
        for w, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[w].append(time.perf_counter() - t0)
    ratios = [m / o for o, m in zip(times["ours"], times["monai"])]
    params = {w: sum(p.numel() for p in n.parameters()) for w, (n, _, _) in nets.items()}
    return {"kind": kind, "batch": nets["ours"][2], "reps": reps,
            "ours_s": statistics.median(times["ours"]),
            "monai_s": statistics.median(times["monai"]), "speedup": statistics.median(ratios),
            "speedup_range": [min(ratios), max(ratios)],
            "ours_params": params["ours"], "monai_params": params["monai"]}  # fmt: skip


def status_mb(key: str) -> float:
    """A memory figure of /proc/self/status in MB: VmRSS now, VmHWM its peak since exec.

    (``ru_maxrss`` would not do: Linux keeps it across exec, so a child started by a big parent
    reports the parent's peak.)
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory(kind: str, which: str, steps: int = 2, device: str = "cpu") -> dict[str, float]:
    """Run in a child: peak memory over a few training steps minus the memory before building:
    RSS on the CPU, the CUDA allocator's peak on a GPU."""
    _monai()  # imported by both children alike
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.init()
    before = torch.cuda.memory_allocated(dev) / 2**20 if cuda else status_mb("VmRSS")
    net, loss, _ = build(kind, which, dev)
    step = _stepper(net, loss, dev)
    for _ in range(steps):
        step()
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else status_mb("VmHWM")
    return {"before_mb": before, "peak_mb": peak, "train_mb": peak - before}


def saved_for_backward_mb(kind: str, which: str) -> float:
    """MB of activations one forward keeps for backward (each storage once): the part of
    training memory the network's design decides, free of the allocator slack in peak RSS."""
    net, loss, _ = build(kind, which)
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss(net)
    return sum(n for ptr, n in sizes.items() if ptr not in params) / 2**20


def child_result(code: str) -> dict[str, Any]:
    """Run ``python -c code`` in a fresh process and return the JSON dict it prints on a line
    ``RESULT {...}``, or ``{"error": last stderr line}`` (fresh process: own threads, own peak)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    err = proc.stderr.strip().splitlines()
    last = err[-1] if err else "failed"
    return {"error": re.sub(r"^ldm\.core\.errors\.\w+: ", "", last)}  # a user error is its message


def memory_in_child(kind: str, which: str, threads: int, device: str = "cpu") -> dict[str, float]:
    return child_result(
        "import json, torch; from ldm.tools.bench_monai import peak_memory; "
        f"torch.set_num_threads({threads}); "
        f"print('RESULT ' + json.dumps(peak_memory({kind!r}, {which!r}, device={device!r})))"
    )


def compare(
    kind: str, threads: int, reps: int = 4, device: torch.device = CPU
) -> dict[str, Any]:
    """Time ratio (one process) and per-net peak training memory (a child each) on ``device``;
    the activations kept for backward are counted on the CPU in float32 (a design figure)."""
    out = {**compare_time(kind, reps, device=device), "device": device.type,
           "precision": "float32" if precision(device) is None else "bf16 autocast"}  # fmt: skip
    for which in ("ours", "monai"):
        mem = memory_in_child(kind, which, threads, str(device))
        out[f"{which}_train_mb"] = mem.get("train_mb", float("nan"))
        out[f"{which}_saved_mb"] = saved_for_backward_mb(kind, which)
    return out
