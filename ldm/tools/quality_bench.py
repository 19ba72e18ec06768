"""Quality bench: the real phases per model variant, on the demo phantom and on MRI crops.

For each dataset (``phantom``: the demo-sized vessel phantom; ``mri``: non-overlapping 48^3
blocks of nilearn's MNI152 T1 template, blur 1 voxel + Rician noise 4 % of the range, split by
block) and each variant (train_vae_pair overrides of configs/demo; ``diffusion.*`` ones go to
train_diffusion), it runs prepare_data, train_vae_pair, prepare_latents and train_diffusion
through their functions with the same CPU-time budget per network (steps calibrated from the CPU
time of a step; wall cap 8x), then scores the test volumes with predict_ldm's windows
(ldm/tools/quality_scoring.py): Baseline, the tuned filters (BM4D if installed and asked), Restorer,
Oracle, z = 0, shuffled z, LDM one sample, LDM mean of 2 / 4 / 8, w = 0 / 0.5 / 1, each with
PSNR, SSIM, ESR, HFER, FSC, bias and contrast (% of the HR range) and predict seconds; the mean
of 8's calibration and the latent sensitivity S. The ``regression`` variant is plain regression
with the same CPU minutes: the restorer trained for both budgets (the residual autoencoder tiny,
no diffusion), scored as its Restorer row. Generalisation (MRI): the same test blocks resampled
to 0.7 / 1.4 mm voxels (as given and with --resample) and with intensities x0.5 / x2 + shift.
Prints one table per dataset; writes results/benchmark/quality.json. The variants and their
training: ldm/tools/quality_variants.py; the tables: ldm/tools/quality_report.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.core.config import REPO_ROOT, load_config
from ldm.core.errors import UserError, os_error_message
from ldm.core.files import save_json
from ldm.data.dataset import iter_test_cases
from ldm.phases.predict_ldm import PredictConfig
from ldm.tools.quality_report import combine, format_table, summary_table
from ldm.tools.quality_scoring import (
    MRI_DEGRADE,
    classical_params,
    evaluate,
    generalisation_cases,
)
from ldm.tools.quality_variants import VARIANTS, train_variant, variant_configs

DATASETS = ("phantom", "mri")


# --------------------------------------------------------------------------- data


def write_mri_blocks(folder: Path, block: int = 48, min_brain: float = 0.3) -> int:
    """Non-overlapping ``block``^3 crops of the MNI152 1 mm T1 template as .nii.gz files, skipping
    crops with less than ``min_brain`` voxels above 20 % of the maximum; returns their number."""
    import nibabel as nib

    try:
        from nilearn.datasets import load_mni152_template
    except ImportError as e:
        raise UserError(
            f"the mri dataset of the quality bench needs nilearn ({e}): "
            "pip install nilearn, or run --datasets phantom"
        ) from None

    img = load_mni152_template(resolution=1)
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for z in range(0, data.shape[0] - block + 1, block):
        for y in range(0, data.shape[1] - block + 1, block):
            for x in range(0, data.shape[2] - block + 1, block):
                crop = data[z : z + block, y : y + block, x : x + block]
                if (crop > 0.2 * data.max()).mean() < min_brain:
                    continue
                out = nib.Nifti1Image(np.ascontiguousarray(crop), np.eye(4))
                nib.save(out, str(folder / f"mni_{z:03d}_{y:03d}_{x:03d}.nii.gz"))
                n += 1
    return n


def prepare(dataset: str, work: Path) -> Path:
    from ldm.phases.prepare_data import PrepareDataConfig, prepare_data

    out = work / dataset / "data"
    if (out / "manifest.json").is_file():
        return out
    if dataset == "phantom":
        sets = [f"out_dir={out}"]
        cfg = load_config(PrepareDataConfig, REPO_ROOT / "configs/demo/prepare_data.yaml", sets)
    else:
        n = write_mri_blocks(work / "mri" / "blocks")
        print(f"mri: {n} MNI152 blocks of 48^3")
        d = MRI_DEGRADE
        cfg = load_config(PrepareDataConfig, None, [
            f"out_dir={out}", "source=hr_only", f"hr_only.folder={work / 'mri' / 'blocks'}",
            f"degrade.blur_sigma={list(d.blur_sigma)}", f"degrade.downsample={list(d.downsample)}",
            f"degrade.noise={d.noise}", f"degrade.noise_sigma={d.noise_sigma}",
            "patches.background_keep=0.3",
        ])  # fmt: skip
    print(prepare_data(cfg, overwrite=True).text)
    return out


# --------------------------------------------------------------------------- the bench


def check_choices(datasets: list[str], variants: list[str], vae_min: float,
                  diff_min: float) -> None:  # fmt: skip
    """Names and budgets checked before anything trains (a run takes tens of minutes)."""
    for what, given, known in (("dataset", datasets, DATASETS), ("variant", variants, VARIANTS)):
        bad = [n for n in given if n not in known]
        if bad or not given:
            raise UserError(f"unknown {what} {', '.join(bad) or '(none given)'}; "
                            f"choose from {', '.join(known)}")  # fmt: skip
    if vae_min <= 0 or diff_min <= 0:
        raise UserError(f"training budgets must be > 0 minutes, got {vae_min} and {diff_min}")
    for v in variants:  # a stale key stops here, not after minutes of data preparation
        variant_configs(v)


def run(datasets: list[str], variants: list[str], work: Path, vae_min: float, diff_min: float,
        out: Path, with_bm4d: bool = False) -> dict[str, Any]:  # fmt: skip
    check_choices(datasets, variants, vae_min, diff_min)
    report: dict[str, Any] = {"budget_minutes": {"vae": vae_min, "diffusion": diff_min},
                              "threads": torch.get_num_threads(), "results": {}}  # fmt: skip
    if out.is_file():  # several runs (e.g. one per dataset) add to one report
        report["results"] = json.loads(out.read_text()).get("results", {})
    for dataset in datasets:
        data = prepare(dataset, work)
        params = classical_params(data, with_bm4d and dataset == "mri")
        for variant in variants:
            run_dir = work / dataset / variant.replace("+", "_")
            vae_ck, diff_ck, info = train_variant(data, run_dir, variant, vae_min, diff_min)
            ev = evaluate(data, vae_ck, diff_ck, params, general=dataset == "mri")
            report["results"][f"{dataset}/{variant}"] = {**info, **ev, "classical": params}
            save_json(report, out)
            print(format_table(report))
    return report


def profile_generalisation(profile: str = "mri", out: Path | None = None) -> dict[str, Any]:
    """The generalisation settings for the model a profile trained (``run_all --profile``):
    its test cases degraded with its own prepare_data preset (noise relative to the source's
    range, as prepare_data did), scored like the bench's models; written to ``out``."""
    from ldm.data.mni152 import load_template
    from ldm.phases.prepare_data import PrepareDataConfig

    folder = REPO_ROOT / "configs" / profile
    prep = load_config(PrepareDataConfig, folder / "prepare_data.yaml")
    pred = load_config(PredictConfig, folder / "predict_ldm.yaml")
    data = prep.out_dir
    if not (Path(data) / "manifest.json").is_file():
        raise UserError(f"{data}: no dataset; run scripts/run_all.py --profile {profile} first")
    data_range = None
    if prep.source == "mni152":
        template = load_template(prep.mni152.resolution)[0]
        data_range = float(template.max()) - float(template.min())
    n = sum(1 for _ in iter_test_cases(data))
    cases = generalisation_cases(data, n, prep.degrade, data_range)
    params = classical_params(data, with_bm4d=False)
    ev = evaluate(data, pred.vae_checkpoint, pred.diffusion_checkpoint, params, cases, pred)
    report = {"results": {f"{profile} profile model": {**ev, "classical": params}}}
    if out is not None:
        save_json(report, out)
    return report


