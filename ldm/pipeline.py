"""The phases in pipeline order: name, config dataclass and run function (imported lazily)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ldm.phase import PhaseResult


@dataclass(frozen=True)
class Phase:
    name: str  # also the script name (scripts/<name>.py) and config name (configs/<name>.yaml)
    module: str
    config: str  # config dataclass in ``module``
    run: str  # ``run(cfg, *, overwrite: bool) -> PhaseResult`` in ``module``

    def config_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)

    def run_fn(self) -> Callable[..., PhaseResult]:
        return getattr(importlib.import_module(self.module), self.run)


PHASES: list[Phase] = [
    Phase("prepare_data", "ldm.data.prepare", "PrepareDataConfig", "prepare_data"),
    Phase("train_vae_pair", "ldm.train_vae", "TrainVAEConfig", "train_vae_pair"),
    Phase("evaluate_psnr", "ldm.evaluate", "EvaluateConfig", "evaluate_psnr"),
    Phase("prepare_latents", "ldm.latents", "PrepareLatentsConfig", "prepare_latents"),
    Phase("train_diffusion", "ldm.train_diffusion", "TrainDiffusionConfig", "train_diffusion"),
    Phase("predict_ldm", "ldm.predict", "PredictConfig", "predict_ldm"),
    Phase("particles_gif", "ldm.particles.phase", "ParticlesConfig", "run_particles"),
    Phase(
        "ddim_similar_noise", "ldm.noise_experiment", "DDIMSimilarNoiseConfig", "ddim_similar_noise"
    ),
]


def get_phase(name: str) -> Phase:
    for p in PHASES:
        if p.name == name:
            return p
    raise KeyError(name)


def phase_names() -> list[str]:
    return [p.name for p in PHASES]
