from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.core.checkpoint import load_checkpoint, save_checkpoint
from ldm.core.errors import CheckpointError, ConfigError, UserError
from ldm.train.optim import TrainConfig, amp_mode, lr_factor, stage_lr_factor
from ldm.train.training import train
from tests.helpers.cli import error_line, run_script
from tests.helpers.tiny_train import make, run

ROOT = Path(__file__).resolve().parents[1]


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_gives_same_weights_as_straight_run(tmp_path):
    straight = weights(run(tmp_path / "a", steps=30))
    with pytest.raises(KeyboardInterrupt):  # crash during step 16; last.pt holds step 15
        run(tmp_path / "b", steps=30, crash_at=16)
    assert load_checkpoint(tmp_path / "b" / "last.pt", "vae")["step"] == 15
    resumed = weights(run(tmp_path / "b", steps=30))  # resumes from last.pt at step 15
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    ck = load_checkpoint(tmp_path / "b" / "last.pt", "vae")
    assert ck["step"] == 30 and ck["model_config"] == {"width": 8}
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert any('"val"' in line for line in lines)


def test_training_lowers_the_loss_and_writes_best(tmp_path):
    model, _, task = make()
    before = task.validate(model)["mse"]
    after = task.validate(run(tmp_path, steps=150))["mse"]
    assert after < 0.05 * before
    best = load_checkpoint(tmp_path / "best.pt", "vae")
    vals = [
        json.loads(x)["val"]["score"]
        for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"val"' in x
    ]
    assert len(vals) == 150 // 5 and best["best_score"] == max(vals)


def test_changed_model_config_is_a_clear_error(tmp_path):
    run(tmp_path, steps=5)
    model, ds, task = make()
    cfg = TrainConfig(steps=10, batch_size=4, device="cpu")
    with pytest.raises(CheckpointError, match="different model config .*width: 8 -> 16"):
        train(model, {"width": 16}, ds, task, cfg, tmp_path, progress=False)


def test_resume_with_another_diffusion_objective_is_refused(tmp_path):
    """A changed prediction type or schedule changes what the weights mean: a resume that kept
    training them on the new objective would be silently wrong."""
    model, ds, task = make()
    cfg = TrainConfig(steps=5, batch_size=4, device="cpu")
    extra = {"diffusion": {"prediction_type": "v", "beta_schedule": "linear"}}
    train(model, {"width": 8}, ds, task, cfg, tmp_path, extra=extra, progress=False)
    model, ds, task = make()
    changed = {"diffusion": {"prediction_type": "epsilon", "beta_schedule": "linear"}}
    with pytest.raises(CheckpointError, match="diffusion.prediction_type: 'v' -> 'epsilon'"):
        train(model, {"width": 8}, ds, task, TrainConfig(steps=10, batch_size=4, device="cpu"),
              tmp_path, extra=changed, progress=False)  # fmt: skip


@pytest.mark.parametrize("key, value", [("grad_clip", -1.0), ("grad_clip", 0.0),
                                        ("warmup_steps", -5), ("max_minutes", -1.0)])
def test_train_settings_that_would_silently_misbehave_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"train.{key} must be"):
        TrainConfig(**{key: value})


