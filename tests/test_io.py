from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from ldm.core.errors import DataError, UserError
from ldm.core.files import save_json, staged_dir
from ldm.data.io import RawSpec, VolumeMeta, load_volume, save_volume
from tests.helpers.cli import error_line, run_script


@pytest.fixture
def vol() -> np.ndarray:
    return np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)


def test_raw_mhd_round_trip_keeps_spacing(tmp_path, vol):
    meta = VolumeMeta("raw", spacing=(2.0, 1.0, 0.5), origin=(1.0, 2.0, 3.0))
    written = save_volume(tmp_path / "v.raw", vol, meta)
    assert written.name == "v.raw" and (tmp_path / "v.mhd").is_file()
    assert "DimSize = 7 6 5" in (tmp_path / "v.mhd").read_text()  # x first
    data, m = load_volume(tmp_path / "v.raw")
    assert (
        np.array_equal(data, vol) and m.spacing == (2.0, 1.0, 0.5) and m.origin == (1.0, 2.0, 3.0)
    )
    data2, _ = load_volume(tmp_path / "v.mhd")
    assert np.array_equal(data2, vol)


def test_raw_without_header_uses_spec_and_byte_order(tmp_path):
    x = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    x.tofile(tmp_path / "b.raw")
    data, _ = load_volume(
        tmp_path / "b.raw", RawSpec(shape=(2, 3, 4), dtype="int16", byte_order="big")
    )
    assert np.array_equal(data, x.astype(np.float32))


def test_raw_size_mismatch_names_both_numbers(tmp_path):
    np.zeros(10, np.float32).tofile(tmp_path / "c.raw")
    with pytest.raises(DataError, match=r"c\.raw: file has 40 bytes but .* needs 96"):
        load_volume(tmp_path / "c.raw", RawSpec(shape=(2, 3, 4)))


def test_raw_without_header_or_shape(tmp_path):
    np.zeros(8, np.float32).tofile(tmp_path / "d.raw")
    with pytest.raises(DataError, match="no .mhd header"):
        load_volume(tmp_path / "d.raw")


def test_nifti_round_trip_keeps_affine(tmp_path, vol):
    affine = [[0.0, 2.0, 0, 5], [1.5, 0, 0, -3], [0, 0, 1.0, 7], [0, 0, 0, 1]]
    for name in ("v.nii.gz", "v.nii"):
        save_volume(tmp_path / name, vol, VolumeMeta("nifti", affine=affine))
        data, meta = load_volume(tmp_path / name)
        assert np.array_equal(data, vol)
        assert np.allclose(meta.affine, affine)


def test_npy_round_trip(tmp_path, vol):
    save_volume(tmp_path / "v.npy", vol)
    data, meta = load_volume(tmp_path / "v.npy")
    assert np.array_equal(data, vol) and meta.format == "npy"


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="volume file not found"):
        load_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(DataError, match="unknown volume format"):
        load_volume(tmp_path / "v.tif")


def test_nan_or_inf_is_rejected(tmp_path, vol):
    vol[1, 2, 3] = np.nan
    vol[0, 0, 0] = np.inf
    np.save(tmp_path / "n.npy", vol)
    with pytest.raises(DataError, match=r"n\.npy: volume has 2 NaN/Inf voxels"):
        load_volume(tmp_path / "n.npy")


def test_corrupt_nifti(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="not a readable NIfTI"):
        load_volume(tmp_path / "bad.nii.gz")


