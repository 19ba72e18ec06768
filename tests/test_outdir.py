"""--overwrite never deletes what ldm3d did not write; one run per output folder.

The data-loss cases run the phase scripts the way a user does, in a temporary folder holding a
fake checkout and user files, and check that every file survives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm.core.errors import UserError
from ldm.core.files import staged_dir
from ldm.core.outdir import MARKER, folder_lock
from ldm.data.io import save_volume
from tests.helpers.cli import ROOT, error_line, run_script


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A fake git checkout with user files, as the current folder."""
    root = tmp_path / "checkout"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "README.md").write_text("my project\n")
    (root / "notes.txt").write_text("keep me\n")
    monkeypatch.chdir(root)
    return root


def _config(phase: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / f"{phase}.yaml")]  # the cwd is not the checkout


def _particles(out: str, *extra: str):
    return run_script("particles_gif", *_config("particles_gif"), "--set", f"out_dir={out}",
                      "--set", "max_size=24",
                      "--set", "steps=50", "--set", "device=cpu", *extra)  # fmt: skip


def test_overwrite_of_the_current_folder_is_refused_and_nothing_is_deleted(checkout):
    before = _snapshot(checkout)
    line = error_line(_particles(".", "--overwrite"))
    assert "is the current folder" in line
    assert _snapshot(checkout) == before


def test_home_root_and_git_checkout_are_never_output_folders(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    assert "is your home folder" in error_line(_particles(str(home), "--overwrite"))
    assert (home / "thesis.tex").read_text() == "years of work"
    assert "is a filesystem root" in error_line(_particles("/", "--overwrite"))
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    assert "is a git checkout" in error_line(_particles(str(repo), "--overwrite"))
    assert (repo / ".git").is_dir()


def test_a_folder_with_user_files_is_refused_even_with_overwrite(checkout):
    user = checkout / "userimg"
    user.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (user / name).write_bytes(b"photo")
    before = _snapshot(checkout)
    line = error_line(_particles("userimg", "--overwrite"))
    assert "holds files ldm3d did not write (a.png, b.png, c.png and 1 more)" in line
    assert "choose an empty or new out_dir" in line
    assert _snapshot(checkout) == before


def test_the_input_image_folder_is_refused(checkout):
    from PIL import Image

    (checkout / "userimg").mkdir()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(checkout / "userimg" / "photo.png")
    before = _snapshot(checkout)
    line = error_line(_particles("userimg", "--overwrite", "--image", "userimg/photo.png"))
    assert "holds the input userimg/photo.png" in line
    assert _snapshot(checkout) == before


def test_predict_into_the_input_scans_folder_is_refused(tiny_pipeline, checkout):
    scans = checkout / "userscans"
    scans.mkdir()
    vol = np.random.default_rng(0).random((24, 24, 24), dtype=np.float32)
    save_volume(scans / "scan_lr.nii.gz", vol)
    save_volume(scans / "scan_hr.nii.gz", vol)
    (scans / "notes.txt").write_text("patient notes")
    before = _snapshot(checkout)
    tp = tiny_pipeline
    result = run_script(
        "predict_ldm", *_config("predict_ldm"), "--overwrite",
        "--input", "userscans/scan_lr.nii.gz",
        "--set", f"data_dir={tp.data_dir}", "--set", f"vae_checkpoint={tp.vae}",
        "--set", f"diffusion_checkpoint={tp.diffusion}", "--set", "out_dir=userscans",
    )  # fmt: skip
    assert "holds the input userscans/scan_lr.nii.gz" in error_line(result)
    assert _snapshot(checkout) == before


def test_prepare_data_into_its_pairs_folder_is_refused(checkout):
    pairs = checkout / "userpairs"
    pairs.mkdir()
    vol = np.zeros((16, 16, 16), dtype=np.float32)
    save_volume(pairs / "a_lr.nii.gz", vol)
    save_volume(pairs / "a_hr.nii.gz", vol)
    before = _snapshot(checkout)
    result = run_script("prepare_data", *_config("prepare_data"), "--overwrite",
                        "--set", "source=pairs", "--set", "pairs.folder=userpairs",
                        "--set", "out_dir=userpairs")  # fmt: skip
    assert f"is the input {pairs}" in error_line(result)
    assert _snapshot(checkout) == before


def test_overwrite_replaces_only_a_folder_of_the_same_phase(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out, phase="evaluate_psnr") as d:
        (d / "metrics.json").write_text("{}")
    assert json.loads((out / MARKER).read_text()) == {
        "phase": "evaluate_psnr", "outputs": ["metrics.json"]
    }  # fmt: skip
    other = pytest.raises(UserError, match="holds the outputs of evaluate_psnr, not predict_ldm")
    with other, staged_dir(out, overwrite=True, phase="predict_ldm"):
        pass
    (out / "mine.txt").write_text("a user's file dropped into the results")
    foreign = pytest.raises(UserError, match=r"holds files ldm3d did not write \(mine.txt\)")
    with foreign, staged_dir(out, overwrite=True, phase="evaluate_psnr"):
        pass
    assert (out / "mine.txt").exists() and (out / "metrics.json").exists()
    (out / "mine.txt").unlink()
    with staged_dir(out, overwrite=True, phase="evaluate_psnr") as d:
        (d / "table.csv").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "table.csv"]


