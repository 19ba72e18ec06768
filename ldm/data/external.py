"""Volumes from outside the dataset for evaluate_psnr and predict_ldm (no retraining).

``--input LR [--target HR]`` (one pair) or ``--folder DIR --input-glob G [--target-glob G]``
(many pairs, matched by what the ``*`` of each glob stands for). Any format ``load_volume``
reads; a folder holding a DICOM series (or ``folder@SeriesInstanceUID``) counts as a volume
wherever a file does, and glob matches that are folders are DICOM inputs. Normalised exactly as
at inference: the manifest's LR percentiles of the LR alone, the same map applied to HR. The
input's voxel spacing (from its header) is compared with the training spacing in the manifest;
with ``resample`` the models run on a copy resampled to the training spacing and their outputs
are resampled back to the input grid (docs/design.md, "External volumes").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldm.core.errors import DataError, UserError
from ldm.data.dataset import VolumeCase
from ldm.data.io import RawSpec, VolumeMeta, load_volume
from ldm.data.normalize import NormalizeConfig, normalisation
from ldm.data.sources import case_name, glob_keys, pair_by_globs

log = logging.getLogger(__name__)

SPACING_TOLERANCE = 0.2  # relative difference per axis above which the spacing warning shows


@dataclass(frozen=True)
class ExternalInputs:
    """What the command line named: one pair, or a folder with globs; and --resample."""

    input: Path | None = None
    target: Path | None = None
    folder: Path | None = None
    input_glob: str | None = None
    target_glob: str | None = None
    resample: bool = False

    @property
    def given(self) -> bool:
        """True when any external option was given (a lone --target or --input-glob too: the
        checks then refuse it instead of running on the test set)."""
        named = (self.input, self.target, self.folder, self.input_glob, self.target_glob)
        return any(v is not None for v in named) or self.resample


@dataclass
class ExternalCase(VolumeCase):
    """A VolumeCase read from user files; models may run on a resampled copy (``model_shape``)."""

    lr_path: Path | None = None
    hr_path: Path | None = None
    spacing: tuple[float, ...] = ()  # of the input, from its header; () = unknown
    model_shape: tuple[int, ...] | None = None  # grid at the training spacing; None = as input

    def to_model(self, x: np.ndarray) -> np.ndarray:
        return x if self.model_shape is None else resize(x, self.model_shape)

    def from_model(self, x: np.ndarray) -> np.ndarray:
        return x if self.model_shape is None else resize(x, tuple(self.lr.shape))


def resize(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Cubic B-spline resampling onto ``shape`` (same extent; skimage.transform.resize, order
    3); shrinking axes are Gaussian pre-filtered with sigma = (factor - 1) / 2 voxels against
    aliasing. Trilinear lost 1.5-4.3 % contrast on a round trip of an HR block between 1.4 mm and
    the 1 mm grid, cubic 0.1-0.25 % (docs/design.md "External volumes")."""
    from skimage.transform import resize as sk_resize

    shape = tuple(int(n) for n in shape)
    shrink = any(n_out < n_in for n_in, n_out in zip(x.shape, shape))
    out = sk_resize(np.asarray(x, dtype=np.float32), shape, order=3, mode="edge",
                    anti_aliasing=shrink, preserve_range=True)  # fmt: skip
    return out.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# which files


def _check_spec(spec: ExternalInputs, need_target: bool, command: str) -> None:
    if spec.input is not None and spec.folder is not None:
        raise UserError(f"{command}: give either --input (one volume) or --folder, not both")
    if spec.folder is None and (spec.input_glob or spec.target_glob):
        raise UserError(f"{command}: --input-glob/--target-glob need --folder DIR")
    if spec.input is None and spec.target is not None:
        raise UserError(f"{command}: --target needs --input (the LR volume it belongs to)")
    if spec.resample and spec.input is None and spec.folder is None:
        raise UserError(f"{command}: --resample needs --input (or --folder with --input-glob)")
    if spec.folder is not None and not spec.input_glob:
        raise UserError(f"{command}: --folder needs --input-glob, e.g. --input-glob '*_lr.nii.gz'")
    if need_target and spec.target is None and spec.target_glob is None:
        raise UserError(
            f"{command} scores against a reference: add --target HR (or --target-glob with "
            f"--folder); to enhance a volume without one, use predict_ldm --input"
        )


def named_pairs(
    spec: ExternalInputs, need_target: bool, command: str
) -> list[tuple[str, Path, Path | None]]:
    """(case name, LR path, HR path or None) for every pair the options name; checked first."""
    _check_spec(spec, need_target, command)
    if spec.input is not None:
        return [(case_name(Path(spec.input)), Path(spec.input), spec.target)]
    folder = Path(spec.folder)
    if not folder.is_dir():
        raise DataError(f"--folder not found: {folder} (check the path)")
    if spec.target_glob is None:
        return [(k, p, None) for k, p in glob_keys(folder, spec.input_glob, "--input-glob").items()]
    flags = ("--input-glob", "--target-glob")
    return pair_by_globs(folder, spec.input_glob, spec.target_glob, flags)


# ---------------------------------------------------------------------------------------------
# reading one pair


def _spacing_text(s: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in s) + ") mm"


