"""particles_gif: particles on a score field rebuild an image; GIF, PNGs, similarity, timings."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.core.config import resolve_path, save_config
from ldm.core.device import pick_device
from ldm.core.files import save_json, staged_dir
from ldm.core.outdir import check_out_dir, config_inputs
from ldm.core.registry import PhaseResult
from ldm.core.validate import check_choice, check_range
from ldm.evaluate.filters import gaussian_blur
from ldm.evaluate.metrics import psnr, ssim
from ldm.particles.default_image import default_image
from ldm.particles.engine import ParticleEngine
from ldm.particles.field import ScoreField, resize_longer_side
from ldm.particles.render import (
    ParticleCode,
    load_image,
    render_frame,
    render_frame_uint8,
    save_png,
    side_by_side,
    write_gif,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParticlesConfig:
    """particles_gif settings; ranges in docs/design.md (particles), checked on load."""

    out_dir: Path = Path("results/particles")
    image: Path | None = None  # PNG/JPEG; None = the built-in landscape (--image overrides)
    max_size: int = 512  # longer side of the field grid in pixels, [16, 2048]
    num_particles: int = 50_000  # [1000, 50000]
    steps: int = 1000  # T, [50, 1000]
    eta: float = 0.2  # drift step on the score, [0.01, 2]
    sigma0: float = 2.0  # initial noise scale, sigma(t) = sigma0 (1 - t/T), [0, 2]
    deterministic: bool = False  # no noise at all
    alpha: float = 0.05  # colour relaxation rate, [0.01, 1]
    beta: float = 3.0  # softmax sharpness of the colour target, [1, 15]
    field_blur: float = 3.0  # Gaussian blur of the log-densities (finest level), [0.5, 3]
    anneal_levels: int = 4  # coarse-to-fine field levels (blur x 2^k), 1 = none, [1, 5]
    scale_levels: bool = True  # level s steps k_s eta, noise sqrt(k_s) sigma, k_s = (b_s/b)^2
    eps: float = 0.01  # density floor of the luminance/colour densities, [1e-4, 1]
    render_blur: float = 2.0  # Gaussian blur of the splatted particles, [0.5, 5]
    decode: bool = True  # frames show decoded source colours; false: raw particle colours
    gif_every: int = 5  # a GIF frame every k steps, [1, 10]
    gif_frame_ms: int = 40  # display time of one GIF frame, [10, 1000]
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | mps | auto

    def __post_init__(self) -> None:
        check_range("max_size", self.max_size, 16, 2048)
        check_range("num_particles", self.num_particles, 1000, 50_000)
        check_range("steps", self.steps, 50, 1000)
        check_range("eta", self.eta, 0.01, 2)
        check_range("sigma0", self.sigma0, 0, 2)
        check_range("alpha", self.alpha, 0.01, 1)
        check_range("beta", self.beta, 1, 15)
        check_range("field_blur", self.field_blur, 0.5, 3)
        check_range("anneal_levels", self.anneal_levels, 1, 5)
        check_range("eps", self.eps, 1e-4, 1)
        check_range("render_blur", self.render_blur, 0.5, 5)
        check_range("gif_every", self.gif_every, 1, 10)
        check_range("gif_frame_ms", self.gif_frame_ms, 10, 1000)
        check_choice("device", self.device, ("cpu", "cuda", "mps", "auto"))


@dataclass
class ParticleRun:
    """Frames (H, W, 3) uint8, the final render (3, H, W) in [0, 1] and timings in seconds."""

    frames: list[torch.Tensor]
    final: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _one_thread_per_op() -> Iterator[None]:
    """Run torch ops single-threaded, restoring the thread count after.

    A particle op touches 50k points or one 512 x 384 frame: tens of microseconds, less than the
    fork and join of a 2-thread op on the 2-core machine measured (a step took 2.2 ms with 2
    threads per op, 0.8 ms with 1). The run is parallel by pipeline instead: steps on the
    calling thread, the noise of the next steps and the frames on one worker thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


NOISE_AHEAD = 8  # steps of noise drawn ahead, so the steps go on while a frame renders


