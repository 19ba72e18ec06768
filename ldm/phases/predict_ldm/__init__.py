"""predict_ldm: the whole LDM on whole volumes, window by window.

For each image-space window: the restorer mu(LR) -> ``num_samples`` DDIM/DDPM samples of the
residual latent conditioned on (mu, LR), run as one batch -> mu + w D(z) each; the mean, the
per-voxel std (uncertainty) and the first sample are blended with Gaussian weights. Seeded:
eta = 0 gives the same volumes every run. Inputs: the test cases, or external volumes
(``--input [--target]``, ``--folder`` + globs; read and normalised by ldm/data/external.py).
Where HR is known the table has the classical baselines (tuned on train patches), the restorer,
the LDM mean and one sample, and the oracle (ldm/evaluate/baselines.py), with sharpness and
calibration figures.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm.core.device import pick_device
from ldm.core.errors import ConfigError
from ldm.core.files import save_json, staged_dir
from ldm.core.outdir import check_out_dir, config_inputs
from ldm.core.registry import PhaseResult
from ldm.core.validate import check_choice, check_min, check_range
from ldm.data.dataset import VolumeCase, iter_test_cases, load_manifest
from ldm.data.dicom import save_dicom_series
from ldm.data.external import ExternalInputs, external_cases
from ldm.data.io import RawSpec, save_volume
from ldm.diffusion.latent_diffusion import LatentDiffusion, SamplerConfig, load_ldm
from ldm.evaluate.baselines import (
    LABELS,
    TuneConfig,
    method_outputs,
    score_outputs,
    tuned_baselines,
    uncertainty_scores,
)
from ldm.evaluate.cohort import is_cohort_run
from ldm.evaluate.inference import check_output_finite, fit_window, sliding_window_infer
from ldm.evaluate.scores_json import finite_json
from ldm.phases.predict_ldm.cohort import predict_cohort
from ldm.phases.predict_ldm.report import (
    case_pictures,
    reverse_process_gif,
    write_summary,
)
from ldm.train.optim import cpu_has_bf16

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("auto", "nifti", "dicom", "raw", "npy")


@dataclass(frozen=True)
class PredictConfig:
    data_dir: Path = Path("dataset/vessel_phantom")
    vae_checkpoint: Path = Path("checkpoint/vae_denoise/best.pt")
    diffusion_checkpoint: Path = Path("checkpoint/diffusion/best.pt")
    out_dir: Path = Path("results/ldm_prediction")
    device: str = "auto"
    # image-space window, shrunk to smaller volumes; null = the patch size. 64^3 without overlap
    # beat 32^3 windows with 0.25 overlap in quality and time (README, Benchmark)
    window: tuple[int, int, int] | None = (64, 64, 64)
    overlap: float = 0.0
    batch_size: int = 8  # windows per batch: bounds the memory, not the volume size
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    num_samples: int = 8  # samples per window: their mean, per-voxel std and the first one
    detail_weight: float = 1.0  # w in mu + w D(z): 0 = the restorer (fidelity), 1 = detail
    cases: tuple[str, ...] | None = None  # test cases to predict; null = all
    gif: bool = True  # GIF of the reverse process on the central window of the first case
    # output volumes: auto = the input's format (NIfTI for DICOM) | nifti | dicom | raw | npy;
    # dicom writes a new series with the input's patient/study tags and new UIDs
    output_format: str = "auto"
    # bf16 autocast of the networks on CUDA and on CPUs with bf16 instructions (AVX512-BF16,
    # AMX; elsewhere float32): 2.3x faster on the 2-core CPU, same PSNR (docs/experiments.md)
    amp: bool = True
    raw: RawSpec = field(default_factory=RawSpec)  # how to read a headerless --input .raw
    tune: TuneConfig = field(default_factory=TuneConfig)  # classical baselines (where HR is known)

    def __post_init__(self) -> None:
        check_range("overlap", self.overlap, 0, 1, hi_open=True)
        check_min("num_samples", self.num_samples, 1)
        check_range("detail_weight", self.detail_weight, 0, 2)
        check_choice("output_format", self.output_format, OUTPUT_FORMATS)
        check_min("batch_size", self.batch_size, 1)


def ldm_window_fn(
    ldm: LatentDiffusion, cfg: PredictConfig, generator: torch.Generator
) -> Callable[[torch.Tensor], torch.Tensor]:
    """LR window batch (B, 1, *w) -> (B, 3, *w): mean of the samples, their std, one sample."""
    use_amp = cfg.amp and (ldm.device.type == "cuda" or (ldm.device.type == "cpu"
                                                         and cpu_has_bf16()))  # fmt: skip

    def fn(lr: torch.Tensor) -> torch.Tensor:
        with torch.autocast(ldm.device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = ldm.refine(lr, cfg.sampler, generator, cfg.num_samples, cfg.detail_weight)
        return out.float()

    return fn


def predict_volume(
    ldm: LatentDiffusion, lr: np.ndarray, cfg: PredictConfig, window: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(mean over num_samples, per-voxel std or None for one sample, the first sample) of the
    LDM on a normalised volume."""
    x = torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32))[None]  # (1, D, H, W)
    window = fit_window(window, lr.shape, ldm.window_multiple)
    g = torch.Generator(device=ldm.device).manual_seed(cfg.seed)
    out = sliding_window_infer(
        x, ldm_window_fn(ldm, cfg, g), window, overlap=cfg.overlap, batch_size=cfg.batch_size,
        device=ldm.device, out_channels=3,
    ).numpy()  # fmt: skip
    return out[0], (out[1] if cfg.num_samples > 1 else None), out[2]