def test_a_later_phase_folder_inside_counts_as_ours(tmp_path):
    data = tmp_path / "dataset"
    with staged_dir(data, phase="prepare_data") as d:
        (d / "manifest.json").write_text("{}")
    with staged_dir(data / "latents", phase="prepare_latents") as d:
        (d / "meta.json").write_text("{}")
    with staged_dir(data, overwrite=True, phase="prepare_data") as d:  # latents/ is ldm3d's
        (d / "manifest.json").write_text('{"new": 1}')
    assert (data / "manifest.json").read_text() == '{"new": 1}'


def test_the_tuned_baselines_cache_inside_a_dataset_counts_as_ours(tmp_path):
    from ldm.core.outdir import mark_folder

    data = tmp_path / "dataset"
    with staged_dir(data, phase="prepare_data") as d:
        (d / "manifest.json").write_text("{}")
    mark_folder(data / "tuned_baselines", "tuned_baselines cache")  # what evaluate_psnr makes
    (data / "tuned_baselines" / "0123.json").write_text("{}")
    with staged_dir(data, overwrite=True, phase="prepare_data") as d:
        (d / "manifest.json").write_text("{}")
    assert not (data / "tuned_baselines").exists()  # replaced with the dataset it was tuned on


def test_a_second_run_into_a_locked_folder_gets_one_error_line(tmp_path):
    out = tmp_path / "res"
    with folder_lock(out):
        line = error_line(_particles(str(out)))
        assert f"{out} is in use by another ldm3d run (pid {os.getpid()})" in line
        assert not out.exists()
    assert not (tmp_path / ".res.lock").exists()  # released and removed
    with folder_lock(out):  # and free again
        pass


def test_the_lock_of_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "res"
    code = (f"import os; from ldm.core.outdir import folder_lock\n"
            f"with folder_lock({str(out)!r}): os._exit(9)")  # killed while holding it
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env)
    assert proc.returncode == 9 and (tmp_path / ".res.lock").exists()
    with folder_lock(out):  # the kernel dropped the dead run's flock
        pass


def test_two_trainings_into_one_folder(tiny_pipeline, tmp_path):
    run_dir = tmp_path / "vae"
    tp = tiny_pipeline
    with folder_lock(run_dir):
        result = run_script(
            "train_vae_pair", *_config("train_vae_pair"), "--set", f"data_dir={tp.data_dir}",
            "--set", f"out_dir={run_dir}",
            "--set", "train.steps=1", "--set", "train.device=cpu",
        )  # fmt: skip
        assert "is in use by another ldm3d run" in error_line(result)
    assert not (run_dir / "metrics.jsonl").exists()


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write into (chmod for users; /sys for root)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").write_text("x")
    except PermissionError:
        return d
    (d / "probe").unlink()
    return Path("/sys/ldm3d-test")  # root ignores modes; sysfs refuses new files


@pytest.mark.parametrize("phase", ["train_vae_pair", "evaluate_psnr", "prepare_data"])
def test_unwritable_output_is_one_error_line_before_any_work(tiny_pipeline, tmp_path, phase):
    target = _unwritable(tmp_path) / "out"
    args = ["--set", f"out_dir={target}"]
    if phase != "prepare_data":
        args += (
            ["--set", f"data_dir={tiny_pipeline.data_dir}", "--set", "train.steps=1"]
            if phase == "train_vae_pair"
            else [
                "--set",
                f"data_dir={tiny_pipeline.data_dir}",
                "--set",
                f"vae_checkpoint={tiny_pipeline.vae}",
            ]
        )
    else:
        args += ["--set", "phantom.num_cases=3", "--set", "phantom.shape=[16, 16, 16]",
                 "--set", "patches.size=[16, 16, 16]"]  # fmt: skip
    line = error_line(run_script(phase, *args))
    assert str(target.parent) in line
