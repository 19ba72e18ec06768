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
Prints one table per dataset; writes results/benchmark/quality.json.
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

from ldm.core.config import REPO_ROOT, load_config
from ldm.core.errors import UserError, os_error_message
from ldm.core.files import save_json
from ldm.data.dataset import iter_test_cases, load_manifest
from ldm.phases.predict_ldm import PredictConfig
from ldm.tools.quality_scoring import (
    MRI_DEGRADE,
    classical_params,
    evaluate,
    generalisation_cases,
    ldm_label,
)
from ldm.train.optim import TrainConfig, timed_step

DEMO = REPO_ROOT / "configs" / "demo"
# overrides of configs/demo/train_vae_pair.yaml (``diffusion.*``: of train_diffusion.yaml;
# SHARED_KEYS: of both). The first stage is model: {restorer, residual_ae, residual_scale}.
VARIANTS: dict[str, list[str]] = {
    # the demo configs: restorer + residual autoencoder (f = 4, 8 latent channels) + diffusion
    "default": [],
    # plain regression with the same CPU minutes: the restorer alone gets both budgets (the
    # residual autoencoder tiny, its loss does not reach the restorer; no diffusion)
    "regression": ["model.residual_ae.channels=[8, 8, 8]", "model.residual_ae.latent_channels=1"],
    # restorer trained on flipped / permuted / rescaled pairs with an edge term
    "aug": ["augment.flips=true", "augment.permute=true", "augment.scale=0.3",
            "augment.shift=0.1", "grad_weight=0.5", "residual_grad_weight=0.5"],
    # f = 2 residual latent (8 channels: as many numbers as voxels): room for the detail
    "f2": ["model.residual_ae.channels=[16, 32]"],
    # both networks trained in float32 on CPU: the loser of train.amp_cpu (default auto: bf16
    # autocast on CPUs with bf16 instructions, 1.3x the steps in the same CPU time)
    "fp32": ["train.amp_cpu=none"],
}  # fmt: skip
NO_DIFFUSION = ("regression",)  # variants that train the first stage only, for both budgets
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


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(train_vae_pair overrides, train_diffusion overrides) of a variant."""
    diffusion = [o for o in overrides if o.startswith(("diffusion.", *SHARED_KEYS))]
    return [o for o in overrides if not o.startswith("diffusion.")], diffusion


def variant_configs(variant: str, data: Path | None = None, run: Path | None = None):
    """(TrainVAEConfig, TrainDiffusionConfig) of a variant: configs/demo with its overrides
    (and the dataset / run folders when given). Raises UserError naming the variant when an
    override does not fit the configs."""
    from ldm.phases.train_diffusion import TrainDiffusionConfig
    from ldm.phases.train_vae_pair import TrainVAEConfig

    vae_sets, diffusion_sets = split_overrides(VARIANTS[variant])
    if data is not None and run is not None:
        vae_sets = [f"data_dir={data}", f"out_dir={run / 'vae'}", *vae_sets]
        diffusion_sets = [f"data_dir={data}", f"latents_dir={run / 'latents'}",
                          f"vae_checkpoint={run / 'vae' / 'best.pt'}",
                          f"out_dir={run / 'diffusion'}", *diffusion_sets]  # fmt: skip
    try:
        return (load_config(TrainVAEConfig, DEMO / "train_vae_pair.yaml", vae_sets),
                load_config(TrainDiffusionConfig, DEMO / "train_diffusion.yaml",
                            diffusion_sets))  # fmt: skip
    except UserError as e:
        raise UserError(f"variant {variant}: {e}") from None


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_variant(data: Path, run: Path, variant: str, vae_min: float, diff_min: float):
    """Train one variant into ``run``: (first-stage checkpoint, diffusion checkpoint or None
    for a NO_DIFFUSION variant, training info)."""
    from ldm.nets import UNet3d
    from ldm.nets.restorer import RestorerAE, condition_channels
    from ldm.phases.prepare_latents import PrepareLatentsConfig, prepare_latents
    from ldm.phases.train_diffusion import train_diffusion
    from ldm.phases.train_vae_pair import first_stage_loss, train_vae_pair

    vae_ck = run / "vae" / "best.pt"
    cfg, dcfg = variant_configs(variant, data, run)
    diffusion = variant not in NO_DIFFUSION
    vae_budget = vae_min if diffusion else vae_min + diff_min  # regression: both budgets
    patch = load_manifest(data)["patch_size"]
    b = cfg.train.batch_size
    lr, hr = torch.rand(2, b, 1, *patch)
    first_stage = RestorerAE(cfg.model)

    steps = _calibrated_steps(first_stage, lambda m: first_stage_loss(m, lr, hr, cfg)[0],
                              vae_budget, cfg.train)  # the training loss itself  # fmt: skip
    every = max(10, steps // 4)
    cfg = replace(cfg, train=replace(cfg.train, steps=steps, max_minutes=WALL_CAP * vae_budget,
                                     val_every=every, save_every=every))  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    vae = train_vae_pair(cfg, overwrite=True)
    vae_s, vae_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(vae.text)
    params = {"restorer": _params(first_stage.restorer),
              "residual_ae": _params(first_stage.residual_ae)}  # fmt: skip
    info: dict[str, Any] = {"vae_val": vae.metrics, "params": params,
                            "train_minutes": vae_s / 60, "train_cpu_minutes": vae_cpu / 60,
                            "steps": {"vae": vae.metrics["step"]}}  # fmt: skip
    if not diffusion:
        return vae_ck, None, info
    lat = run / "latents"
    prepare_latents(
        load_config(
            PrepareLatentsConfig,
            None,
            [f"data_dir={data}", f"vae_checkpoint={vae_ck}", f"out_dir={lat}"],
        ),
        overwrite=True,
    )
    # the UNet's channels as train_diffusion sets them from the latents (it overrides the YAML's)
    lc, f = cfg.model.latent_channels, cfg.model.downsample_factor
    c = replace(dcfg.model, in_channels=lc, out_channels=lc,
                cond_channels=condition_channels(cfg.model))  # fmt: skip
    z = torch.randn(dcfg.train.batch_size, lc, *(p // f for p in patch))
    cond = torch.randn(z.shape[0], c.cond_channels, *z.shape[2:])
    t = torch.zeros(z.shape[0], dtype=torch.long)
    unet = UNet3d(c)
    steps = _calibrated_steps(unet, lambda m: m(z, t, cond=cond).square().mean(), diff_min,
                              dcfg.train)  # fmt: skip
    every = max(10, steps // 3)
    dcfg = replace(dcfg, train=replace(dcfg.train, steps=steps, max_minutes=WALL_CAP * diff_min,
                                       val_every=every, save_every=every))  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    diff = train_diffusion(dcfg, overwrite=True)
    diff_s, diff_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(diff.text)
    params["unet"] = _params(unet)
    info.update({"diffusion_val": diff.metrics, "train_minutes": (vae_s + diff_s) / 60,
                 "train_cpu_minutes": (vae_cpu + diff_cpu) / 60,
                 "steps": {"vae": vae.metrics["step"],
                           "diffusion": diff.metrics["step"]}})  # fmt: skip
    return vae_ck, run / "diffusion" / "best.pt", info


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


# (header, figure, format) of the per-dataset table
COLUMNS = (("PSNR", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.4f}"), ("ESR", "esr", "{:.3f}"),
           ("HFER", "hfer", "{:.3f}"), ("FSC hi", "fsc", "{:.3f}"),
           ("bias %", "bias_pct", "{:+.2f}"), ("contrast %", "contrast_pct", "{:+.2f}"),
           ("predict s", "seconds", "{:.1f}"))  # fmt: skip
# rows of the compact generalisation table (PSNR), those a result has
GENERAL_ROWS = ("Baseline", "Gaussian (tuned)", "NLM (tuned)", "BM4D (tuned)", "Restorer",
                "Oracle", ldm_label(1), ldm_label(8))  # fmt: skip
TABLE_NOTE = (
    "ESR = edge gradient / HR's on HR's top 5 % edges, HFER = spectral energy / HR's above 0.25 "
    "cycles/voxel (both ideal 1), FSC hi = Fourier shell correlation with HR there; bias and "
    "contrast - 1 in % of the HR range; predict s = wall seconds per volume (w rows: the mean "
    "of 8's); var/err = mean std^2 / MSE of the mean of 8 (calibrated: 8/9 = 0.89, std with "
    "ddof 1), AUSE (0 = std ranks the errors perfectly; random order for scale); S = ||D(z_HR) "
    "- D(z_sample)||^2 / ||HR - mu||^2 (< 1: the latent cannot fix much of the restorer's error)"
)


def _cell(scores: dict[str, float], key: str, fmt: str) -> str:
    v = scores.get(key)
    return "-" if v is None or not np.isfinite(v) else fmt.format(v)


def _aligned(rows: list[list[str]], left: int) -> list[str]:
    """Rows of cells as aligned text, the first ``left`` columns left-aligned, a rule under the
    header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]  # fmt: skip
    lines.insert(1, "-" * max(len(x) for x in lines))
    return lines