def check_window(window: tuple[int, ...], ldm: LatentDiffusion) -> None:
    need = ldm.window_multiple
    if len(window) != 3 or any(w % need for w in window):
        raise ConfigError(
            f"window {tuple(window)} must be 3 sizes divisible by {need} (VAE factor "
            f"{ldm.factor} x UNet levels); change window"
        )


def _write_volume(
    folder: Path, case: VolumeCase, vol: np.ndarray, suffix: str, output_format: str
) -> Path:
    """One output volume in original units: the input's format (``auto``; NIfTI for a DICOM
    input, the analysis format), or ``output_format``; ``dicom`` writes a new series beside the
    input's patient and study (ldm/data/dicom/write.py)."""
    fmt = case.meta.format if output_format == "auto" else output_format
    meta = dataclasses.replace(case.meta, dtype="float32")
    if fmt == "dicom" and output_format == "dicom":
        what = {"ldm": "LDM mean", "std": "uncertainty (std of samples)"}.get(suffix, suffix)
        return save_dicom_series(folder / f"{case.name}_{suffix}", vol.astype(np.float32), meta,
                                 description=f"ldm3d {what}",
                                 series_offset=1001 if suffix == "std" else 1000)  # fmt: skip
    ext = {"raw": ".raw", "nifti": ".nii.gz", "npy": ".npy"}.get(fmt, ".nii.gz")
    return save_volume(folder / f"{case.name}_{suffix}{ext}", vol.astype(np.float32), meta)


def _scores(
    ldm: LatentDiffusion, case: VolumeCase, cfg: PredictConfig, window: tuple[int, ...],
    params: dict, ldm_out: dict[str, np.ndarray], std: np.ndarray | None,
) -> tuple[dict, dict, dict[str, np.ndarray]]:  # fmt: skip
    """The score table of one case with HR, its uncertainty figures, and the restorer in
    original units."""
    outputs = method_outputs(case, ldm.vae, params, window, overlap=cfg.overlap,
                             batch_size=cfg.batch_size, device=ldm.device)  # fmt: skip
    outputs.update(ldm_out)
    scores, _ = score_outputs(outputs, case.hr, case.to_original, sharpness=True)
    calibration = uncertainty_scores(std, ldm_out["ldm"], case.hr) if std is not None else {}
    return scores, calibration, {LABELS["restorer"]: case.to_original(outputs["restorer"])}


