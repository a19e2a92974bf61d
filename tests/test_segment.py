import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from harmodiff import segment as sg
from harmodiff.templates import working_grid


def _on_grid(path, affine, shape, order=1):
    img = nib.load(str(path))
    m = np.linalg.inv(img.affine) @ affine
    return ndimage.affine_transform(img.get_fdata(dtype=np.float32), m[:3, :3], m[:3, 3], output_shape=shape, order=order)


def test_atropos_posteriors_on_a_synthetic_brain(tiny_cohort, tmp_path, monkeypatch):
    """Atropos on noise-free synthetic brains on the working grid: posteriors sum to one in the
    brain, WM is found where the truth has WM, and the tissue volumes follow the true ones across
    subjects (r >= 0.9; ratios in the same order). Atropos's MNI priors and partial volume pull
    the GM ratio of an atrophied cortex towards the population mean (measured 0.46-0.49 for true
    0.36-0.47), so values are not compared one to one. Atropos's temporary posteriors are gone
    afterwards ($TMPDIR as empty as before)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out, _ = tiny_cohort
    scans = pd.read_csv(out / "truth/scans.tsv", sep="\t").drop_duplicates("subject")
    truth = pd.read_csv(out / "truth/subjects.tsv", sep="\t").set_index("subject")
    shape = (80, 96, 80)
    aff = working_grid(2.0, shape)
    found = {}
    for row in scans.itertuples():
        image = _on_grid(out / f"truth/rendered/{row.scan_id}.nii.gz", aff, shape)
        mask = _on_grid(out / f"truth/subjects/{row.subject}_mask.nii.gz", aff, shape) > 0.5
        probs = sg.segment_atropos(image, mask, aff)
        assert list(tmp_path.iterdir()) == []
        total = sum(probs[t] for t in sg.TISSUES)
        np.testing.assert_allclose(total[mask], 1.0, atol=1e-3)
        assert (total[~mask] == 0).all()
        wm_truth = _on_grid(out / f"truth/subjects/{row.subject}_wm.nii.gz", aff, shape)
        assert probs["wm"][mask & (wm_truth > 0.9)].mean() > 0.9
        found[row.subject] = sg.tissue_volumes(probs, 8 / 1000)
        if len(found) == 1:  # reproducible: Atropos seeds its sampler from the clock unless told (r=0)
            again = sg.segment_atropos(image, mask, aff)
            assert all(np.array_equal(probs[t], again[t]) for t in sg.TISSUES)
    for tissue in ("gm", "wm"):
        est = np.array([found[s][f"{tissue}_ml"] for s in found])
        true = truth.loc[list(found), f"{tissue}_ml"].to_numpy()
        assert np.corrcoef(est, true)[0, 1] >= 0.9, (tissue, est, true)
        ratio = np.array([found[s][f"{tissue}_ratio"] for s in found])
        assert (np.argsort(ratio) == np.argsort(truth.loc[list(found), f"{tissue}_ratio"].to_numpy())).all()


def test_tissue_volumes_formula():
    probs = {"gm": np.full((2, 2, 2), 0.5), "wm": np.full((2, 2, 2), 0.25), "csf": np.full((2, 2, 2), 0.25)}
    v = sg.tissue_volumes(probs, 0.001)
    assert v["gm_ml"] == pytest.approx(0.004) and v["gm_ratio"] == pytest.approx(0.5)
    assert v["wm_ratio"] + v["csf_ratio"] == pytest.approx(0.5)


def test_spm_batch_structure():
    batch = sg.spm_batch("/data/scan.nii", "/spm/tpm/TPM.nii")
    job = batch[0]["spm"]["spatial"]["preproc"]
    assert job["channel"]["vols"] == ["/data/scan.nii,1"]
    assert [t["tpm"][0] for t in job["tissue"]] == [f"/spm/tpm/TPM.nii,{k}" for k in range(1, 7)]
    assert [list(t["native"]) for t in job["tissue"]] == [[1, 0]] * 3 + [[0, 0]] * 3  # c1, c2, c3 written
    assert all(isinstance(t["native"], np.ndarray) for t in job["tissue"])  # MATLAB numeric, not a cell
    assert [t["ngaus"] for t in job["tissue"]] == [1, 1, 2, 3, 4, 2]  # SPM's defaults
    assert job["warp"]["affreg"] == "mni"


def _striped_phantom(shape=(40, 40, 40)):
    """Tissue fractions that repeat along x every 20 voxels: CSF, a CSF->GM ramp, GM, a GM->WM
    ramp, WM; one-hot posteriors on pure voxels, 0.5/0.5 on ramps."""
    period = [("csf", 4), ("csf-gm", 3), ("gm", 4), ("gm-wm", 3), ("wm", 6)]
    profile = {t: [] for t in sg.TISSUES}
    for part, n in period:
        for i in range(n):
            f = {t: 0.0 for t in sg.TISSUES}
            if "-" in part:
                lo, hi = part.split("-")
                f[hi] = (i + 1) / (n + 1)
                f[lo] = 1 - f[hi]
            else:
                f[part] = 1.0
            for t in sg.TISSUES:
                profile[t].append(f[t])
    reps = shape[0] // 20
    fractions = {t: np.broadcast_to(np.tile(profile[t], reps)[:, None, None], shape).astype(np.float32)
                 for t in sg.TISSUES}
    probs = {t: np.where((fractions[t] > 0) & (fractions[t] < 1), 0.5, fractions[t]).astype(np.float32)
             for t in sg.TISSUES}
    return fractions, probs


def test_partial_volume_fractions_recover_known_mixtures():
    """Intensity = sum of fraction x class intensity: unmixing returns the fractions exactly."""
    fractions, probs = _striped_phantom()
    level = {"csf": 0.3, "gm": 0.6, "wm": 0.9}
    image = sum(fractions[t] * level[t] for t in sg.TISSUES)
    mask = np.ones(image.shape, bool)
    mask[:, :, -3:] = False
    out = sg.tissue_fractions(image, mask, np.diag([2.0, 2.0, 2.0, 1.0]), probs, "unmix")
    for t in sg.TISSUES:
        np.testing.assert_allclose(out[t][mask], fractions[t][mask], atol=1e-5)
        assert (out[t][~mask] == 0).all()
    assert sg.tissue_fractions(image, mask, np.eye(4), probs, "posterior") is probs


def test_local_class_means_follow_a_bias_field():
    """A smooth multiplicative bias (+-15 % across the volume, along y): local class means track it,
    so away from the volume's edge (where a one-sided neighbourhood averages the trend) the
    fractions stay within 0.03 of the truth, where one global mean per class errs > 3x more."""
    fractions, probs = _striped_phantom()
    level = {"csf": 0.3, "gm": 0.6, "wm": 0.9}
    bias = np.linspace(0.85, 1.15, 40, dtype=np.float32)[None, :, None]
    image = sum(fractions[t] * level[t] for t in sg.TISSUES) * bias
    mask = np.ones(image.shape, bool)
    spacing = (2.0, 2.0, 2.0)
    local = sg.partial_volume_fractions(image, mask, sg.local_class_means(image, mask, probs, spacing))
    flat = sg.partial_volume_fractions(image, mask, sg.local_class_means(image, mask, probs, spacing, sigma_mm=1e4))
    inner = (slice(None), slice(8, -8), slice(None))
    err_local = max(np.abs(local[t] - fractions[t])[inner].max() for t in sg.TISSUES)
    err_flat = max(np.abs(flat[t] - fractions[t])[inner].max() for t in sg.TISSUES)
    assert err_local < 0.03, err_local
    assert err_flat > 3 * err_local, (err_flat, err_local)
    total = sum(local[t] for t in sg.TISSUES)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_empty_tissue_class_is_a_clear_error():
    fractions, probs = _striped_phantom()
    probs["csf"] = np.zeros_like(probs["csf"])
    image = fractions["gm"] * 0.6 + fractions["wm"] * 0.9
    with pytest.raises(sg.InputError, match="'csf' is empty"):
        sg.tissue_fractions(image, np.ones(image.shape, bool), np.eye(4), probs, "unmix")


class FakeSPM:
    """Stands in for spm-python (no MATLAB Runtime here): records the calls and writes c1/c2/c3
    exactly as SPM names and places them (c<k><name>.nii beside the .nii it read, same grid)."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def spm(self, *args):
        self.calls.append(("spm", args))
        return str(self.root) if args == ("Dir",) else None

    def spm_jobman(self, command, batch=None, nargout=1):
        self.calls.append(("spm_jobman", command))
        if command != "run":
            return
        self.batch = batch
        path = batch[0]["spm"]["spatial"]["preproc"]["channel"]["vols"][0].removesuffix(",1")
        assert path.endswith(".nii"), "SPM reads uncompressed NIfTI only"
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        folder, name = os.path.split(path)
        for k, level in ((1, 2.0), (2, 3.0), (3, 1.0)):
            nib.save(nib.Nifti1Image((np.abs(data - level) < 0.5).astype(np.float32), img.affine),
                     os.path.join(folder, f"c{k}{name}"))