def test_staged_dir_refuses_then_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out, phase="demo") as d:
        (d / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    refused = pytest.raises(UserError, match="already exists; pass --overwrite")
    with refused, staged_dir(out, phase="demo"):
        pass
    with pytest.raises(RuntimeError), staged_dir(out, overwrite=True, phase="demo") as d:
        (d / "a.txt").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (out / "a.txt").read_text() == "first"  # the failed run left the old results
    with staged_dir(out, overwrite=True, phase="demo") as d:
        (d / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == [".ldm3d.json", "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left behind


def test_written_files_get_normal_permissions(tmp_path, vol):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    save_volume(tmp_path / "p.npy", vol)
    assert (tmp_path / "p.npy").stat().st_mode & 0o777 == 0o666 & ~umask
    with staged_dir(tmp_path / "out", phase="demo") as d:
        (d / "x.txt").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def _dead_pid() -> int:
    """The pid of a process that has exited (what a SIGKILLed run leaves in temp names)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def test_leftovers_of_a_killed_run_are_cleaned_and_a_half_swap_is_undone(tmp_path):
    dead = _dead_pid()
    final = tmp_path / "results"
    # a kill between the two renames of a swap: only the old results exist, under their old name
    old = tmp_path / f".results.old-{dead}"
    old.mkdir()
    (old / "table.json").write_text("old")
    (old / ".ldm3d.json").write_text('{"phase": "demo", "outputs": ["table.json"]}')
    stale_dir = tmp_path / f".results.{dead}.abc123.tmp"  # a staged folder a kill left
    stale_dir.mkdir()
    stale_file = tmp_path / f".tmp-{dead}-xyz-table.json"  # an atomic write a kill left
    stale_file.write_text("half")
    live_file = tmp_path / f".tmp-{os.getpid()}-xyz-other.json"  # ours: never touched
    live_file.write_text("mine")
    with pytest.raises(UserError, match="already exists"), staged_dir(final, phase="demo"):
        pass
    assert (final / "table.json").read_text() == "old" and not old.exists()
    with staged_dir(final, overwrite=True, phase="demo") as out:
        save_json({"new": 1}, out / "table.json")
    assert not stale_dir.exists()
    assert json.loads((final / "table.json").read_text()) == {"new": 1}
    save_json({"x": 1}, tmp_path / "table.json")
    assert not stale_file.exists() and live_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live_file.name, "results", "table.json"]


def test_staged_dir_names_the_output_folder_it_cannot_create(tmp_path):
    # the error must name the folder the user gave, not the hidden temp folder beside it
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError) as e, staged_dir(blocker / "out", phase="demo"):
        pass
    assert str(e.value).startswith(f"{blocker / 'out'}: cannot create the output folder")
    assert ".tmp" not in str(e.value)


def test_metaimage_round_trip_keeps_direction_spacing_origin(tmp_path):
    vol = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    c, s = np.cos(0.3), np.sin(0.3)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    meta = VolumeMeta("raw", spacing=(3.0, 1.0, 0.5), origin=(1.0, 2.0, 3.0), direction=direction)
    save_volume(tmp_path / "v.raw", vol, meta)
    assert "TransformMatrix" in (tmp_path / "v.mhd").read_text()
    img = sitk.ReadImage(str(tmp_path / "v.mhd"))  # an independent reader agrees
    assert np.allclose(img.GetDirection(), direction) and img.GetSpacing() == (0.5, 1.0, 3.0)
    data, m = load_volume(tmp_path / "v.mhd")
    assert np.array_equal(data, vol) and np.allclose(m.direction, direction)
    assert m.spacing == (3.0, 1.0, 0.5) and m.origin == (1.0, 2.0, 3.0)
    assert VolumeMeta.from_dict(m.to_dict()) == m


@pytest.mark.parametrize("compressed", [False, True])
def test_metaimage_local_and_compressed_data(tmp_path, compressed):
    vol = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.8, 0.9))
    path = tmp_path / "a.mha" if not compressed else tmp_path / "a.mhd"
    sitk.WriteImage(img, str(path), useCompression=compressed)
    if path.suffix == ".mha":  # LOCAL: header and data in one file; rename to .mhd
        path = path.rename(tmp_path / "local.mhd")
        assert "ElementDataFile = LOCAL" in path.read_bytes()[:400].decode(errors="replace")
    data, m = load_volume(path)
    assert np.array_equal(data, vol.astype(np.float32)) and m.spacing == (0.9, 0.8, 0.7)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("DimSize", "4 4", "DimSize has 2 values but NDims = 3"),
        ("ElementSpacing", "1 one 1", "malformed MetaImage header field"),
        ("Offset", "0 0 x", "malformed MetaImage header field"),
    ],
)
def test_malformed_mhd_fields(tmp_path, field, value, message):
    save_volume(tmp_path / "v.raw", np.zeros((4, 4, 4), np.float32))
    mhd = tmp_path / "v.mhd"
    lines = [f"{field} = {value}" if x.startswith(f"{field} ") else x
             for x in mhd.read_text().splitlines()]  # fmt: skip
    mhd.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as e:
        load_volume(mhd)
    assert str(mhd) in str(e.value)


def test_predict_input_headerless_raw_uses_the_raw_section(tiny_pipeline, tmp_path):
    vol = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    vol.tofile(tmp_path / "scan.raw")
    tp = tiny_pipeline
    args = ["--set", f"data_dir={tp.data_dir}", "--set", f"vae_checkpoint={tp.vae}",
            "--set", f"diffusion_checkpoint={tp.diffusion}", "--set", "sampler.steps=2",
            "--set", "gif=false", "--set", "device=cpu"]  # fmt: skip
    line = error_line(run_script("predict_ldm", "--input", tmp_path / "scan.raw",
                                 "--set", f"out_dir={tmp_path / 'a'}", *args))  # fmt: skip
    assert "raw.shape" in line
    result = run_script("predict_ldm", "--input", tmp_path / "scan.raw",
                        "--set", "raw.shape=[16, 16, 16]", "--set", f"out_dir={tmp_path / 'b'}",
                        *args)  # fmt: skip
    assert result.exit_code == 0, result.output
    out, _ = load_volume(tmp_path / "b" / "scan" / "scan_ldm.raw")
    assert out.shape == (16, 16, 16)