def _predict_case(
    ldm: LatentDiffusion, case: VolumeCase, cfg: PredictConfig, window: tuple[int, ...], out: Path,
    gif: bool, params: Callable[[], dict],
) -> dict:  # fmt: skip
    """Predict one case into ``out/<case>/``; returns its metrics.json row."""
    folder, final = out / case.name, cfg.out_dir / case.name  # staged and final locations
    t0 = time.perf_counter()
    mean, std, sample = predict_volume(ldm, case.model_lr, cfg, window)
    for what, vol in (("LDM output", mean), ("LDM sample", sample), ("LDM std", std)):
        check_output_finite(vol, case, what)  # before anything of this case is written
    mean, sample = case.from_model(mean), case.from_model(sample)
    std = case.from_model(std) if std is not None else None
    seconds = time.perf_counter() - t0
    log.info("%s: LDM in %.1f s", case.name, seconds)
    ldm_vol = case.to_original(mean)
    row: dict = {"seconds": seconds}
    outputs = {"LDM sample": case.to_original(sample), "LDM mean": ldm_vol}
    if case.hr is not None:  # baselines tuned after the first LDM run (it checks the sampler)
        ldm_out = {"ldm": mean, "ldm_sample": sample}
        row["metrics"], calibration, restorer = _scores(ldm, case, cfg, window, params(),
                                                        ldm_out, std)  # fmt: skip
        if calibration:
            row["uncertainty_scores"] = calibration
        outputs = {**restorer, **outputs}
    row["output"] = str(final / _write_volume(folder, case, ldm_vol, "ldm", cfg.output_format).name)
    std_vol = None
    if std is not None:
        std_vol = std * (case.high - case.low)  # original units
        std_path = _write_volume(folder, case, std_vol, "std", cfg.output_format)
        row["uncertainty"] = str(final / std_path.name)
    case_pictures(folder, case, outputs, std_vol)
    if gif:
        reverse_process_gif(
            folder / "reverse_process.gif", ldm, case, window, cfg.sampler, cfg.seed
        )
    save_json(finite_json(row), folder / "metrics.json")  # inf PSNR: null + note
    return row


def _cases(
    cfg: PredictConfig, manifest: dict, external: ExternalInputs | None
) -> tuple[Iterator[VolumeCase], dict | None]:
    """(cases, external info for metrics.json or None)."""
    if external is None or not external.given:
        return iter_test_cases(cfg.data_dir, list(cfg.cases) if cfg.cases else None), None
    cases, _, info = external_cases(external, manifest, cfg.raw, False, "predict_ldm")
    return cases, info


def predict_ldm(
    cfg: PredictConfig,
    *,
    overwrite: bool = False,
    external: ExternalInputs | None = None,
) -> PhaseResult:
    manifest = load_manifest(cfg.data_dir)
    if is_cohort_run(external):  # sharded, resumable per case
        return predict_cohort(cfg, manifest, external, overwrite, _predict_case)
    inputs = config_inputs(cfg, external)
    check_out_dir(cfg.out_dir, "predict_ldm", overwrite, inputs)
    cases, ext_info = _cases(cfg, manifest, external)
    device = pick_device(cfg.device)
    ldm = load_ldm(cfg.vae_checkpoint, cfg.diffusion_checkpoint, device)
    window = tuple(cfg.window or manifest["patch_size"])
    check_window(window, ldm)
    rows: dict[str, dict] = {}
    with staged_dir(cfg.out_dir, overwrite, phase="predict_ldm", inputs=inputs) as out:
        tuned: dict = {}

        def get_params() -> dict:  # tuned once, when the first case with HR needs them
            if not tuned:
                tuned.update(tuned_baselines(cfg.data_dir, cfg.tune, device))
            return tuned

        for i, case in enumerate(cases):
            (out / case.name).mkdir()
            rows[case.name] = _predict_case(ldm, case, cfg, window, out,
                                            gif=cfg.gif and i == 0, params=get_params)  # fmt: skip
        params = tuned or None  # None: no case had HR
        text, key, summary = write_summary(out, rows, cfg, ldm, params, ext_info,
                                           window=list(window))  # fmt: skip
    return PhaseResult(text, key, summary, [cfg.out_dir])
