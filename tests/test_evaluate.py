"""evaluate_psnr on a tiny phantom dataset and a tiny trained first stage (restorer + residual
autoencoder): report, files, user errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import ldm.evaluate.baselines as baselines
import ldm.phases.evaluate_psnr as evaluate
from ldm.core.config import load_config
from ldm.data.dataset import iter_test_cases
from ldm.evaluate.baselines import format_table, mean_scores, tuning_pairs
from ldm.evaluate.inference import first_stage_volume
from ldm.evaluate.metrics import psnr
from ldm.nets.loading import load_vae
from ldm.phases.evaluate_psnr import EvaluateConfig
from tests.helpers.cli import error_line, run_script
from tests.helpers.phases import evaluate_args

TEST_CASES = ["phantom_002", "phantom_004"]  # the test split of 5 cases, seed 0, 40 % test
SIGMAS = [0.0, 0.5, 1.0]
STEPS = [0, 2, 4]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(dataset dir, checkpoint) of a 24^3 phantom dataset and a 2-step first stage, f = 2."""
    root = tmp_path_factory.mktemp("evaluate")
    data, run = root / "ds", root / "vae"
    result = run_script(
        "prepare_data", "--set", f"out_dir={data}", "--set", "phantom.num_cases=5",
        "--set", "phantom.shape=[24, 24, 24]", "--set", "patches.size=[16, 16, 16]",
        "--set", "patches.stride=[8, 8, 8]", "--set", "split.test_fraction=0.4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run_script(
        "train_vae_pair", "--set", f"data_dir={data}", "--set", f"out_dir={run}",
        "--set", "model.restorer.channels=[8, 8]", "--set", "model.restorer.norm_groups=4",
        "--set", "model.residual_ae.channels=[8, 8]", "--set", "model.residual_ae.norm_groups=4",
        "--set", "model.residual_ae.latent_channels=4", "--set", "train.steps=2",
        "--set", "train.batch_size=2", "--set", "train.val_every=2", "--set", "train.save_every=2",
        "--set", "train.device=cpu", "--set", "val_patches=2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return data, run / "best.pt"


def _args(trained, out, *extra: str) -> list[str]:
    data, ckpt = trained
    return [
        *evaluate_args(data, ckpt, out), "--set", "tune.max_patches=4",
        "--set", f"tune.gaussian_sigmas={SIGMAS}", "--set", f"tune.heat_steps={STEPS}",
        "--set", "tune.tv_weights=[0.05, 0.2]", "--set", "tune.nlm_hs=[0.05, 0.15]",
        "--set", "tune.filter_max_patches=2", *extra,
    ]  # fmt: skip


def _evaluate(trained, out, *extra: str):
    return run_script("evaluate_psnr", *_args(trained, out, *extra))


def test_cli_prints_table_and_writes_metrics_and_png(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(baselines, "bm4d_available", lambda: False)
    out = tmp_path / "res"
    result = _evaluate(trained, out)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "BM4D: skipped (pip install bm4d to include it" in text
    for label in ("Baseline (LR)", "Restorer", "Oracle (HR latent)", "Gaussian filter",
                  "Heat diff", "TV (Chambolle)", "Non-local means"):  # fmt: skip
        assert re.search(rf"^{re.escape(label)}.*\d+\.\d\d\s+-?\d\.\d{{4}}", text, re.M), label
    assert re.search(r"^method\s+PSNR \(dB\)\s+SSIM\s+bias\s+bias %\s+contrast\s+ESR\s+HFER"
                     r"\s+FSC hi", text, re.M)  # fmt: skip
    assert all(f"{name} PSNR" in text for name in TEST_CASES)  # 2 cases: per-case columns
    line = re.search(r"^Result PSNR: (\S+) dB \(restorer\) \| Baseline PSNR: (\S+) dB$", text,
                     re.M)  # fmt: skip
    assert line, text

    metrics = json.loads((out / "metrics.json").read_text())
    mean = metrics["mean"]
    assert list(metrics["cases"]) == TEST_CASES
    assert set(mean) == {"baseline", "restorer", "oracle", "gaussian", "heat", "tv", "nlm"}
    assert line.groups() == (f"{mean['restorer']['psnr']:.2f}", f"{mean['baseline']['psnr']:.2f}")
    assert metrics["methods"]["oracle"] == "Oracle (HR latent)"
    for m in ("restorer", "oracle"):  # the sharpness scores of every row
        assert {"esr", "hfer", "fsc"} <= set(mean[m]) and np.isfinite(mean[m]["esr"])
    assert (out / "metrics.csv").read_text().startswith("method,case,psnr,ssim")
    base = [metrics["cases"][c]["baseline"]["psnr"] for c in TEST_CASES]
    assert mean["baseline"]["psnr"] == pytest.approx(np.mean(base))
    assert metrics["checkpoint"] == {"path": str(trained[1]), "step": 2}
    assert metrics["window"] == [64, 64, 64]  # the default; it shrinks to the small test volumes
    tuned = metrics["tuned"]
    assert tuned["num_patches"] == 4 and tuned["bm4d_sigma"] is None
    assert tuned["gaussian_sigma"] in SIGMAS and tuned["heat_steps"] in STEPS
    assert tuned["tv_weight"] in (0.05, 0.2) and tuned["nlm_h"] in (0.05, 0.15)
    assert tuned["filter_patches"] == 2

    # the baseline row against scikit-image, in original units with the HR range
    for case in iter_test_cases(trained[0], TEST_CASES):
        lr, hr = case.to_original(case.lr.astype(np.float64)), case.to_original(case.hr)
        r = float(hr.max() - hr.min())
        got = metrics["cases"][case.name]["baseline"]
        assert got["psnr"] == pytest.approx(peak_signal_noise_ratio(hr, lr, data_range=r))
        ref_ssim = structural_similarity(
            hr.astype(np.float64), lr, data_range=r, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )  # fmt: skip
        assert got["ssim"] == pytest.approx(ref_ssim, abs=1e-6)
        # bias and contrast of the LR against numpy's mean and least-squares slope
        assert got["bias"] == pytest.approx(float(np.mean(lr - hr)), abs=1e-6 * r)
        assert got["bias_pct"] == pytest.approx(100 * got["bias"] / r)
        slope = np.polyfit(lr.ravel(), hr.ravel(), 1)[0]  # HR regressed on the output
        assert got["contrast"] == pytest.approx(1 / slope, rel=1e-6)
    # the restorer and oracle rows are the first stage's volumes (ldm.evaluate.inference)
    vae, _ = load_vae(trained[1])
    case = next(iter_test_cases(trained[0], TEST_CASES[:1]))
    hr = torch.from_numpy(case.to_original(case.hr.astype(np.float64)))
    r = float(hr.max() - hr.min())
    for m, kw in (("restorer", {}), ("oracle", {"hr": case.hr})):
        vol = first_stage_volume(vae, case.lr, (64, 64, 64), progress=False, **kw)
        got = psnr(torch.from_numpy(case.to_original(vol.astype(np.float64))), hr, r)
        assert metrics["cases"][case.name][m]["psnr"] == pytest.approx(got, abs=1e-4), m
    assert Image.open(out / "comparison.png").size[1] > 800  # 8 rows of views
    assert "tune:" in (out / "config.yaml").read_text()


def test_bm4d_row_when_the_package_is_available(trained, tmp_path, monkeypatch):
    calls = []

    def fake_tune(pairs, sigmas):
        calls.append(len(pairs))
        return sigmas[1], 30.0

    monkeypatch.setattr(baselines, "bm4d_available", lambda: True)
    monkeypatch.setattr(baselines, "tune_bm4d_sigma", fake_tune)
    monkeypatch.setattr(baselines, "bm4d_denoise", lambda volume, sigma: volume.clone())
    overrides = [a for a in _args(trained, tmp_path / "res") if a != "--set"]
    cfg = load_config(
        EvaluateConfig, None, [*overrides, "cases=[phantom_004]", "tune.bm4d_max_patches=2"]
    )
    result = evaluate.evaluate_psnr(cfg)
    assert "BM4D" in result.text and "skipped" not in result.text
    assert calls == [2]
    metrics = json.loads((tmp_path / "res" / "metrics.json").read_text())
    scores = metrics["cases"]["phantom_004"]
    assert scores["bm4d"] == pytest.approx(scores["baseline"])  # the fake BM4D is the identity
    assert metrics["tuned"]["bm4d_sigma"] == cfg.tune.bm4d_sigmas[1]


def test_format_table_and_mean():
    def sc(p, s, b=0.0):
        return {"psnr": p, "ssim": s, "bias": b, "bias_pct": 10 * b, "contrast": 1.0 + b}

    case_a = {"restorer": sc(30.0, 0.9, 0.1), "baseline": sc(20.0, 0.5)}
    case_b = {"restorer": sc(26.0, 0.7, 0.3), "baseline": sc(22.0, 0.7)}
    per_case = {"a": case_a, "b": case_b}
    mean = mean_scores(per_case)
    assert list(mean) == ["baseline", "restorer"]  # table order
    assert mean["baseline"] == sc(21.0, 0.6)
    assert mean["restorer"] == pytest.approx(sc(28.0, 0.8, 0.2))
    lines = format_table(per_case, mean).splitlines()
    assert lines[0].split() == [
        "method", "PSNR", "(dB)", "SSIM", "bias", "bias", "%", "contrast",
        "a", "PSNR", "a", "SSIM", "b", "PSNR", "b", "SSIM",
    ]  # fmt: skip
    assert lines[2].split() == [
        "Baseline", "(LR)", "21.00", "0.6000", "0", "+0.00", "1.000",
        "20.00", "0.5000", "22.00", "0.7000",
    ]  # fmt: skip
    assert lines[3].split()[:6] == ["Restorer", "28.00", "0.8000", "0.2", "+2.00", "1.200"]
    assert len({len(line) for line in lines}) == 1  # aligned
    one = format_table({"a": case_a}, mean_scores({"a": case_a})).splitlines()
    assert one[3].split() == ["Restorer", "30.00", "0.9000", "0.1", "+1.00", "1.100"]
    # the LDM rows in LABELS order whatever the dict order; sharpness columns when scored
    rows = {"ldm": {**sc(31.0, 0.9), "esr": 0.9, "hfer": 0.8, "fsc": 0.7},
            "oracle": sc(33.0, 0.95), "ldm_sample": sc(30.5, 0.85), **case_a}  # fmt: skip
    table = format_table({"a": rows}, mean_scores({"a": rows})).splitlines()
    assert table[0].split()[-4:] == ["ESR", "HFER", "FSC", "hi"]
    assert [r.split()[0] for r in table[2:]] == ["Baseline", "Restorer", "LDM", "LDM", "Oracle"]
    assert table[4].startswith("LDM one sample") and table[5].startswith("LDM mean")
    assert table[5].split()[-3:] == ["0.900", "0.800", "0.700"]


def test_tuning_pairs_are_evenly_spaced_train_patches(trained):
    pairs = tuning_pairs(trained[0], 3, torch.device("cpu"))
    assert len(pairs) == 3 and pairs[0][0].shape == (16, 16, 16)
    assert len(tuning_pairs(trained[0], 10_000, torch.device("cpu"))) == 16  # all 16 patches


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["cases=[nope]"], "no test case 'nope'; test cases: phantom_002, phantom_004"),
        (
            ["cases=[phantom_002]", "image_case=phantom_004"],
            "image_case 'phantom_004' is not among",
        ),
        (["window=[15, 16, 16]"], "divisible by the VAE downsampling factor 2"),
        (["overlap=1.5"], "overlap must be a fraction in [0, 1)"),
        (["tune.heat_steps=[]"], "tune.heat_steps must be a non-empty list"),
    ],
)
def test_bad_settings(trained, tmp_path, extra, message):
    args = [a for e in extra for a in ("--set", e)]
    assert message in error_line(_evaluate(trained, tmp_path / "res", *args))
    assert not (tmp_path / "res").exists()