def spacing_check(
    path: Path, spacing: tuple[float, ...], training: list[float] | None, resample: bool
) -> str | None:
    """The warning line when ``spacing`` differs from ``training`` by more than 20% on an axis;
    None when it does not, or when either is unknown (old manifests, .npy inputs)."""
    if not spacing or not training or len(spacing) != len(training):
        return None
    if all(abs(s / t - 1) <= SPACING_TOLERANCE for s, t in zip(spacing, training)):
        return None
    what = (
        "resampled to the training spacing for the models, outputs resampled back (--resample)"
        if resample
        else "--resample runs the models at the training spacing and resamples the outputs "
        "back (which is better depends on the scan: compare both on a pair with HR)"
    )
    return (
        f"warning: {path}: voxel spacing {_spacing_text(spacing)} differs from the training "
        f"spacing {_spacing_text(tuple(training))} by more than "
        f"{SPACING_TOLERANCE:.0%}; {what}"
    )


def _load_3d(path: Path, raw: RawSpec, flag: str) -> tuple[np.ndarray, VolumeMeta]:
    data, meta = load_volume(path, raw)  # missing, unreadable or NaN -> DataError naming it
    if data.ndim != 3:
        raise DataError(f"{path}: {flag} must be a 3D volume, got shape {data.shape}")
    return data, meta


def load_external_case(
    name: str,
    lr_path: Path,
    hr_path: Path | None,
    manifest: dict[str, Any],
    raw: RawSpec,
    resample: bool = False,
) -> tuple[ExternalCase, str | None]:
    """One external case, normalised as at inference, and its spacing warning (or None)."""
    lr, meta = _load_3d(Path(lr_path), raw, "--input")
    hr = None
    spacing = tuple(meta.spacing)
    if hr_path is not None:
        hr, hr_meta = _load_3d(Path(hr_path), raw, "--target")
        if hr.shape != lr.shape:
            raise DataError(
                f"{hr_path}: target shape {hr.shape} != input shape {lr.shape} of {lr_path}; "
                f"the pair must be on one grid (resample the LR onto the HR grid first)"
            )
        spacing = spacing or tuple(hr_meta.spacing)
        if hr.size and float(hr.max()) == float(hr.min()):
            raise DataError(
                f"{hr_path}: the --target volume is constant (every voxel {float(hr.flat[0]):g}), "
                f"so PSNR and SSIM against it are undefined; check that it is the HR scan of "
                f"{lr_path}"
            )
    n = manifest["normalization"]  # the LR-percentile map of prepare_data, from the LR alone
    cfg = NormalizeConfig(n["low_percentile"], n["high_percentile"])
    low, high = normalisation(lr, cfg, str(lr_path))
    training = manifest.get("spacing")  # None in manifests written before it was recorded
    warning = spacing_check(Path(lr_path), spacing, training, resample)
    model_shape = None
    if resample:
        if not spacing or not training:
            why = "the manifest has no training spacing (rerun prepare_data)" if spacing else (
                f"{lr_path} has no voxel spacing in its header (.npy or headerless .raw)")
            raise UserError(f"--resample needs both voxel spacings, but {why}")
        model_shape = tuple(
            max(1, round(n_vox * s / t)) for n_vox, s, t in zip(lr.shape, spacing, training)
        )
        log.info("%s: %s resampled to %s at the training spacing", name, lr.shape, model_shape)
    norm = lambda x: ((x - low) / (high - low)).astype(np.float32)  # noqa: E731
    case = ExternalCase(
        name, norm(lr), None if hr is None else norm(hr), low, high, meta,
        lr_path=Path(lr_path), hr_path=None if hr_path is None else Path(hr_path),
        spacing=spacing, model_shape=model_shape,
    )  # fmt: skip
    return case, warning


def check_external_files(
    spec: ExternalInputs, manifest: dict[str, Any], raw: RawSpec, need_target: bool, command: str
) -> tuple[list[tuple[str, Path, Path | None]], list[str]]:
    """Check every file of ``spec`` up front (readable, 3D, shapes match) and collect the
    spacing warnings; returns the pairs (loaded again one at a time later) and the warnings."""
    pairs = named_pairs(spec, need_target, command)
    warnings = []
    for name, lr_path, hr_path in pairs:
        _, warning = load_external_case(name, lr_path, hr_path, manifest, raw, spec.resample)
        if warning:
            log.warning(warning)
            warnings.append(warning)
    return pairs, warnings


def external_cases(
    spec: ExternalInputs, manifest: dict[str, Any], raw: RawSpec, need_target: bool, command: str
) -> tuple[Iterator[ExternalCase], list[str], dict[str, Any]]:
    """The cases a command's --input/--target/--folder name: (cases, loaded one at a time on
    iteration; their names; the external info for metrics.json, warnings included)."""
    pairs, warnings = check_external_files(spec, manifest, raw, need_target, command)
    names = [name for name, _, _ in pairs]
    if len(set(names)) != len(names):
        what = "external pairs" if need_target else "external inputs"
        raise DataError(f"{what}: case names are not unique: {names}")
    cases = (
        load_external_case(name, lr, hr, manifest, raw, spec.resample)[0]
        for name, lr, hr in pairs
    )
    info = {
        "pairs": {n: {"input": str(lr), "target": hr and str(hr)} for n, lr, hr in pairs},
        "resample": spec.resample,
        "training_spacing": manifest.get("spacing"),
        "warnings": warnings,
    }
    return cases, names, info
