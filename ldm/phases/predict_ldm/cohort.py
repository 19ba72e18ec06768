"""predict_ldm over a cohort: cases sharded over torchrun ranks, each committed as it finishes,
finished cases skipped on a rerun (docs/design.md, "Cohort inference").

Used for ``--folder`` inputs and whenever the phase runs under torchrun (WORLD_SIZE > 1):
- rank r predicts the cases i with i % world_size == r (each rank its own GPU, or CPU processes
  with gloo); a case is written into a hidden staging folder and renamed to ``<out>/<case>/``
  when complete, so a case folder that exists is complete;
- ``<out>/.predict_ldm.json`` records what produced the folder (checkpoint digests, sampler,
  samples, w, seed, window, output format); a rerun with the same settings skips the finished
  cases and redoes only the rest (a kill costs one case); other settings need ``--overwrite``,
  which replaces only the case folders and files this phase wrote;
- after a barrier rank 0 merges the per-case metrics.json into metrics.json and metrics.csv.
Every case is seeded by ``seed`` alone, so a case's output does not depend on the rank or on
how many processes ran. The folder logic is shared with evaluate_psnr (ldm/core/cohort.py; the
case list: ldm/evaluate/cohort.py); this module adds predict_ldm's signature and summary.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ldm.core.checkpoint import file_digest
from ldm.core.cohort import open_cohort
from ldm.core.distributed import init_distributed
from ldm.core.outdir import config_inputs
from ldm.core.registry import PhaseResult
from ldm.data.external import ExternalInputs
from ldm.diffusion.latent_diffusion import load_ldm
from ldm.evaluate.cohort import LazyTuned, case_scores, cohort_cases
from ldm.phases.predict_ldm.report import write_summary

log = logging.getLogger(__name__)

SUMMARY_FILES = ("metrics.json", "metrics.csv", "config.yaml")
SETTINGS = "checkpoints, dataset, sampler, samples, w, seed, window, output format or --resample"


def signature(cfg: Any, window: tuple[int, ...], resample: bool = False) -> dict[str, Any]:
    """What makes two runs' case outputs interchangeable."""
    return {
        "vae": file_digest(Path(cfg.vae_checkpoint)),
        "diffusion": file_digest(Path(cfg.diffusion_checkpoint)),
        "manifest": file_digest(Path(cfg.data_dir) / "manifest.json"),  # normalisation, test set
        "sampler": dataclasses.asdict(cfg.sampler), "num_samples": cfg.num_samples,
        "detail_weight": cfg.detail_weight, "seed": cfg.seed, "window": list(window),
        "overlap": cfg.overlap, "output_format": cfg.output_format, "resample": resample,
    }  # fmt: skip


def predict_cohort(
    cfg: Any, manifest: dict, external: ExternalInputs | None, overwrite: bool, predict_case
) -> PhaseResult:
    """The phase for a cohort (see the module doc); ``predict_case`` is predict_ldm's writer of
    one case."""
    from ldm.phases.predict_ldm import check_window  # the package imports this module

    info, device = init_distributed(cfg.device)
    ldm = load_ldm(cfg.vae_checkpoint, cfg.diffusion_checkpoint, device)
    window = tuple(cfg.window or manifest["patch_size"])
    check_window(window, ldm)
    out = Path(cfg.out_dir)
    sources, load, ext_info = cohort_cases(cfg.data_dir, cfg.cases, manifest, external, cfg.raw,
                                           False, "predict_ldm")  # fmt: skip
    names = list(sources)
    params = LazyTuned(cfg.data_dir, cfg.tune, device)  # when the first case with HR needs them

    def work(name: str, folder: Path) -> None:
        gif = cfg.gif and name == names[0]  # rank 0's first case
        predict_case(ldm, load(name), cfg, window, folder.parent, gif=gif, params=params)

    sig = signature(cfg, window, bool(external and external.resample))
    with open_cohort(out, "predict_ldm", info, sig, sources, overwrite=overwrite,
                     inputs=config_inputs(cfg, external), summary_files=SUMMARY_FILES,
                     settings=SETTINGS) as cohort:  # fmt: skip
        rows = case_scores(cohort, names, work)
        if rows is None:  # not rank 0
            return PhaseResult(f"predict_ldm rank {info.rank}: done", "", {}, [out])
        tuned = params() if any("metrics" in r for r in rows.values()) else None  # cached
        text, key, summary = write_summary(
            out, rows, cfg, ldm, tuned, ext_info, window=list(window), world_size=info.world_size
        )
    return PhaseResult(text + cohort.kept_text(), key, summary, [out])