def test_missing_dataset(trained, tmp_path):
    line = error_line(_evaluate(trained, tmp_path / "res", "--set", f"data_dir={tmp_path}/no"))
    assert "run prepare_data first" in line


def test_missing_checkpoint(trained, tmp_path):
    args = ["--set", f"vae_checkpoint={tmp_path}/none.pt"]
    assert "run train_vae_pair first" in error_line(_evaluate(trained, tmp_path / "r", *args))


def test_corrupt_checkpoint(trained, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    line = error_line(_evaluate(trained, tmp_path / "r", "--set", f"vae_checkpoint={bad}"))
    assert "corrupt or not a checkpoint" in line and "rerun train_vae_pair" in line


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention": True}, "incompatible checkpoint"),  # a key this version does not know
        ({"residual_ae": {"channels": [8, 16]}}, "weights do not fit the stored model config"),
        ({"restorer": {"channels": [8, 8], "lr_skip": False}}, "incompatible checkpoint"),
    ],
)
def test_checkpoint_of_an_incompatible_model(trained, tmp_path, change, message):
    state = torch.load(trained[1], weights_only=True)
    cfg = state["model_config"]
    state["model_config"] = {**cfg, **{k: {**cfg[k], **v} if isinstance(v, dict) else v
                                       for k, v in change.items()}}  # fmt: skip
    path = tmp_path / "other.pt"
    torch.save(state, path)
    line = error_line(_evaluate(trained, tmp_path / "r", "--set", f"vae_checkpoint={path}"))
    assert message in line and str(path) in line


