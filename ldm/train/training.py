"""The one training loop of every training phase (nanoGPT-style, readable top to bottom).

AdamW, linear warmup + cosine decay, gradient clipping, EMA weights, autocast (bf16 on CUDA and on
CPUs with bf16 instructions), tqdm, metrics.jsonl and its curves.png (ldm.evaluate.curves), periodic
validation, atomic checkpoints (last.pt + best.pt), automatic resume, and DDP when launched by
``torchrun``. The parts of a step (config, schedule, optimiser, EMA, precision) live in
``ldm.train.optim``, the run's state (model, optimiser, EMA, RNG, position in the data; save and
resume) in ``ldm.train.state``. A phase plugs in through a small ``TrainTask``: a loss on a
batch and a validation.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

from ldm.core.config import save_config
from ldm.core.distributed import DistInfo, barrier, init_distributed
from ldm.core.errors import UserError
from ldm.core.files import atomic_path
from ldm.core.outdir import config_inputs, rank0_holds
from ldm.core.registry import PhaseResult
from ldm.train.optim import TrainConfig, precision_label
from ldm.train.run_dir import (
    Interrupted,
    deferred_interrupts,
    discard_staged_run,
    prepare_run_dir,
)
from ldm.train.state import RunState

log = logging.getLogger(__name__)

class TrainTask(Protocol):
    kind: str  # 'vae' | 'diffusion': stored in the checkpoint

    def loss(
        self, model: nn.Module, batch: Any, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of the (EMA) model; must hold 'score' (higher is better) for best.pt."""

    # optional: ``stages(model)`` -> [(parameters, [(start, end), ...])]: each group trained on
    # its own steps only, with a warmup + cosine per range; ``begin_step(step, model,
    # ema_model)`` is called before each step's loss (a task whose loss depends on the stage).
    # A task with stages leaves parameters unused in some steps (DDP is told so).


@dataclass
class TrainResult:
    step: int
    steps_run: int
    seconds: float
    best_score: float
    last_val: dict[str, float]
    run_dir: Path
    precision: str = "float32"  # or "bf16 autocast" / "fp16 autocast"
    staged: bool = False  # trained in stages (TrainTask.stages): train.steps fixes them


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _log_line(run_dir: Path, record: dict[str, Any]) -> None:
    try:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise UserError(
            f"{run_dir / 'metrics.jsonl'}: cannot write ({e.strerror or e}); free space or fix "
            "the folder's permissions, then rerun to resume"
        ) from None


def train(
    model: nn.Module,
    model_config: dict[str, Any],
    dataset: Dataset,
    task: TrainTask,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    config: Any = None,
) -> TrainResult:
    """Train ``model`` until ``cfg.steps`` (resuming from ``run_dir/last.pt`` if present).

    ``config``, the phase's whole config, is saved as ``run_dir/config.yaml`` when steps ran
    (a no-op rerun leaves it untouched).
    """
    info, device = init_distributed(cfg.device)
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    model.to(device)
    run = RunState(model, model_config, dataset, task, cfg, run_dir, extra or {}, info, device,
                   overwrite)  # fmt: skip
    def prepare() -> None:
        run.out = prepare_run_dir(run_dir, overwrite)

    with rank0_holds(run_dir, config_inputs(config), info, prepare):  # for the whole training
        return _train_locked(run, config, overwrite, progress)


def _train_locked(run: RunState, config: Any, overwrite: bool, progress: bool) -> TrainResult:
    """train() once the run folder is checked and locked."""
    model, cfg, task, info, device = run.model, run.cfg, run.task, run.info, run.device
    run_dir = run.run_dir
    last = run_dir / "last.pt"
    if last.exists() and not overwrite:
        run.resume(last)
        log.info("resumed %s at step %d", last, run.step)
        if info.is_main:
            _restore_best(run)

    net = model
    if info.enabled:
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      find_unused_parameters=run.stage_ranges is not None)
    start_step, t0 = run.step, time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=run.step, desc=f"train {task.kind}", unit="step",
               disable=not (progress and info.is_main), dynamic_ncols=True)  # fmt: skip
    batches = run.batches()
    try:
        with deferred_interrupts() as interrupted:
            _loop(run, net, batches, bar, interrupted, info, device, t0)
    except Interrupted:
        bar.close()
        _save_curves(run, info)  # last.pt saved (a dropped staged run left no metrics.jsonl)
        raise
    finally:
        bar.close()  # before any error line, so it is not printed onto the bar
    barrier(info)
    _save_curves(run, info)
    if info.is_main and config is not None and (run.step > start_step
                                                 or not (run_dir / "config.yaml").exists()):
        save_config(config, run_dir / "config.yaml")
    last_val = run.last_val
    return TrainResult(run.step, run.step - start_step, time.perf_counter() - t0,
                       run.best_score, last_val, run_dir, precision_label(cfg, device),
                       run.stage_ranges is not None)  # fmt: skip


