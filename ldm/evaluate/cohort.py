"""The cases of a cohort run (predict_ldm, evaluate_psnr): their names, where each comes from,
a loader of one case by name, and the tuned baselines fetched once per process. The folder
logic (sharding, staged commits, resume, the final merge) is ``ldm.core.cohort``;
docs/design.md, "Cohort inference"."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ldm.data.dataset import VolumeCase, checked_test_cases, iter_test_cases
from ldm.data.external import ExternalInputs, external_cases, load_external_case
from ldm.data.io import RawSpec
from ldm.evaluate.baselines import TuneConfig, tuned_baselines
from ldm.evaluate.scores_json import restore_non_finite


def cohort_cases(
    data_dir: Path, names: Sequence[str] | None, manifest: dict[str, Any],
    external: ExternalInputs | None, raw: RawSpec, need_target: bool, command: str,
) -> tuple[dict[str, str], Callable[[str], VolumeCase], dict[str, Any] | None]:  # fmt: skip
    """(case name -> its source, a loader of one case by name, the external info for
    metrics.json or None). Without external inputs: the test cases ``names`` (all when None)
    of ``data_dir``, source = the dataset folder; else the external pairs, every file checked
    here (ldm/data/external.py), source = the input and target files. A kept case of an
    earlier run must have the same source."""
    if external is None or not external.given:
        names = checked_test_cases(data_dir, manifest, names or None)
        source = str(Path(data_dir).resolve())
        return dict.fromkeys(names, source), lambda n: next(iter_test_cases(data_dir, [n])), None
    _, names, ext = external_cases(external, manifest, raw, need_target, command)
    pairs = {n: (Path(p["input"]), Path(p["target"]) if p["target"] else None)
             for n, p in ext["pairs"].items()}  # fmt: skip
    sources = {n: " | ".join(str(p.resolve()) for p in pair if p) for n, pair in pairs.items()}

    def load(name: str) -> VolumeCase:
        lr, hr = pairs[name]
        return load_external_case(name, lr, hr, manifest, raw, external.resample)[0]

    return sources, load, ext


class LazyTuned:
    """The tuned classical baselines, tuned (or read from the dataset's cache) when first
    needed: ``params()``."""

    def __init__(self, data_dir: Path, tune: TuneConfig, device: torch.device) -> None:
        self.data_dir, self.tune, self.device = data_dir, tune, device
        self._params: dict[str, Any] | None = None

    def __call__(self) -> dict[str, Any]:
        if self._params is None:
            self._params = tuned_baselines(self.data_dir, self.tune, self.device)
        return self._params


def is_cohort_run(external: ExternalInputs | None) -> bool:
    """A folder of inputs (``--folder``) or any run under torchrun is a cohort run: sharded
    over the ranks, resumable per case."""
    folder_run = external is not None and external.folder is not None
    return folder_run or int(os.environ.get("WORLD_SIZE", "1")) > 1


def case_scores(cohort: Any, names: Sequence[str], work: Callable[[str, Path], object]
                ) -> dict[str, Any] | None:  # fmt: skip
    """``cohort.run(names, work)`` (``ldm.core.cohort``) with each case's metrics.json read back
    as scores (non-finite values restored, ``scores_json``); None on ranks > 0."""
    rows = cohort.run(names, work)
    return None if rows is None else {n: restore_non_finite(r) for n, r in rows.items()}
