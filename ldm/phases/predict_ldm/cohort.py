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
how many processes ran.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ldm.core.checkpoint import file_digest
from ldm.core.distributed import DistInfo, barrier, init_distributed
from ldm.core.errors import UserError
from ldm.core.files import load_json, pid_alive, save_json
from ldm.core.pipeline import PhaseResult
from ldm.data.dataset import TestCase, iter_test_cases
from ldm.data.external import ExternalInputs, external_cases, load_external_case
from ldm.diffusion.latent_diffusion import load_ldm
from ldm.evaluate.baselines import tuned_baselines
from ldm.phases.predict_ldm.report import write_summary

log = logging.getLogger(__name__)

MARKER = ".predict_ldm.json"
SUMMARY_FILES = ("metrics.json", "metrics.csv", "config.yaml")


def signature(cfg: Any, window: tuple[int, ...]) -> dict[str, Any]:
    """What makes two runs' case outputs interchangeable."""
    return {
        "vae": file_digest(Path(cfg.vae_checkpoint)),
        "diffusion": file_digest(Path(cfg.diffusion_checkpoint)),
        "sampler": dataclasses.asdict(cfg.sampler), "num_samples": cfg.num_samples,
        "detail_weight": cfg.detail_weight, "seed": cfg.seed, "window": list(window),
        "overlap": cfg.overlap, "output_format": cfg.output_format,
    }  # fmt: skip


def _prepare_out(out: Path, sig: dict[str, Any], names: list[str], overwrite: bool) -> None:
    """Rank 0: make ``out`` ready for this run; refuse a folder this phase did not write or
    wrote with other settings (unless ``overwrite``: then drop only what it wrote)."""
    marker = out / MARKER
    for stage in out.glob(".stage-*-*") if marker.is_file() else ():  # a killed run's staging
        pid = stage.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            raise UserError(
                f"{out} already holds files predict_ldm did not write; choose an empty or new "
                "out_dir (--set out_dir=...)"
            )
        old = load_json(marker, "predict_ldm marker")
        if old.get("signature") == sig:  # resume: finished cases are kept
            cases = list(dict.fromkeys([*old.get("cases", []), *names]))
            save_json({"signature": sig, "cases": cases}, marker)
            return
        if not overwrite:
            raise UserError(
                f"{out} holds a cohort run with other settings (checkpoints, sampler, samples, "
                "w, seed, window or output format); pass --overwrite to replace it or choose "
                "another out_dir"
            )
        for name in old.get("cases", []):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in SUMMARY_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    save_json({"signature": sig, "cases": names}, marker)  # before any case: what --overwrite
    # may remove later


def _my_cases(
    cfg: Any, manifest: dict, external: ExternalInputs | None, info: DistInfo
) -> tuple[list[str], Iterator[TestCase], dict | None]:
    """(all case names, this rank's cases loaded one at a time, external info or None)."""
    if external is None or not external.given:
        names = list(cfg.cases) if cfg.cases else [
            n for n, c in manifest["cases"].items() if c["split"] == "test"
        ]  # fmt: skip
        mine = names[info.rank :: info.world_size]
        return names, iter_test_cases(cfg.data_dir, mine) if mine else iter(()), None
    _, names, ext = external_cases(external, manifest, cfg.raw, False, "predict_ldm")
    pairs = [(n, Path(p["input"]), p["target"] and Path(p["target"]))
             for n, p in ext["pairs"].items()]  # fmt: skip
    mine = pairs[info.rank :: info.world_size]
    cases = (load_external_case(n, lr, hr, manifest, cfg.raw, external.resample)[0]
             for n, lr, hr in mine)  # fmt: skip
    return names, cases, ext


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
    names, cases, ext_info = _my_cases(cfg, manifest, external, info)
    sig = signature(cfg, window)
    error: Exception | None = None
    if info.is_main:
        try:
            _prepare_out(out, sig, names, overwrite)
        except UserError as e:
            error = e
    barrier(info)
    if error is not None:
        raise error
    if not (out / MARKER).is_file():  # rank 0 refused the folder: its error is the one shown
        raise UserError(f"{out}: not prepared for this run (see the error of rank 0)")
    tuned: dict = {}

    def get_params() -> dict:
        if not tuned:
            tuned.update(tuned_baselines(cfg.data_dir, cfg.tune, device))
        return tuned

    stage = out / f".stage-{info.rank}-{os.getpid()}"
    skipped = 0
    try:
        for i, case in enumerate(cases):
            if (out / case.name / "metrics.json").is_file():
                skipped += 1
                log.info("%s: done in an earlier run, skipped", case.name)
                continue
            shutil.rmtree(stage, ignore_errors=True)
            (stage / case.name).mkdir(parents=True)
            gif = cfg.gif and info.is_main and i == 0
            predict_case(ldm, case, cfg, window, stage, gif=gif, params=get_params)
            shutil.rmtree(out / case.name, ignore_errors=True)  # a partial folder: never ours
            os.replace(stage / case.name, out / case.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    barrier(info)
    if not info.is_main:
        return PhaseResult(f"predict_ldm rank {info.rank}: done", "", {}, [out])
    rows = {n: load_json(out / n / "metrics.json") for n in names}
    text, key, summary = write_summary(out, rows, cfg, ldm, tuned or None, ext_info,
                                       window=list(window), world_size=info.world_size)
    if skipped:
        text += f"\n{skipped} case(s) of rank 0 were done in an earlier run and kept"
    return PhaseResult(text, key, summary, [out])