def test_corrupt_or_foreign_checkpoint(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(
        CheckpointError,
        match=r"corrupt or not a checkpoint \(UnpicklingError\); rerun train_vae_pair",
    ):
        load_checkpoint(tmp_path / "last.pt", "vae")
    with pytest.raises(CheckpointError, match="not found.*run train_diffusion first"):
        load_checkpoint(tmp_path / "missing.pt", "diffusion")
    save_checkpoint({"kind": "vae", "model_config": {}}, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="holds a 'vae' model but a 'diffusion'"):
        load_checkpoint(tmp_path / "v.pt", "diffusion")


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_lr_schedule_of_a_stage_is_zero_outside_it_and_whole_inside():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(59, cfg, 60, 100) == 0.0 and lr_factor(100, cfg, 60, 100) == 0.0
    assert lr_factor(60, cfg, 60, 100) == pytest.approx(0.1)  # its own warmup
    assert lr_factor(69, cfg, 60, 100) == pytest.approx(1.0)
    assert lr_factor(99, cfg, 60, 100) == pytest.approx(0.1, abs=0.01)  # its own cosine end
    assert lr_factor(30, cfg, 0, 60) > 0 and lr_factor(60, cfg, 0, 60) == 0.0
    ranges = [(0, 60), (60, 100)]  # a restart: each range its own warmup + cosine
    assert stage_lr_factor(59, cfg, ranges) == lr_factor(59, cfg, 0, 60)
    assert stage_lr_factor(60, cfg, ranges) == pytest.approx(0.1)
    assert stage_lr_factor(100, cfg, ranges) == 0.0
    assert stage_lr_factor(37, cfg, [(0, 100)]) == lr_factor(37, cfg)


def test_train_config_validation():
    with pytest.raises(ConfigError, match="train.amp must be one of none, bf16, fp16"):
        TrainConfig(amp="fp8")
    with pytest.raises(ConfigError, match="train.steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="train.amp_cpu must be one of auto, bf16, none"):
        TrainConfig(amp_cpu="fp16")


def test_precision_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_mode(TrainConfig(amp_cpu="none"), cpu) == (False, torch.float32)
    assert amp_mode(TrainConfig(amp_cpu="bf16"), cpu) == (True, torch.bfloat16)
    for has_bf16 in (True, False):  # auto: bf16 only where the CPU has bf16 instructions
        monkeypatch.setattr("ldm.train.optim.cpu_has_bf16", lambda h=has_bf16: h)
        assert amp_mode(TrainConfig(), cpu)[0] is has_bf16
    assert amp_mode(TrainConfig(amp="fp16", amp_cpu="none"), cuda) == (True, torch.float16)
    assert amp_mode(TrainConfig(amp="none", amp_cpu="bf16"), cuda) == (False, torch.float32)
    assert amp_mode(TrainConfig(amp_cpu="bf16"), torch.device("mps")) == (False, torch.float32)


def test_bf16_training_on_cpu_lowers_the_loss_and_keeps_float32_weights(tmp_path):
    model, ds, task = make()
    before = task.validate(model)["mse"]
    cfg = TrainConfig(steps=150, batch_size=4, lr=1e-2, warmup_steps=3, val_every=50, save_every=50,
                      device="cpu", amp_cpu="bf16")  # fmt: skip
    result = train(model, {"width": 8}, ds, task, cfg, tmp_path, progress=False)
    assert result.precision == "bf16 autocast"
    assert task.validate(model)["mse"] < 0.05 * before
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_non_finite_gradients_stop_before_the_update(tmp_path):
    """A finite loss with NaN gradients (sqrt at 0) is an error at that step, and no checkpoint
    ever holds the NaN weights."""
    model, ds, task = make()
    plain = task.loss

    def loss(model, batch, generator):
        value, logs = plain(model, batch, generator)
        if task.calls == 7:
            value = value + (model[0].weight * 0).sqrt().sum()  # 0, gradient 0 * inf = NaN
        return value, logs

    task.loss = loss
    cfg = TrainConfig(steps=20, batch_size=4, warmup_steps=3, val_every=5, save_every=5,
                      device="cpu", amp_cpu="none")  # fmt: skip
    with pytest.raises(UserError, match="gradients became nan at step 6; lower train.lr"):
        train(model, {"width": 8}, ds, task, cfg, tmp_path, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = load_checkpoint(tmp_path / "last.pt", "vae")
    assert state["step"] == 5  # the last save; nothing written at the error
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", str(ROOT / "tests" / "helpers" / "tiny_train.py"),
           str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    w0 = torch.load(tmp_path / "rank0.pt")
    w1 = torch.load(tmp_path / "rank1.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    ck = load_checkpoint(tmp_path / "run" / "last.pt", "vae")
    assert ck["step"] == 12 and ck["world_size"] == 2
    for k in w0:
        assert torch.equal(ck["model"][k], w0[k])


def test_out_dir_that_is_a_file(tiny_pipeline, tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    result = run_script(
        "train_vae_pair", "--set", f"data_dir={tiny_pipeline.data_dir}", "--set", f"out_dir={f}",
        "--set", "train.steps=1", "--set", "train.device=cpu",
    )  # fmt: skip
    assert "exists and is not a folder" in error_line(result)
    assert f.read_text() == "x"