def test_existing_results_need_overwrite(trained, tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / ".ldm3d.json").write_text('{"phase": "evaluate_psnr", "outputs": ["metrics.json"]}')
    assert "already exists; pass --overwrite" in error_line(_evaluate(trained, out))
    assert (out / "metrics.json").read_text() == "{}"


def test_tuned_baselines_are_cached_per_dataset_and_settings(trained, tmp_path, monkeypatch):
    """evaluate_psnr and predict_ldm share one tuning per dataset and grid (minutes with BM4D)."""
    import dataclasses
    import shutil

    data = shutil.copytree(trained[0], tmp_path / "data",
                           ignore=shutil.ignore_patterns(baselines.CACHE_DIR))  # fmt: skip
    calls = []
    real = baselines.tune_classical
    monkeypatch.setattr(baselines, "tune_classical", lambda t, p: calls.append(1) or real(t, p))
    tune = baselines.TuneConfig(max_patches=4, gaussian_sigmas=(0.0, 0.5), heat_steps=(0, 1),
                                tv_weights=(0.05,), nlm_hs=(0.05,), filter_max_patches=1,
                                bm4d=False)  # fmt: skip
    cpu = torch.device("cpu")
    first = baselines.tuned_baselines(data, tune, cpu)
    assert baselines.tuned_baselines(data, tune, cpu) == first and len(calls) == 1
    wider = dataclasses.replace(tune, gaussian_sigmas=(0.0, 0.5, 1.0))
    baselines.tuned_baselines(data, wider, cpu)  # other grids: tuned again, cached apart
    assert len(calls) == 2 and len(list((data / baselines.CACHE_DIR).glob("[!.]*.json"))) == 2
    for f in (data / baselines.CACHE_DIR).glob("[!.]*.json"):
        f.write_text("{")  # a corrupt cache file is tuned over, not an error
    assert baselines.tuned_baselines(data, tune, cpu) == first and len(calls) == 3
    (data / "manifest.json").write_text((data / "manifest.json").read_text() + "\n")
    baselines.tuned_baselines(data, tune, cpu)  # another dataset (manifest): tuned again
    assert len(calls) == 4
