"""A tiny training task for the training-loop tests; also runnable under torchrun."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ldm.train.training import TrainConfig, train


class TinyTask:
    kind = "vae"

    def __init__(self, val: torch.Tensor, crash_at: int = 0, step_sleep: float = 0.0,
                 interrupt_at: int = 0) -> None:  # fmt: skip
        self.val, self.crash_at, self.calls, self.step_sleep = val, crash_at, 0, step_sleep
        self.interrupt_at = interrupt_at  # SIGINT to this process during that call (Ctrl-C)

    def loss(self, model, batch, generator):
        self.calls += 1
        if self.step_sleep:
            time.sleep(self.step_sleep)
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        if self.calls == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        (x,) = batch
        noise = torch.randn(x.shape, generator=generator, device=x.device) * 0.01
        target = x.sum(dim=1, keepdim=True)
        loss = ((model(x + noise) - target) ** 2).mean()
        return loss, {}

    def validate(self, model):
        err = ((model(self.val) - self.val.sum(1, keepdim=True)) ** 2).mean().item()
        return {"mse": err, "score": -err}


def make(seed: int = 0, crash_at: int = 0, step_sleep: float = 0.0, interrupt_at: int = 0):
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 1))
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(seed))
    return model, TensorDataset(data), TinyTask(data[:8], crash_at, step_sleep, interrupt_at)


def run(run_dir: Path, steps: int, crash_at: int = 0, *, overwrite: bool = False,
        lr_override: float | None = None, step_sleep: float = 0.0, interrupt_at: int = 0,
        **kw) -> nn.Module:  # fmt: skip
    model, ds, task = make(crash_at=crash_at, step_sleep=step_sleep, interrupt_at=interrupt_at)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=lr_override or 1e-2, warmup_steps=3,
                      val_every=5, save_every=5, log_every=2, device="cpu", **kw)  # fmt: skip
    train(model, {"width": 8}, ds, task, cfg, run_dir, overwrite=overwrite, progress=False)
    return model


if __name__ == "__main__":  # torchrun --nproc_per_node=2 tiny_train.py OUT_DIR
    out = Path(sys.argv[1])
    model = run(out / "run", steps=12)
    rank = int(__import__("os").environ.get("RANK", "0"))
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
