"""Wrong numbers never give a wrong image with exit 0: NaN/inf settings, counts beyond the noise
schedule, seeds beyond 32 bits, voxel values that overflow float32, complex voxels, a header asking
for billions of voxels, a scan that is not in preprocessed units, a full disk (issue 26's probes)."""

import errno
import gzip
import io

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from harmodiff import config as hc
from harmodiff import harmonize
from harmodiff.config import HarmonizeConfig
from harmodiff.model import ModelRecord, SiteLabels
from harmodiff.io import InputError, load_image, save_image, write_text


@pytest.mark.parametrize("key,value", [("harmonize.scale", float("nan")), ("harmonize.strength", float("inf")),
                                       ("train.lr", float("nan")), ("grid.spacing", float("-inf")),
                                       ("anatomy.alpha", float("nan"))])
def test_a_nan_or_inf_setting_is_refused_naming_the_key(key, value):
    """NaN passes every range check (each comparison is false): the type check refuses it."""
    section, name = key.split(".")
    with pytest.raises(hc.ConfigError, match=rf"^{key} must be a finite number, got {value!r}"):
        hc.WorkflowConfig.from_dict({"target_sites": ["A"], section: {name: value}})


def test_config_check_refuses_nan_from_yaml(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("target_sites: [A]\nharmonize:\n  scale: .nan\n")
    assert hc.main(["check", str(tmp_path / "c.yaml")]) == 2
    assert "harmonize.scale must be a finite number, got nan" in capsys.readouterr().err


def test_counts_and_seeds_have_upper_bounds():
    with pytest.raises(hc.ConfigError, match=r"harmonize.steps must be at most train.num_train_timesteps \(1000\), "
                                              r"got 5000"):
        hc.WorkflowConfig.from_dict({"target_sites": ["A"], "harmonize": {"steps": 5000}})
    assert hc.WorkflowConfig.from_dict({"target_sites": ["A"], "harmonize": {"steps": 1000}}).harmonize.steps == 1000
    with pytest.raises(hc.ConfigError, match=r"harmonize.seed must be in \[0, 4,294,967,295\], got 36893488147419103232"):
        hc.HarmonizeConfig.from_dict({"seed": 2**65})
    with pytest.raises(hc.ConfigError, match=r"harmonize.steps must be in \(0, 100,000\]"):
        hc.HarmonizeConfig.from_dict({"steps": 10**6})


@pytest.mark.parametrize("flags,words", [(["--scale", "nan"], "harmonize.scale must be a finite number"),
                                         (["--strength", "nan"], "harmonize.strength must be a finite number"),
                                         (["--steps", "1000000"], "harmonize.steps must be in (0, 100,000]"),
                                         (["--seed", str(2**65)], "harmonize.seed must be in [0, 4,294,967,295]"),
                                         (["--runs", "{out}/runs.tsv"], "harmonize.scale must be a finite")])
def test_harmonize_refuses_a_bad_number_in_one_line_before_any_work(tmp_path, capsys, flags, words):
    """Before the checkpoint (here: none) or the scan is read."""
    flags = [f.format(out=tmp_path) for f in flags]
    pd.DataFrame({"main_output": [str(tmp_path / "h.nii.gz")], "output": [str(tmp_path / "r.nii.gz")], "guidance": [""],
                  "scale": ["nan"], "seed": [""]}).to_csv(tmp_path / "runs.tsv", sep="\t", index=False)
    code = harmonize.main(["--checkpoint", str(tmp_path / "none.pt"), "--input", str(tmp_path / "x.nii.gz"),
                           "--mask", str(tmp_path / "m.nii.gz"), "--target-site", "A",
                           "--output", str(tmp_path / "h.nii.gz"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and err.count("\n") == 0 and "none.pt" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["runs.tsv"]


def test_steps_beyond_the_models_schedule_are_one_line():
    config = {"train": {"num_train_timesteps": 100}}
    with pytest.raises(InputError, match=r"steps must be in 1..100 \(the model's noise schedule\), got 500"):
        harmonize.harmonize_array(None, ModelRecord({**config, "patch_shape": [4, 4, 4], "model": {}, "anatomy": {}},
                                              SiteLabels(["A"], [0.0])),
                                  np.ones((8, 8, 8), np.float32), np.ones((8, 8, 8), bool), "A",
                                  HarmonizeConfig(steps=500))


def _nii(path, data, slope=None):
    img = nib.Nifti1Image(data, np.eye(4))
    if slope is not None:
        img.header.set_slope_inter(slope, 0)
    nib.save(img, str(path))
    return path


def test_voxels_that_overflow_float32_after_scl_slope_are_refused(tmp_path):
    """int16 x scl_slope 1e38 is finite in float64 and inf in float32, where every tool computes."""
    path = _nii(tmp_path / "s.nii.gz", np.full((6, 6, 6), 1000, np.int16), slope=1e38)
    with pytest.raises(InputError, match=r"voxel values up to 1e\+41 \(after scl_slope 1e\+38, scl_inter 0\) "
                                         r"overflow float32"):
        load_image(path)
    assert load_image(_nii(tmp_path / "ok.nii.gz", np.full((6, 6, 6), 1000, np.int16), slope=2.0)).get_fdata().max() == 2000


def test_complex_voxels_are_refused_not_cast(tmp_path):
    path = _nii(tmp_path / "c.nii.gz", (np.ones((6, 6, 6)) * (1 + 2j)).astype(np.complex64))
    with pytest.raises(InputError, match=r"voxel type complex64 is complex"):
        load_image(path)


def test_a_small_gzip_claiming_billions_of_voxels_is_refused_from_its_header(tmp_path):
    """1.7 MB of gzip holding a 1200^3 header: refused before decompressing (3.4 GB) anything."""
    header = nib.Nifti1Header()
    header.set_data_shape((1200, 1200, 1200))
    header.set_data_dtype(np.uint8)
    buf = io.BytesIO()
    header.write_to(buf)
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(buf.getvalue() + b"\0" * 4)
        for _ in range(100):
            f.write(bytes(1 << 24))
    assert path.stat().st_size < 2 * 2**20
    with pytest.raises(InputError, match=r"the header asks for 1200x1200x1200 = 1,728,000,000 voxels"):
        load_image(path)


@pytest.mark.parametrize("scale,shift", [(1.0, -1500.0), (1e-30, 0.0), (3.0, 0.0)])
def test_harmonize_refuses_an_input_not_in_preprocessed_units(scale, shift):
    """An all-negative, a 1e-30-scaled or a 3x-scaled brain would still come out brain-like: refused,
    saying what was found; the preprocessed scan itself passes."""
    from harmodiff.intensity import median_normalize

    rng = np.random.default_rng(0)
    mask = np.zeros((12, 12, 12), bool)
    mask[2:10, 2:10, 2:10] = True
    image = median_normalize(rng.uniform(50, 150, mask.shape), mask)
    harmonize.check_preprocessed("scan.nii.gz", image, mask)
    with pytest.raises(InputError, match=r"scan.nii.gz: does not look preprocessed: brain median .* and minimum"):
        harmonize.check_preprocessed("scan.nii.gz", image * scale + shift, mask)


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    import pathlib

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(InputError, match=r"out/t.txt: cannot write it: no space left on the device"):
        write_text("x", tmp_path / "out" / "t.txt")
    assert list(tmp_path.iterdir()) == []  # no temporary, and not the folder it made


def test_a_failed_command_leaves_no_empty_output_folders(tmp_path, capsys):
    from harmodiff import anatomy

    code = anatomy.main(["--input", str(tmp_path / "missing.nii.gz"), "--mask", str(tmp_path / "m.nii.gz"),
                         "--output", str(tmp_path / "a/b/A.nii.gz"), "--coarse-output", str(tmp_path / "c/Ac.nii.gz")])
    assert code == 2 and "missing.nii.gz: file not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_save_leaves_no_partial(tmp_path):
    """Snakemake cancelling a job, or SLURM's time limit, sends SIGTERM: the temporary goes too."""
    import subprocess
    import sys

    script = (f"import os, signal, numpy as np\nfrom harmodiff.io import atomic_path\n"
              f"with atomic_path({str(tmp_path / 'x.nii.gz')!r}) as tmp:\n"
              "    tmp.write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGTERM)\n    tmp.write_bytes(b'whole')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_directory_as_output_is_refused_before_the_work(tmp_path, capsys):
    (tmp_path / "out.nii.gz").mkdir()
    save_image(np.ones((6, 6, 6)), np.eye(4), tmp_path / "x.nii.gz")
    code = harmonize.main(["--checkpoint", str(tmp_path / "none.pt"), "--input", str(tmp_path / "x.nii.gz"),
                           "--mask", str(tmp_path / "x.nii.gz"), "--target-site", "A",
                           "--output", str(tmp_path / "out.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "out.nii.gz: refusing to write there: the path holds a directory" in err