def _variant_notes(variant: str, r: dict[str, Any]) -> str:
    """Training, calibration and latent sensitivity of one result, one line."""
    parts = []
    if r.get("steps"):
        steps = ", ".join(f"{k} {v}" for k, v in r["steps"].items())
        parts.append(f"train {r['train_cpu_minutes']:.1f} CPU min ({r['train_minutes']:.1f} "
                     f"wall), steps {steps}")  # fmt: skip
    if r.get("params"):
        parts.append("params " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in r["params"].items()))
    test = r["scores"].get("test", {})
    for label, s in test.items():
        if "var_err_ratio" in s:
            parts.append(f"{label}: var/err {s['var_err_ratio']:.3f}, AUSE {s['ause']:.3f} "
                         f"(random {s['ause_random']:.3f})")  # fmt: skip
        if "latent_sensitivity" in s:
            parts.append(f"latent sensitivity S {s['latent_sensitivity']:.3f} ({label})")
    n = r.get("num_test", "?")
    return f"{variant} ({n} test volume{'' if n == 1 else 's'}): " + "; ".join(parts)


def format_table(report: dict[str, Any]) -> str:
    """One table per dataset: the test-set rows of every variant (PSNR, SSIM, ESR, HFER, FSC,
    bias, contrast, predict seconds), a line per variant (training, calibration of the mean of
    8, latent sensitivity S), then the PSNR of the main rows in each generalisation setting."""
    by_dataset: dict[str, list[tuple[str, dict]]] = {}
    for key, r in report["results"].items():
        dataset, _, variant = key.partition("/")
        by_dataset.setdefault(dataset, []).append((variant or dataset, r))
    lines: list[str] = []
    for dataset, entries in by_dataset.items():
        rows = [["variant", "method", *(h for h, _, _ in COLUMNS)]]
        for variant, r in entries:
            for i, (m, s) in enumerate(r["scores"].get("test", {}).items()):
                rows.append([variant if i == 0 else "", m,
                             *(_cell(s, k, f) for _, k, f in COLUMNS)])  # fmt: skip
        lines += [f"== {dataset} ==", *_aligned(rows, 2)]
        lines += [_variant_notes(v, r) for v, r in entries]
        general = [(v, st, sc) for v, r in entries for st, sc in r["scores"].items()
                   if st != "test"]  # fmt: skip
        if general:
            cols = [m for m in GENERAL_ROWS if any(m in sc for _, _, sc in general)]
            grows = [["variant", "setting", *cols]]
            for v, st, sc in general:
                grows.append([v, st, *(_cell(sc.get(m, {}), "psnr", "{:.2f}") for m in cols)])
            lines += ["generalisation PSNR (dB):", *_aligned(grows, 2)]
        lines.append("")
    return "\n".join(lines + [TABLE_NOTE])


summary_table = format_table  # --combine and --profile-model print the same tables


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
