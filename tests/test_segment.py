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


def test_atropos_posteriors_on_a_synthetic_brain(tiny_cohort):
    """Atropos on a noise-free synthetic brain on the working grid: posteriors sum to one in the
    brain, WM is found where the truth has WM, and the WM ratio is close to the truth's.

    (GM is not compared: the synthetic GM truth is a soft, population-smooth map whose volume a
    segmentation of the image cannot recover; see the note of issue 8.)"""
    out, _ = tiny_cohort
    row = pd.read_csv(out / "truth/scans.tsv", sep="\t").iloc[0]
    shape = (80, 96, 80)
    aff = working_grid(2.0, shape)
    image = _on_grid(out / f"truth/rendered/{row.scan_id}.nii.gz", aff, shape)
    mask = _on_grid(out / f"truth/subjects/{row.subject}_mask.nii.gz", aff, shape) > 0.5
    wm_truth = _on_grid(out / f"truth/subjects/{row.subject}_wm.nii.gz", aff, shape)
    probs = sg.segment_atropos(image, mask, aff)
    total = sum(probs[t] for t in sg.TISSUES)
    np.testing.assert_allclose(total[mask], 1.0, atol=1e-3)
    assert (total[~mask] == 0).all()
    core = mask & (wm_truth > 0.9)
    assert probs["wm"][core].mean() > 0.9
    truth = pd.read_csv(out / "truth/subjects.tsv", sep="\t").set_index("subject")
    assert sg.tissue_volumes(probs, 8 / 1000)["wm_ratio"] == pytest.approx(truth.loc[row.subject, "wm_ratio"], abs=0.05)


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
    assert [t["native"] for t in job["tissue"]] == [[1, 0]] * 3 + [[0, 0]] * 3  # c1, c2, c3 written
    assert [t["ngaus"] for t in job["tissue"]] == [1, 1, 2, 3, 4, 2]  # SPM's defaults
    assert job["warp"]["affreg"] == "mni"