def test_run_spm_decompresses_runs_the_batch_and_reads_c1_c2_c3(tmp_path):
    labels = np.ones((10, 10, 10), np.float32)
    labels[3:7] = 2.0
    labels[7:] = 3.0
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(labels * 100 / 100, np.diag([2.0, 2.0, 2.0, 1.0])), str(scan))
    mask = np.ones(labels.shape, bool)
    mask[0] = False
    fake = FakeSPM(tmp_path / "spm25")
    probs = sg.run_spm(scan, mask, spm=fake)
    np.testing.assert_array_equal(probs["gm"], ((labels == 2) & mask).astype(np.float32))
    np.testing.assert_array_equal(probs["wm"], ((labels == 3) & mask).astype(np.float32))
    np.testing.assert_array_equal(probs["csf"], ((labels == 1) & mask).astype(np.float32))
    job = fake.batch[0]["spm"]["spatial"]["preproc"]
    assert job["tissue"][0]["tpm"] == [f"{tmp_path / 'spm25' / 'tpm' / 'TPM.nii'},1"]
    assert [c for c in fake.calls if c[0] == "spm_jobman"] == [("spm_jobman", "initcfg"), ("spm_jobman", "run")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]  # nothing written beside the input
    lazy = FakeSPM(tmp_path / "spm25")
    lazy.spm_jobman = lambda command, batch=None, nargout=1: None  # SPM failed: writes nothing
    with pytest.raises(sg.InputError, match=r"scan.nii.gz: SPM wrote no c1scan.nii"):
        sg.run_spm(scan, mask, spm=lazy)


def test_segment_cli_with_the_spm_backend(tmp_path, monkeypatch):
    import json
    import sys
    import types

    labels = np.ones((10, 10, 10), np.float32)
    labels[4:] = 2.0
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "scan.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), str(tmp_path / "mask.nii.gz"))
    fake = FakeSPM(tmp_path / "spm25")
    monkeypatch.setitem(sys.modules, "spm", types.SimpleNamespace(spm=fake.spm, spm_jobman=fake.spm_jobman))
    assert sg.main(["--input", str(tmp_path / "scan.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"),
                    "--output-prefix", str(tmp_path / "seg"), "--backend", "spm"]) == 0
    volumes = json.loads((tmp_path / "seg_volumes.json").read_text())
    assert volumes["gm_ml"] == pytest.approx(0.6) and volumes["csf_ml"] == pytest.approx(0.4)
    assert volumes["wm_ml"] == 0
