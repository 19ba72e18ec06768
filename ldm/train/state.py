"""The state of one training run (``RunState``): the model, its optimiser and learning-rate
schedule, the EMA weights, the gradient scaler, the RNGs and the position in the data; saved as
last.pt / best.pt and resumed from them exactly (same batches, same random numbers).

``ldm.train.training`` runs the loop on it; the parts it builds come from ``ldm.train.optim``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from ldm.core.checkpoint import config_diff, load_checkpoint, save_checkpoint
from ldm.core.errors import CheckpointError, UserError
from ldm.train.optim import amp_mode, make_ema, make_optimizer, stage_lr_factor
from ldm.train.run_dir import commit_staged_run, truncate_metrics


class RunState:
    """State of one training run: model, optimiser, EMA, position in the data, RNG."""

    def __init__(self, model, model_config, dataset, task, cfg, run_dir, extra, info, device,
                 overwrite):  # fmt: skip
        self.model, self.model_config, self.task, self.cfg = model, model_config, task, cfg
        self.run_dir, self.extra, self.info, self.device = Path(run_dir), extra, info, device
        self.out = self.run_dir  # where files go now: a staging folder while overwriting
        self.overwrite = overwrite  # started with --overwrite
        self.dataset = dataset
        # a task with stages trains each parameter group on its own steps: [(start, end), ...];
        # their ranges are saved and checked on resume (None: one stage)
        if hasattr(task, "stages"):
            stages = task.stages(model)
            self.stage_ranges = [[list(r) for r in rs] for _, rs in stages]
        else:
            stages, self.stage_ranges = [(model.parameters(), [(0, cfg.steps)])], None
        self.opt = make_optimizer([{"params": list(p)} for p, _ in stages], cfg.lr, device,
                                  cfg.betas, cfg.weight_decay)  # fmt: skip
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, [functools.partial(stage_lr_factor, cfg=cfg, ranges=r) for _, r in stages]
        )
        self.ema = make_ema(model, cfg.ema_decay)
        self.amp, self.amp_dtype = amp_mode(cfg, device)
        fp16 = self.amp and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + info.rank)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best_score = -math.inf
        self.last_val: dict[str, float] = {}
        self.sampler = DistributedSampler(
            dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed,
            drop_last=True,
        )  # fmt: skip
        per_rank = len(self.sampler)
        if per_rank < cfg.batch_size:
            raise UserError(
                f"the training set has {len(dataset)} samples, fewer than batch_size "
                f"{cfg.batch_size} x {info.world_size} process(es); lower train.batch_size"
            )
        self.batches_per_epoch = per_rank // cfg.batch_size

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        gen_states = [self.gen.get_state()]
        if self.info.enabled:
            gen_states = [None] * self.info.world_size
            dist.all_gather_object(gen_states, self.gen.get_state())
        return {
            "kind": self.task.kind,
            "model_config": self.model_config,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_score": self.best_score,
            "rng": {"torch": torch.get_rng_state(), "generators": gen_states},
            "train_config": dataclasses.asdict(self.cfg),
            "world_size": self.info.world_size,
            "extra": self.extra,
            "stages": self.stage_ranges,
        }

    def save(self, name: str) -> None:
        state = self.state()  # every rank joins the all_gather inside
        if self.info.is_main:
            save_checkpoint(state, self.out / name)
            if name == "last.pt" and self.out != self.run_dir:
                commit_staged_run(self.run_dir)  # the new run replaces the old one only now
                self.out = self.run_dir

    def resume(self, path: Path) -> None:
        try:
            ck = load_checkpoint(path, self.task.kind, map_location=self.device)
        except CheckpointError as e:  # rerunning the phase would read the same file again
            why = str(e).removeprefix(f"{path}: ").split("; ")[0]
            raise CheckpointError(
                f"{path}: cannot resume from it ({why}); rerun with --overwrite to start this "
                f"training over, or delete {path}"
            ) from None
        diff = config_diff(ck["model_config"], self.model_config)
        # what the weights mean beyond the net: the diffusion's schedule and target
        old, new = ck.get("extra", {}).get("diffusion"), self.extra.get("diffusion")
        if isinstance(old, dict) and isinstance(new, dict):
            diff += config_diff(old, new, "diffusion.")
        if diff:
            raise CheckpointError(
                f"{path} was trained with a different model config ({'; '.join(diff[:3])}); "
                "use another output folder, or --overwrite to start over"
            )
        if ck.get("stages") != self.stage_ranges:  # e.g. train.steps or a stage's share changed
            raise CheckpointError(
                f"{path} was trained in other stages ({_stages_text(ck.get('stages'))}) than this "
                f"config gives ({_stages_text(self.stage_ranges)}); keep train.steps and the "
                "stage settings of that run, use another output folder, or --overwrite to start "
                "over"
            )
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.step, self.epoch = ck["step"], ck["epoch"]
        self.batch_in_epoch, self.best_score = ck["batch_in_epoch"], ck["best_score"]
        torch.set_rng_state(ck["rng"]["torch"].cpu())
        gens = ck["rng"]["generators"]
        if len(gens) == self.info.world_size:
            self.gen.set_state(gens[self.info.rank].cpu())
        truncate_metrics(self.run_dir / "metrics.jsonl", self.step)

    # -- data --------------------------------------------------------------------------------
    def batches(self):
        """Endless (epoch, batch) stream; the order depends only on the seed, so resume is exact."""
        while True:
            self.sampler.set_epoch(self.epoch)
            idx = list(self.sampler)
            bs = self.cfg.batch_size
            groups = [idx[b * bs : (b + 1) * bs] for b in range(self.batches_per_epoch)]
            loader = DataLoader(
                self.dataset, batch_sampler=groups[self.batch_in_epoch :],
                num_workers=self.cfg.num_workers,
            )  # fmt: skip
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


def _stages_text(stages: list | None) -> str:
    """Parameter-group step ranges for an error message: 'one stage' or 'steps 0-340 | 0-340,
    340-540'."""
    if not stages:
        return "one stage"
    return "steps " + " | ".join(", ".join(f"{a}-{b}" for a, b in rs) for rs in stages)
