"""The phases in pipeline order, and what every phase returns.

A phase ``name`` lives in ``ldm.phases.<name>`` (a module or package) with its config dataclass
and its run function (named in ``PHASES``; ``fn(cfg, *, overwrite: bool) -> PhaseResult``); the
script is ``scripts/<name>.py`` and the default config ``configs/<name>.yaml``. Modules are imported
lazily, so ``ldm3d --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PhaseResult:
    """Outcome of one phase run.

    text: the multi-line summary the phase's script prints.
    headline: one short string for run_all's one-line-per-phase report (e.g. "PSNR 31.2 dB").
    metrics: numbers worth keeping (also written to the phase's metrics.json where it has one).
    outputs: the main files or folders the phase wrote.
    """

    text: str
    headline: str
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Phase:
    name: str  # module ldm.phases.<name>, script scripts/<name>.py, config configs/<name>.yaml
    config: str  # config dataclass in the module
    run: str  # run function in the module
    summary: str  # one line for --help
    # command-line inputs beyond --config/--set/--overwrite: "" none, "external" (--input,
    # --target, --folder, --input-glob, --target-glob, --resample), "image" (--image)
    inputs: str = ""

    @property
    def module(self) -> str:
        return f"ldm.phases.{self.name}"

    def config_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)

    def run_fn(self) -> Callable[..., PhaseResult]:
        return getattr(importlib.import_module(self.module), self.run)


PHASES: list[Phase] = [
    Phase("prepare_data", "PrepareDataConfig", "prepare_data",
          "volumes or the phantom -> normalised LR/HR patch dataset, split by case"),
    Phase("train_vae_pair", "TrainVAEConfig", "train_vae_pair",
          "train the first stage: restorer mu(LR) + autoencoder of HR - mu"),
    Phase("evaluate_psnr", "EvaluateConfig", "evaluate_psnr",
          "restorer and oracle vs tuned classical filters on the test volumes", "external"),
    Phase("prepare_latents", "PrepareLatentsConfig", "prepare_latents",
          "restorer output and residual latent of every case volume + one scale factor"),
    Phase("train_diffusion", "TrainDiffusionConfig", "train_diffusion",
          "train the conditional latent diffusion UNet"),
    Phase("predict_ldm", "PredictConfig", "predict_ldm",
          "the whole LDM on test volumes or your own scan (--input)", "external"),
    Phase("particles_gif", "ParticlesConfig", "run_particles",
          "particles follow an image's score field until they rebuild it (GIF)", "image"),
    Phase("ddim_similar_noise", "DDIMSimilarNoiseConfig", "ddim_similar_noise",
          "similar starting noises under deterministic DDIM; forward/backward"),
]  # fmt: skip


def get_phase(name: str) -> Phase:
    for p in PHASES:
        if p.name == name:
            return p
    raise KeyError(name)