def _loop(run: RunState, net: nn.Module, batches, bar, interrupted: list[int], info: DistInfo,
          device: torch.device, t0: float) -> None:  # fmt: skip
    """Steps until cfg.steps, the time cap, or a deferred Ctrl-C/SIGTERM (saved, then raised)."""
    cfg, model, task = run.cfg, run.model, run.task
    while run.step < cfg.steps:
        model.train()
        batch = _to(next(batches), device)
        if hasattr(task, "begin_step"):
            task.begin_step(run.step, model, run.ema.module)
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp):
            loss, logs = task.loss(net, batch, run.gen)
        if not torch.isfinite(loss):
            raise UserError(f"loss became {loss.item()} at step {run.step}; lower train.lr")
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.opt)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
        if not run.scaler.is_enabled() and not torch.isfinite(grad_norm):  # fp16 skips the step
            raise UserError(  # before the update: no NaN weights in any checkpoint
                f"gradients became {float(grad_norm)} at step {run.step}; lower train.lr"
                + (" or set train.amp_cpu=none" if run.amp and device.type == "cpu" else "")
            )
        run.scaler.step(run.opt)
        run.scaler.update()
        run.opt.zero_grad(set_to_none=True)
        run.sched.step()
        run.ema.update_parameters(model)
        run.step += 1
        bar.update(1)
        lr = max(g["lr"] for g in run.opt.param_groups)  # the stage that is training
        if info.is_main and (run.step % cfg.log_every == 0 or run.step == cfg.steps):
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            record = {"step": run.step, "loss": loss.item(), "lr": lr,
                      "grad_norm": float(grad_norm)}  # fmt: skip
            _log_line(run.out, {**record, **logs, "time": time.perf_counter() - t0})
        out_of_time = cfg.max_minutes > 0 and time.perf_counter() - t0 > 60 * cfg.max_minutes
        done = run.step == cfg.steps or out_of_time
        stop = _agree(bool(interrupted), info, device)
        if run.step % cfg.val_every == 0 or done:
            run.last_val = _validate(run, info)
        # an --overwrite run before its first checkpoint is still staged: stopped there, it is
        # dropped, and the earlier run stays (its save would replace best.pt with nothing)
        staged = stop and _agree(run.out != run.run_dir, info, device)
        if run.step % cfg.save_every == 0 or done or (stop and not staged):
            run.save("last.pt")
        if stop:
            if staged and info.is_main:
                discard_staged_run(run.run_dir)
            raise Interrupted(_interrupted(run, staged))
        if out_of_time:
            log.info("stopping at step %d: train.max_minutes=%s reached", run.step, cfg.max_minutes)
            break


def _restore_best(run: RunState) -> None:
    """A resumed run whose best.pt is gone (deleted; its score is in last.pt): a finished run
    rewrites it from last.pt, whose weights are all that is left (nothing would write it
    again); an unfinished one forgets the old best score, so its next validation writes it."""
    best, last = run.run_dir / "best.pt", run.run_dir / "last.pt"
    if best.exists() or run.best_score == -math.inf:  # none yet: the first validation writes it
        return
    if run.step < run.cfg.steps:
        run.best_score = -math.inf
        log.warning("%s is missing: the next validation writes it again", best)
        return
    with atomic_path(best) as tmp:
        shutil.copyfile(last, tmp)
    log.warning(
        "%s was missing: rewrote it from %s (step %d; the weights of the best validation are "
        "gone, these are the last step's)", best, last.name, run.step,
    )  # fmt: skip


def _save_curves(run: RunState, info: DistInfo) -> None:
    """curves.png beside the run's metrics.jsonl, on rank 0; failing to draw is only a warning."""
    metrics = run.out / "metrics.jsonl"
    if not info.is_main or not metrics.is_file():
        return
    try:
        from ldm.evaluate.curves import plot_training_curves  # matplotlib: imported only here

        plot_training_curves(metrics, run.out / "curves.png")
    except Exception as e:  # a picture never fails a training
        log.warning("%s: curves.png not drawn (%s: %s)", run.out, type(e).__name__, e)


def _interrupted(run: RunState, staged: bool) -> str:
    """What a Ctrl-C / SIGTERM left and how to go on."""
    if staged:
        return (f"interrupted at step {run.step}, before this --overwrite run's first "
                f"checkpoint: {run.run_dir} still holds the earlier run; rerun to start over")
    if run.overwrite:  # the same command would start over: resuming needs no --overwrite
        return f"interrupted at step {run.step}; rerun without --overwrite to resume"
    return f"interrupted at step {run.step}; rerun the same command to resume"


def _agree(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if it is true on any (ranks must stop at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _validate(run: RunState, info: DistInfo) -> dict[str, float]:
    """Validate the EMA weights on rank 0; save best.pt when the score improves."""
    metrics: dict[str, float] = {}
    improved = False
    if info.is_main:
        ema_model = run.ema.module
        ema_model.eval()
        with torch.no_grad():
            metrics = run.task.validate(ema_model)
        improved = metrics["score"] > run.best_score
        if improved:
            run.best_score = metrics["score"]
        _log_line(run.out, {"step": run.step, "val": metrics})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "score")
        log.info("step %d: validation %s%s", run.step, shown, " (best)" if improved else "")
    if info.enabled:
        flag = [improved]
        dist.broadcast_object_list(flag, src=0)
        improved = flag[0]
    if improved:
        run.save("best.pt")
    return metrics


def training_summary(
    name: str,
    result: TrainResult,
    model: nn.Module,
    describe: Callable[[dict[str, float]], tuple[str, str]],
) -> PhaseResult:
    """A training phase's PhaseResult: a head line, then ``describe(last validation)`` ->
    (line, key), or a note that the run was already complete."""
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    lines = [f"{name} -> {result.run_dir} (step {result.step}, {result.steps_run} steps in "
             f"{result.seconds:.0f} s, {n_params:.2f} M params, {result.precision})"]  # fmt: skip
    v = result.last_val
    if v:
        line, key = describe(v)
    else:
        more = ("its stages end at train.steps: to train longer, rerun with more train.steps "
                "and --overwrite (or another out_dir)" if result.staged
                else "raise train.steps to continue")  # fmt: skip
        line = f"already trained to step {result.step}; {more}"
        key = f"already at step {result.step}"
    lines.append(line)
    return PhaseResult("\n".join(lines), key, {"step": result.step, **v}, [result.run_dir])