class _FrameWorker:
    """Renders frames on the worker thread from snapshots while the engine steps on.

    The worker (``pool``, one thread) also draws the engine's noise ahead, in submission order:
    with ``NOISE_AHEAD`` > the frame interval the engine never waits for noise queued behind a
    frame, and two busy threads share the 2 cores instead of three. At most ``depth`` snapshots
    wait (then the engine waits for the oldest frame): memory stays bounded when rendering is
    slower than stepping. ``render_s`` sums the render times measured on the worker.
    """

    def __init__(
        self, pool: ThreadPoolExecutor, size: tuple[int, int], blur: float,
        code: ParticleCode | None, depth: int = 4,
    ) -> None:  # fmt: skip
        self.size, self.blur, self.code, self.depth = size, blur, code, depth
        self._pool = pool
        self._frames: list[Future[torch.Tensor]] = []
        self.render_s = 0.0

    def _render(self, positions: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        frame = render_frame_uint8(positions.t(), colours.t(), self.size, self.blur, self.code)
        self.render_s += time.perf_counter() - t0  # one worker: no concurrent update
        return frame

    def submit(self, engine: ParticleEngine) -> None:
        """Queue a frame of the engine's current state (a copy: the engine updates in place)."""
        if len(self._frames) >= self.depth:
            self._frames[-self.depth].result()
        pos, col = engine.positions.t().clone(), engine.colours.t().clone()  # (2, N), (3, N)
        self._frames.append(self._pool.submit(self._render, pos, col))

    def frames(self) -> list[torch.Tensor]:
        """Every frame in submission order, once rendered."""
        return [f.result() for f in self._frames]


def simulate(
    score: ScoreField, engine_kwargs: dict, render_blur: float, every: int,
    code: ParticleCode | None, progress: bool = False,
) -> ParticleRun:  # fmt: skip
    """Run a ``ParticleEngine`` on ``score``; render a frame at t = 0 and every ``every`` steps.

    Frames render on a worker thread while the engine steps (see ``_FrameWorker``); timings:
    ``simulate_s`` the stepping loop, ``render_s`` the worker's render time, ``run_s`` from the
    first step to the last frame (the two overlap, so run_s < simulate_s + render_s).
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="particle-worker")
    try:
        with _one_thread_per_op():
            engine = ParticleEngine(
                score, **engine_kwargs, noise_ahead=NOISE_AHEAD, noise_executor=pool
            )
            worker = _FrameWorker(pool, score.size, render_blur, code)
            t0 = time.perf_counter()
            worker.submit(engine)
            engine.run(worker.submit, every=every, progress=progress)  # renders t = T last
            _sync(score.device)
            sim = time.perf_counter() - t0
            frames = worker.frames()
            run_s = time.perf_counter() - t0
            final = render_frame(engine.positions, engine.colours, score.size, render_blur, code)
    finally:  # also on an error or Ctrl-C: drop queued work, wait for the task running now
        pool.shutdown(wait=True, cancel_futures=True)
    return ParticleRun(frames, final.cpu(), {
        "simulate_s": sim, "render_s": worker.render_s, "run_s": run_s,
        "steps_per_s": engine.steps / max(sim, 1e-9),
    })  # fmt: skip


def similarity(final: torch.Tensor, source: torch.Tensor, blur: float) -> dict[str, float]:
    """PSNR/SSIM (mean over R, G, B, data range 1) of ``final`` against ``source`` blurred alike."""
    ref = torch.stack([gaussian_blur(c, (blur, blur)) for c in source])  # (3, H, W)
    return {
        "psnr_db": sum(psnr(final[c], ref[c], data_range=1.0) for c in range(3)) / 3,
        "ssim": sum(ssim(final[c], ref[c], data_range=1.0) for c in range(3)) / 3,
    }


def _engine_kwargs(cfg: ParticlesConfig) -> dict:
    return dict(
        num_particles=cfg.num_particles, steps=cfg.steps, eta=cfg.eta, alpha=cfg.alpha,
        beta=cfg.beta, sigma0=cfg.sigma0, deterministic=cfg.deterministic,
        scale_levels=cfg.scale_levels, seed=cfg.seed,
    )  # fmt: skip


def run_particles(
    cfg: ParticlesConfig, *, overwrite: bool = False, image: Path | None = None
) -> PhaseResult:
    """Build the score field of an image, run the particles, write GIF/PNGs/metrics to out_dir."""
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    path = image if image is not None else cfg.image
    inputs = config_inputs(cfg, image)
    check_out_dir(resolve_path(cfg.out_dir), "particles_gif", overwrite, inputs)
    if path is not None:
        rgb = load_image(Path(path))
    else:  # the procedural landscape, drawn at the field size (4:3)
        rgb = default_image(max(16, round(cfg.max_size * 3 / 4)), cfg.max_size)
    t0 = time.perf_counter()
    score = ScoreField.from_image(
        rgb.to(device), max_size=cfg.max_size, field_blur=cfg.field_blur,
        levels=cfg.anneal_levels, eps=cfg.eps,
    )  # fmt: skip
    _sync(device)
    field_s = time.perf_counter() - t0
    source = resize_longer_side(rgb, cfg.max_size)  # (3, H, W), the field grid
    code = ParticleCode.from_field(score, cfg.beta) if cfg.decode else None
    run = simulate(score, _engine_kwargs(cfg), cfg.render_blur, cfg.gif_every, code, progress=True)
    metrics = similarity(run.final, source, cfg.render_blur)
    start = similarity(run.frames[0].permute(2, 0, 1).float() / 255, source, cfg.render_blur)
    out_dir = resolve_path(cfg.out_dir)
    names = ["particles.gif", "final.png", "comparison.png", "metrics.json", "config.yaml"]
    with staged_dir(out_dir, overwrite, phase="particles_gif", inputs=inputs) as tmp:
        t0 = time.perf_counter()
        write_gif(run.frames, tmp / names[0], frame_ms=cfg.gif_frame_ms)
        gif_s = time.perf_counter() - t0
        save_png(run.final, tmp / names[1])
        save_png(side_by_side([source, run.final]), tmp / names[2])
        timings = {"field_s": field_s, **run.timings, "gif_s": gif_s}
        timings["total_s"] = time.perf_counter() - t_start
        metrics.update(start_psnr_db=start["psnr_db"], start_ssim=start["ssim"],
                       frames=len(run.frames), height=score.size[0], width=score.size[1],
                       image=str(path) if path is not None else "built-in", **timings)  # fmt: skip
        save_json(metrics, tmp / names[3])
        save_config(cfg, tmp / names[4])
    text = _summary(cfg, score, device, metrics, out_dir)
    key = (
        f"PSNR {metrics['psnr_db']:.1f} dB, SSIM {metrics['ssim']:.2f}, {metrics['total_s']:.1f} s"
    )
    return PhaseResult(text, key, metrics, [out_dir / n for n in names])


def _summary(
    cfg: ParticlesConfig, score: ScoreField, device: torch.device, m: dict, out_dir: Path
) -> str:
    mode = "deterministic" if cfg.deterministic else f"stochastic, sigma0={cfg.sigma0:g}"
    return "\n".join([
        f"particles_gif: {cfg.num_particles} particles, {cfg.steps} steps ({mode}), "
        f"field {score.size[1]}x{score.size[0]} with {score.levels} level(s), {m['image']}, "
        f"{device}",
        f"similarity to the source blurred like the render (sigma {cfg.render_blur:g} px), "
        f"mean over R, G, B: PSNR {m['psnr_db']:.2f} dB (start {m['start_psnr_db']:.2f}), "
        f"SSIM {m['ssim']:.3f} (start {m['start_ssim']:.3f})",
        f"timings: field {m['field_s']:.2f} s, simulate {m['simulate_s']:.2f} s "
        f"({m['steps_per_s']:.0f} steps/s) while a worker rendered {m['frames']} frames in "
        f"{m['render_s']:.2f} s (both done after {m['run_s']:.2f} s), gif {m['gif_s']:.2f} s, "
        f"total {m['total_s']:.2f} s",
        f"wrote {out_dir}: particles.gif, final.png, comparison.png (source | final), "
        f"metrics.json, config.yaml",
    ])  # fmt: skip


def benchmark(
    num_particles: int, steps: int, size: int, frame_every: int, seed: int = 0,
    device: torch.device = torch.device("cpu"),
) -> dict[str, float]:  # fmt: skip
    """Time one run on the built-in image (size wide, 3/4 size high, as the phase draws it) on
    ``device``, GIF written to a temp dir.

    Returns wall-clock seconds for field build, simulate, render, gif write and total, steps/s,
    the process CPU seconds (all threads; tells contention on a busy machine apart) and the
    frame count. Uses the current ``torch.get_num_threads()``; other parameters are the defaults.
    """
    cfg = ParticlesConfig()
    rgb = default_image(max(16, round(size * 3 / 4)), size)
    cpu_start = time.process_time()
    t_start = time.perf_counter()
    score = ScoreField.from_image(
        rgb.to(device), max_size=size, field_blur=cfg.field_blur, levels=cfg.anneal_levels,
        eps=cfg.eps,
    )  # fmt: skip
    _sync(device)
    field_s = time.perf_counter() - t_start
    kwargs = {**_engine_kwargs(cfg), "num_particles": num_particles, "steps": steps, "seed": seed}
    code = ParticleCode.from_field(score, cfg.beta)
    run = simulate(score, kwargs, cfg.render_blur, frame_every, code)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_gif(run.frames, Path(tmp) / "bench.gif", frame_ms=cfg.gif_frame_ms)
        gif_s = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    return {"field_s": field_s, **run.timings, "gif_s": gif_s, "total_s": total,
            "cpu_s": time.process_time() - cpu_start, "frames": float(len(run.frames))}  # fmt: skip