def bench_case(
    datasets: str = "phantom,mri",
    variants: str = ",".join(VARIANTS),
    vae_minutes: float = 3.0,
    diffusion_minutes: float = 2.0,
) -> dict[str, Any]:
    """``ldm3d benchmark --only quality``: the whole bench into results/benchmark/quality.json."""
    out = Path("results/benchmark/quality.json").resolve()
    report = run(datasets.split(","), variants.split(","), out.parent / "quality_work",
                 vae_minutes, diffusion_minutes, out)  # fmt: skip
    return {"out": str(out), "summary": f"written {out}\n" + format_table(report)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="phantom,mri", help=f"of {', '.join(DATASETS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--work", type=Path, default=Path("results/benchmark/quality_work"))
    p.add_argument("--vae-minutes", type=float, default=3.0,
                   help="CPU minutes of the first stage (regression: + the diffusion's)")
    p.add_argument("--diffusion-minutes", type=float, default=2.0, help="CPU minutes, diffusion")
    p.add_argument("--out", type=Path, help="default results/benchmark/quality.json "
                   "(--profile-model: quality_<PROFILE>_profile.json)")
    p.add_argument("--bm4d", action="store_true", help="also BM4D on MRI (slow)")
    p.add_argument("--combine", nargs="+", type=Path, help="only merge these reports into --out")
    p.add_argument("--profile-model", metavar="PROFILE", help="no training: score the model "
                   "run_all trained for PROFILE (e.g. mri) on the generalisation settings")
    a = p.parse_args(argv)
    try:
        _main(a)
    except (UserError, OSError) as e:  # one line on stderr, exit code 2, as the phases
        message = os_error_message(e) if isinstance(e, OSError) else str(e)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(a: argparse.Namespace) -> None:
    bench = Path("results/benchmark")
    if a.profile_model:
        out = a.out or bench / f"quality_{a.profile_model}_profile.json"
        print(summary_table(profile_generalisation(a.profile_model, out)))
        return
    a.out = a.out or bench / "quality.json"
    if a.combine:
        print(summary_table(combine(a.combine, a.out)))
        return
    run(a.datasets.split(","), a.variants.split(","), a.work, a.vae_minutes,
        a.diffusion_minutes, a.out, a.bm4d)  # fmt: skip


if __name__ == "__main__":
    main()
