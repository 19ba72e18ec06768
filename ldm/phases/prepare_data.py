"""prepare_data: cases -> normalised LR/HR volumes split by case, and the patch positions.

Layout written under ``out_dir`` (see README "Data formats"):
  manifest.json                       everything needed to read the rest back
  config.yaml                         the resolved config of this run
  {train,val,test}/patches.json       [{"case": name, "start": [z, y, x]}, ...] one per patch:
                                      the patches are crops of the volumes below, read on access
  {train,val,test}/volumes/<case>_{lr,hr}.npy  whole normalised volumes, float32
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ldm.core.config import save_config
from ldm.core.errors import ConfigError, DataError
from ldm.core.files import save_json, staged_dir
from ldm.core.outdir import check_out_dir, config_inputs
from ldm.core.registry import PhaseResult
from ldm.data.dataset import MANIFEST_VERSION, SPLITS
from ldm.data.degrade import DegradeConfig
from ldm.data.io import RawSpec
from ldm.data.mni152 import MNI152Source
from ldm.data.normalize import NormalizeConfig, normalisation
from ldm.data.sources import SOURCES, Case, HROnlySource, PairsSource, PhantomSource, iter_cases
from ldm.evaluate.metrics import psnr

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SplitConfig:
    """Fractions of cases for validation and test (each at least one case when > 0)."""

    val_fraction: float = 0.15
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ConfigError(f"split.{name} must be in [0, 1), got {v}")


@dataclass(frozen=True)
class PatchConfig:
    size: tuple[int, int, int] = (32, 32, 32)
    stride: tuple[int, int, int] = (16, 16, 16)
    foreground_threshold: float = 0.4  # normalised HR intensity that counts as structure
    min_foreground: float = 0.01  # a patch is foreground if this fraction is above threshold
    background_keep: float = 0.1  # fraction of the other patches kept (seeded)

    def __post_init__(self) -> None:
        if min(self.size) < 1 or min(self.stride) < 1:
            raise ConfigError(
                f"patches.size and stride must be >= 1, got {self.size}, {self.stride}"
            )
        if not 0 <= self.background_keep <= 1:
            raise ConfigError(
                f"patches.background_keep must be in [0, 1], got {self.background_keep}"
            )


@dataclass(frozen=True)
class PrepareDataConfig:
    out_dir: Path = Path("dataset/vessel_phantom")
    seed: int = 0
    source: str = "phantom"  # phantom | pairs | hr_only | mni152
    phantom: PhantomSource = field(default_factory=lambda: PhantomSource(num_cases=16))
    pairs: PairsSource = field(default_factory=PairsSource)
    hr_only: HROnlySource = field(default_factory=HROnlySource)
    mni152: MNI152Source = field(default_factory=MNI152Source)  # nilearn's T1 template
    raw: RawSpec = field(default_factory=RawSpec)  # for .raw files without a .mhd header
    degrade: DegradeConfig = field(default_factory=DegradeConfig)  # phantom, hr_only, mni152
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")


def split_cases(n: int, split: SplitConfig, seed: int) -> list[str]:
    """Seeded assignment of case indices to train/val/test; never a case on two sides."""
    n_test = max(1, round(n * split.test_fraction)) if split.test_fraction > 0 else 0
    n_val = max(1, round(n * split.val_fraction)) if split.val_fraction > 0 else 0
    if n_test == 0:
        raise ConfigError("split.test_fraction is 0: the test set would be empty; use e.g. 0.2")
    if n - n_test - n_val < 1:
        raise ConfigError(
            f"split leaves no training case: {n} cases, {n_val} val, {n_test} test; "
            "add cases or lower split.val_fraction / split.test_fraction"
        )
    order = np.random.default_rng(seed).permutation(n)
    which = ["train"] * n
    for i in order[:n_test]:
        which[i] = "test"
    for i in order[n_test : n_test + n_val]:
        which[i] = "val"
    return which


def patch_starts(
    shape: tuple[int, ...], size: tuple[int, ...], stride: tuple[int, ...]
) -> list[tuple[int, ...]]:
    """Patch corners on a regular grid; the last patch along each axis is flush with the edge."""
    axes = []
    for s, p, st in zip(shape, size, stride):
        starts = list(range(0, s - p + 1, st))
        if starts[-1] != s - p:
            starts.append(s - p)
        axes.append(starts)
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape))
    return [tuple(int(v) for v in row) for row in grid]


def _select_patches(
    lr: np.ndarray, hr: np.ndarray, cfg: PatchConfig, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[int, ...]], int]:
    lr_p, hr_p, starts, n_fg = [], [], [], 0
    for start in patch_starts(hr.shape, cfg.size, cfg.stride):
        sl = tuple(slice(s, s + p) for s, p in zip(start, cfg.size))
        fg = float((hr[sl] > cfg.foreground_threshold).mean()) >= cfg.min_foreground
        if fg or rng.random() < cfg.background_keep:
            lr_p.append(lr[sl])
            hr_p.append(hr[sl])
            starts.append(start)
            n_fg += fg
    return lr_p, hr_p, starts, n_fg


def prepare_data(cfg: PrepareDataConfig, *, overwrite: bool = False) -> PhaseResult:
    """Build the dataset folder ``cfg.out_dir`` (written to a temp folder, then renamed)."""
    t0 = time.perf_counter()
    inputs = config_inputs(cfg)
    check_out_dir(cfg.out_dir, "prepare_data", overwrite, inputs)
    n, cases = iter_cases(
        cfg.source, cfg.phantom, cfg.pairs, cfg.hr_only, cfg.degrade, cfg.raw, cfg.seed,
        mni152=cfg.mni152,
    )
    which = split_cases(n, cfg.split, cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    patches = {s: {"index": [], "fg": 0} for s in SPLITS}
    case_info: dict[str, dict] = {}
    baseline: dict[str, list[float]] = {s: [] for s in SPLITS}
    replaced_latents = overwrite and (cfg.out_dir / "latents").is_dir()
    with staged_dir(cfg.out_dir, overwrite, phase="prepare_data", inputs=inputs) as out:
        (out / "test" / "volumes").mkdir(parents=True)
        for i, case in enumerate(tqdm(cases, total=n, desc="prepare_data", unit="case")):
            split = which[i]
            if case.name in case_info:
                raise DataError(
                    f"{_source_of(case)}: case name {case.name!r} is already taken by "
                    f"{_origin_file(case_info[case.name]['origin'], case.name)}; "
                    "rename one of the two files"
                )
            info = _add_case(case, split, cfg, rng, patches[split], out)
            case_info[case.name] = info
            baseline[split].append(info["baseline_psnr"])
        splits = {}
        for s in SPLITS:
            splits[s] = _write_split(out / s, s, patches[s], cfg.patches.size)
        manifest = {
            "format_version": MANIFEST_VERSION,
            "created_by": "prepare_data",
            "source": cfg.source,
            "spatial_dims": 3,
            "patch_size": list(cfg.patches.size),
            "patch_stride": list(cfg.patches.stride),
            "normalization": {
                "kind": "lr_percentile",
                "low_percentile": cfg.normalize.low_percentile,
                "high_percentile": cfg.normalize.high_percentile,
                "formula": "x_norm = (x - low) / (high - low); x = x_norm * (high - low) + low",
            },
            "splits": splits,
            "cases": case_info,
            "spacing": training_spacing(case_info),
        }
        save_json(manifest, out / "manifest.json")
        save_config(cfg, out / "config.yaml")
    result = _summary(cfg, splits, baseline, time.perf_counter() - t0)
    if replaced_latents:
        result.text += (
            f"\nreplaced the old dataset including {cfg.out_dir / 'latents'}: rerun prepare_latents"
        )
    return result


def _origin_file(origin: dict[str, str], name: str) -> str:
    """The file a case came from (its LR file for pairs), for error messages."""
    return origin.get("lr") or origin.get("hr") or f"phantom case {name}"


def _source_of(case: Case) -> str:
    return _origin_file(case.origin, case.name)


def training_spacing(case_info: dict[str, dict]) -> list[float] | None:
    """Voxel spacing of the training data from the HR headers: the per-axis median over the
    train cases (phantom: 1 mm); None when no train case has one (e.g. .npy volumes). External
    inputs are compared with it (ldm/data/external.py)."""
    spacings = [c["meta"]["spacing"] for c in case_info.values()
                if c["split"] == "train" and len(c["meta"].get("spacing") or ()) == 3]  # fmt: skip
    return [float(v) for v in np.median(spacings, axis=0)] if spacings else None


def _add_case(case: Case, split: str, cfg: PrepareDataConfig, rng, bucket: dict, out: Path) -> dict:
    if case.hr.size and float(case.hr.max()) == float(case.hr.min()):
        raise DataError(
            f"{case.origin.get('hr') or _source_of(case)}: the HR volume of case {case.name} is "
            f"constant (every voxel {float(case.hr.flat[0]):g}): nothing to learn or score "
            f"against; check that file, or remove the case from the source"
        )
    if any(p > s for p, s in zip(cfg.patches.size, case.hr.shape)):
        raise ConfigError(
            f"{_source_of(case)}: volume shape {case.hr.shape} is smaller than patches.size "
            f"{tuple(cfg.patches.size)}; use a smaller patches.size or drop this case"
        )
    low, high = normalisation(case.lr, cfg.normalize, _source_of(case))
    lr = (case.lr - low) / (high - low)
    hr = (case.hr - low) / (high - low)
    _, _, starts, n_fg = _select_patches(lr, hr, cfg.patches, rng)
    bucket["index"] += [{"case": case.name, "start": list(s)} for s in starts]
    bucket["fg"] += n_fg
    info = {
        "split": split,
        "shape": list(case.hr.shape),
        "norm": {"low": low, "high": high},
        "meta": case.meta.to_dict(),
        "origin": case.origin,
        "num_patches": len(starts),
        "baseline_psnr": psnr(case.lr, case.hr),
    }
    # every case kept once, normalised; the patches are crops of it (dataset.PatchArray)
    (out / split / "volumes").mkdir(parents=True, exist_ok=True)
    info["volume"] = {}
    for side, vol in (("lr", lr), ("hr", hr)):
        np.save(out / split / "volumes" / f"{case.name}_{side}.npy", vol.astype(np.float32))
        info["volume"][side] = f"{split}/volumes/{case.name}_{side}.npy"
    return info


def _write_split(folder: Path, name: str, bucket: dict, size: tuple[int, ...]) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    save_json(bucket["index"], folder / "patches.json")
    return {
        "num_patches": len(bucket["index"]),
        "num_foreground": bucket["fg"],
        "index": f"{name}/patches.json",
    }


def _summary(cfg: PrepareDataConfig, splits: dict, baseline: dict, seconds: float) -> PhaseResult:
    lines = [f"prepare_data: {cfg.source} -> {cfg.out_dir}"]
    lines.append(
        f"{'split':<6} {'cases':>5} {'patches':>8} {'foreground':>10} {'Baseline PSNR':>14}"
    )
    metrics: dict = {"seconds": seconds}
    for s in SPLITS:
        b = baseline[s]
        mean = float(np.mean(b)) if b else float("nan")
        lines.append(
            f"{s:<6} {len(b):>5} {splits[s]['num_patches']:>8} {splits[s]['num_foreground']:>10} "
            f"{mean:>11.2f} dB"
        )
        metrics[s] = {"cases": len(b), "patches": splits[s]["num_patches"], "baseline_psnr": mean}
    lines.append(f"written in {seconds:.1f} s")
    n_cases = sum(len(b) for b in baseline.values())
    key = f"{n_cases} cases, {splits['train']['num_patches']} train patches"
    return PhaseResult("\n".join(lines), key, metrics, [cfg.out_dir])
