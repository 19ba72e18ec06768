"""particles_gif: config validation, the script (CliRunner), outputs, GIF writing, benchmark."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.core.config import load_config
from ldm.core.errors import ConfigError, DataError
from ldm.particles import write_gif
from ldm.particles.render import load_image
from ldm.phases.particles_gif import ParticlesConfig, benchmark
from tests.helpers.cli import error_line, run_script

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "num_particles=1000", "--set", "steps=50", "--set", "max_size=48",
        "--set", "gif_every=10"]  # fmt: skip


def _run(out: Path, *args: str):
    return run_script("particles_gif", "--set", f"out_dir={out}", *TINY, *args)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("eta", "5", "[0.01, 2]"),
        ("num_particles", "999", "[1000, 50000]"),
        ("steps", "1001", "[50, 1000]"),
        ("alpha", "0", "[0.01, 1]"),
        ("beta", "16", "[1, 15]"),
        ("sigma0", "-0.1", "[0, 2]"),
        ("render_blur", "0.4", "[0.5, 5]"),
        ("field_blur", "3.5", "[0.5, 3]"),
        ("gif_every", "11", "[1, 10]"),
        ("max_size", "15", "[16, 2048]"),
        ("anneal_levels", "6", "[1, 5]"),
        ("eps", "2", "[0.0001, 1]"),
        ("gif_frame_ms", "5", "[10, 1000]"),
    ],
)
def test_config_rejects_out_of_range_values(key: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError, match=f"{key} must be in {allowed}".replace("[", r"\[")):
        load_config(ParticlesConfig, None, [f"{key}={value}"])


def test_shipped_configs_load() -> None:
    full = load_config(ParticlesConfig, ROOT / "configs" / "particles_gif.yaml")
    demo = load_config(ParticlesConfig, ROOT / "configs" / "demo" / "particles_gif.yaml")
    assert full.num_particles == 50_000 and full.steps == 1000 and full.gif_every == 5
    assert demo.out_dir.parts[-3:] == ("results", "demo", "particles")
    with pytest.raises(ConfigError, match="device must be one of"):
        load_config(ParticlesConfig, None, ["device=tpu"])


def test_cli_run_writes_gif_pngs_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "particles"
    result = _run(out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "PSNR" in result.output and "SSIM" in result.output and "timings" in result.output
    gif = Image.open(out / "particles.gif")
    assert gif.n_frames == 6 and gif.size == (48, 36)  # t = 0, 10, ..., 50; 4:3 default image
    assert Image.open(out / "final.png").size == (48, 36)
    assert Image.open(out / "comparison.png").size == (48 + 4 + 48, 36)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frames"] == 6 and metrics["psnr_db"] > metrics["start_psnr_db"]
    assert {"field_s", "simulate_s", "render_s", "gif_s", "total_s"} <= metrics.keys()
    again = load_config(ParticlesConfig, out / "config.yaml")
    assert again.steps == 50 and again.out_dir == out


def test_cli_out_of_range_parameter_is_one_line_exit_2(tmp_path: Path) -> None:
    line = error_line(_run(tmp_path / "p", "--set", "eta=5"))
    assert "eta must be in [0.01, 2], got 5" in line
    assert not (tmp_path / "p").exists()


def test_cli_refuses_to_overwrite_without_flag(tmp_path: Path) -> None:
    out = tmp_path / "p"
    assert _run(out).exit_code == 0
    assert "--overwrite" in error_line(_run(out))
    assert _run(out, "--overwrite").exit_code == 0


def test_cli_image_option(tmp_path: Path) -> None:
    img = torch.zeros(40, 60, 3, dtype=torch.uint8)
    img[10:30, 20:40] = torch.tensor([200, 60, 30], dtype=torch.uint8)
    Image.fromarray(img.numpy()).save(tmp_path / "square.png")
    out = tmp_path / "p"
    result = _run(out, "--image", str(tmp_path / "square.png"))
    assert result.exit_code == 0, (result.output, result.exception)
    assert Image.open(out / "final.png").size == (48, 32)
    assert "square.png" in json.loads((out / "metrics.json").read_text())["image"]
    missing = error_line(_run(tmp_path / "q", "--image", str(tmp_path / "nope.png")))
    assert "image not found" in missing


def test_load_image_rejects_a_file_that_is_no_image(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    with pytest.raises(DataError, match="not a readable image"):
        load_image(bad)


def test_write_gif_shares_one_palette_close_to_the_frames(tmp_path: Path) -> None:
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8)
    frame = torch.stack(torch.broadcast_tensors(ramp[None, :], ramp[:, None], ramp[None, :]), -1)
    frames = [frame, frame.flip(0), torch.full_like(frame, 128)]
    write_gif(frames, tmp_path / "a.gif", frame_ms=50, hold_last_ms=500)
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames == 3 and gif.info["loop"] == 0
    for i, want in enumerate(frames):
        gif.seek(i)
        got = torch.from_numpy(__import__("numpy").array(gif.convert("RGB")))
        assert (got.int() - want.int()).abs().float().mean() < 6, i
    with pytest.raises(ValueError, match="at least one frame"):
        write_gif([], tmp_path / "b.gif")


def test_benchmark_times_the_run_the_phase_makes(tmp_path: Path) -> None:
    # `ldm3d benchmark` reports these figures for particles_gif: they must be of the same run
    # (frames, timing names) as the phase's own metrics.json for the same settings
    out = tmp_path / "p"
    result = _run(out)  # TINY: 1000 particles, 50 steps, 48 px wide, a frame every 10 steps
    assert result.exit_code == 0, (result.output, result.exception)
    phase = json.loads((out / "metrics.json").read_text())
    t0 = time.perf_counter()
    t = benchmark(num_particles=1000, steps=50, size=48, frame_every=10)
    elapsed = time.perf_counter() - t0  # measured outside: the parts cannot add up to more
    assert t["frames"] == phase["frames"] == Image.open(out / "particles.gif").n_frames == 6
    timings = {"field_s", "simulate_s", "render_s", "run_s", "gif_s", "total_s", "steps_per_s"}
    assert timings <= t.keys() and timings <= phase.keys()
    # frames render on a worker while the engine steps: both lie inside run_s, which with the
    # field and the GIF cannot add up to more than the time measured outside
    assert t["simulate_s"] <= t["run_s"] and t["render_s"] <= t["run_s"]
    assert t["field_s"] + t["run_s"] + t["gif_s"] <= elapsed and t["total_s"] <= elapsed
