"""Quality bench: the real phases per model variant, on the demo phantom and on MRI crops.

For each dataset (``phantom``: the demo-sized vessel phantom; ``mri``: non-overlapping 48^3
blocks of nilearn's MNI152 T1 template, blur 1 voxel + Rician noise 4 % of the range, split by
block) and each variant (train_vae_pair overrides; ``diffusion.*`` ones go to train_diffusion),
it runs prepare_data, train_vae_pair, prepare_latents and train_diffusion through their
functions with the same CPU-time budget per network (steps calibrated from the CPU time of a
step; wall cap 8x), then scores the test volumes with predict_ldm's windows: Baseline, tuned
Gaussian / heat (and BM4D if installed), VAE result, VAE ceiling decode(z_HR, LR),
decode(0, LR), and the LDM from noise and from the noised LR latent. Generalisation (MRI): the
same test blocks resampled to 0.7 / 1.4 mm voxels (as given and with --resample) and with
intensities x0.5 / x2 + shift. Metrics: PSNR, SSIM (original units), bias and contrast
(ldm.metrics.intensity_fit) in % of the HR range. Writes results/benchmark/quality.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.cli import os_error_message
from ldm.config import REPO_ROOT, load_config
from ldm.data.dataset import iter_test_cases, load_manifest
from ldm.errors import UserError
from ldm.files import save_json
from ldm.optim import TrainConfig, timed_step
from ldm.phases.predict_ldm import PredictConfig
from ldm.quality_scoring import MRI_DEGRADE, classical_params, evaluate, generalisation_cases

VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "lr_skip+residual": ["model.lr_skip=true", "model.residual=true"],
    "lr_skip+residual+aug": ["model.lr_skip=true", "model.residual=true",
                             "augment.flips=true", "augment.permute=true",
                             "augment.scale=0.3", "augment.shift=0.1", "grad_weight=0.5"],
    # lever 1: f = 2 and 8 latent channels (as many numbers as voxels): room for the detail
    "lr_skip+residual+f2": ["model.lr_skip=true", "model.residual=true",
                            "model.channels=[16, 32]", "model.latent_channels=8"],
    # lever 3 (default: the diffusion learns the residual z_HR - z_LR); its loser, x_0 = z_HR
    # (diffusion.* keys go to train_diffusion, SHARED_KEYS to both)
    "lr_skip+residual+latent_diffusion": ["model.lr_skip=true", "model.residual=true",
                                          "diffusion.target=latent"],
    # both networks trained in float32 on CPU: the loser of train.amp_cpu (default auto: bf16
    # autocast on CPUs with bf16 instructions, 1.3x the steps in the same CPU time)
    "lr_skip+residual+fp32": ["model.lr_skip=true", "model.residual=true", "train.amp_cpu=none"],
}  # fmt: skip
SHARED_KEYS = ("train.amp",)  # variant overrides that go to both training phases
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


# --------------------------------------------------------------------------- training


def _seconds_per_step(model: torch.nn.Module, loss_fn, train: TrainConfig,
                      reps: int = 3) -> float:  # fmt: skip
    """CPU seconds of this process per training step (median of ``reps`` after a warm-up), at
    the run's precision: on a shared, loaded machine wall-clock budgets would measure the
    neighbours, not the model."""
    step = timed_step(model, lambda: loss_fn(model), torch.device("cpu"), train)
    times = []
    for i in range(reps + 1):
        t0 = time.process_time()
        step()
        if i:
            times.append(time.process_time() - t0)
    return float(np.median(times))


def _calibrated_steps(model, loss_fn, minutes: float, train: TrainConfig) -> int:
    """Steps that fit ``minutes`` of CPU time at the measured speed (~10 % kept for validation)."""
    return max(20, int(0.9 * 60 * minutes / _seconds_per_step(model, loss_fn, train)))


WALL_CAP = 8.0  # train.max_minutes = WALL_CAP x the CPU budget: a cap for a very loaded machine


def train_variant(data: Path, run: Path, overrides: list[str], vae_min: float, diff_min: float):
    from ldm.nets import UNet3d, VAE3d
    from ldm.phases.prepare_latents import PrepareLatentsConfig, prepare_latents
    from ldm.phases.train_diffusion import TrainDiffusionConfig, train_diffusion
    from ldm.phases.train_vae_pair import TrainVAEConfig, train_vae_pair

    demo = REPO_ROOT / "configs" / "demo"
    vae_ck = run / "vae" / "best.pt"
    diffusion_sets = [o for o in overrides if o.startswith(("diffusion.", *SHARED_KEYS))]
    overrides = [o for o in overrides if not o.startswith("diffusion.")]
    sets = [f"data_dir={data}", f"out_dir={run / 'vae'}", *overrides]
    cfg = load_config(TrainVAEConfig, demo / "train_vae_pair.yaml", sets)
    patch = load_manifest(data)["patch_size"]
    b = cfg.train.batch_size
    x = torch.rand(2 * b, 1, *patch)
    steps = _calibrated_steps(VAE3d(cfg.model), lambda m: m(x, lr=x)[0].abs().mean(), vae_min,
                              cfg.train)  # fmt: skip
    every = max(10, steps // 4)
    cfg = replace(cfg, train=replace(cfg.train, steps=steps, max_minutes=WALL_CAP * vae_min,
                                     val_every=every, save_every=every))  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    vae = train_vae_pair(cfg, overwrite=True)
    vae_s, vae_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(vae.text)
    lat = run / "latents"
    prepare_latents(
        load_config(
            PrepareLatentsConfig,
            None,
            [f"data_dir={data}", f"vae_checkpoint={vae_ck}", f"out_dir={lat}"],
        ),
        overwrite=True,
    )
    sets = [f"data_dir={data}", f"latents_dir={lat}", f"vae_checkpoint={vae_ck}",
            f"out_dir={run / 'diffusion'}"]  # fmt: skip
    vae_model = cfg.model
    lc, f = vae_model.latent_channels, vae_model.downsample_factor
    sets += [f"model.{k}={lc}" for k in ("in_channels", "out_channels", "cond_channels")]
    sets += diffusion_sets
    dcfg = load_config(TrainDiffusionConfig, demo / "train_diffusion.yaml", sets)
    c = dcfg.model
    z = torch.randn(dcfg.train.batch_size, c.in_channels, *(p // f for p in patch))
    t = torch.zeros(z.shape[0], dtype=torch.long)
    steps = _calibrated_steps(UNet3d(c), lambda m: m(z, t, cond=z).square().mean(), diff_min,
                              dcfg.train)  # fmt: skip
    every = max(10, steps // 3)
    dcfg = replace(dcfg, train=replace(dcfg.train, steps=steps, max_minutes=WALL_CAP * diff_min,
                                       val_every=every, save_every=every))  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    diff = train_diffusion(dcfg, overwrite=True)
    diff_s, diff_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(diff.text)
    return vae_ck, run / "diffusion" / "best.pt", {
        "vae_val": vae.metrics, "diffusion_val": diff.metrics,
        "train_minutes": (vae_s + diff_s) / 60, "train_cpu_minutes": (vae_cpu + diff_cpu) / 60,
        "steps": {"vae": vae.metrics["step"], "diffusion": diff.metrics["step"]},
    }  # fmt: skip


# --------------------------------------------------------------------------- the bench


DATASETS = ("phantom", "mri")


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
            vae_ck, diff_ck, info = train_variant(data, run_dir, VARIANTS[variant], vae_min,
                                                  diff_min)  # fmt: skip
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
    ev = evaluate(data, pred.vae_checkpoint, pred.diffusion_checkpoint, params, cases)
    report = {"results": {f"{profile} profile model": {**ev, "classical": params}}}
    if out is not None:
        save_json(report, out)
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'dataset/variant':<34}{'setting':<22}{'method':<28}{'PSNR':>7}{'SSIM':>7}"
             f"{'bias%':>7}{'contr%':>8}"]  # fmt: skip
    for key, r in report["results"].items():
        lines.append(
            f"{key}: train {r['train_cpu_minutes']:.1f} CPU min ({r['train_minutes']:.1f} "
            f"wall), steps {r['steps']}, predict s "
            + ", ".join(f"{k} {v:.0f}" for k, v in r["predict_seconds"].items())
        )
        for setting, methods in r["scores"].items():
            for m, s in methods.items():
                lines.append(f"{'':<34}{setting:<22}{m:<28}{s['psnr']:>7.2f}{s['ssim']:>7.3f}"
                             f"{s['bias_pct']:>7.2f}{s['contrast_pct']:>8.2f}")  # fmt: skip
    return "\n".join(lines)


def summary_table(report: dict[str, Any]) -> str:
    """One line per dataset/variant: the test-set PSNR/SSIM of every method side by side, the
    training CPU minutes and the LDM's predict seconds; then generalisation PSNRs (MRI)."""
    lines = []
    for key, r in report["results"].items():
        test = r["scores"]["test"]
        trained = (f"train {r['train_cpu_minutes']:.1f} CPU min / {r['train_minutes']:.1f} "
                   f"wall min, steps {r['steps']}, ") if r.get("steps") else ""
        lines.append(f"{key}  ({trained}{r['num_test']} test volumes)")
        for m, sc in test.items():
            sec = r["predict_seconds"].get(m)
            extra = f"  predict {sec:.0f} s wall, every setting" if sec else ""
            lines.append(f"    {m:<28}{sc['psnr']:7.2f} dB {sc['ssim']:6.3f}  bias "
                         f"{sc['bias_pct']:+5.2f}%  contrast {sc['contrast_pct']:+6.2f}%"
                         + extra)  # fmt: skip
        others = [s for s in r["scores"] if s != "test"]
        if others:
            keep = [m for m in test if not m.startswith(("heat", "VAE ceiling", "decode(0"))]
            lines.append("    generalisation PSNR: " + " | ".join(keep))
            for st in others:
                vals = " | ".join(f"{r['scores'][st][m]['psnr']:.2f}" for m in keep)
                lines.append(f"      {st:<26}{vals}")
    return "\n".join(lines)


def combine(paths: list[Path], out: Path) -> dict[str, Any]:
    """Merge per-dataset reports (one process per dataset) into ``out``."""
    report: dict[str, Any] = {"results": {}}
    for p in paths:
        part = json.loads(Path(p).read_text())
        report.update({k: v for k, v in part.items() if k != "results"})
        report["results"].update(part["results"])
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
    p.add_argument("--datasets", default="phantom,mri")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--work", type=Path, default=Path("results/benchmark/quality_work"))
    p.add_argument("--vae-minutes", type=float, default=3.0, help="CPU minutes of the VAE")
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
