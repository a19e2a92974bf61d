"""BIDS-Derivatives naming and sidecars (harmodiff.derivatives, RunPlan.derivative_images)."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT
from harmodiff import derivatives, layout
from harmodiff.io import InputError
from harmodiff.plan import RunPlan
from harmodiff.workflow_support import scan_table


@pytest.mark.parametrize("name, prefix, label", [("sub-ts01", "sub-", "ts01"), ("TSA", "ses-", "TSA"),
                                                 ("site_A-2", "", "siteA2"), ("sub-01", "sub-", "01")])
def test_bids_labels_are_alphanumeric(name, prefix, label):
    assert layout.bids_label(name, prefix) == label


def test_a_name_without_letters_or_digits_is_refused():
    with pytest.raises(InputError, match="no letters or digits"):
        layout.bids_label("sub-__", "sub-")


def test_derivative_names_follow_the_scan_and_target():
    config = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    lay = RunPlan(config, scan_table(config))
    mni, native = lay.derivative_images("TRA", "TSB", "sub-ts02_ses-TSB")
    assert mni == ("results/derivatives/harmodiff/sub-ts02/ses-siteTSB/anat/"
                   "sub-ts02_ses-siteTSB_space-MNI152NLin2009aSym_desc-harmonizedTOTRA_T1w.nii.gz")
    assert native == mni.replace("_space-MNI152NLin2009aSym", "")
    assert len(lay.bids_index) == len(lay.test) * len(config["target_sites"])


def test_two_scans_with_one_bids_name_are_an_error():
    config = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    scans = scan_table(config)
    test = scans[scans["cohort"] == "test"]
    clash = test.iloc[:1].copy()
    clash.index = ["sub-ts01_ses-TSA_run2"]
    clash["scan_id"] = clash.index
    lay = RunPlan(config, pd.concat([scans, clash]))
    with pytest.raises(InputError, match="would share one BIDS name"):
        _ = lay.bids_index


def test_export_writes_both_spaces_with_provenance(tmp_path, monkeypatch):
    image = tmp_path / "h.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(image))
    (tmp_path / "h.json").write_text(json.dumps({"target_site": "TRA", "checkpoint_sha256": "ab"}))
    calls = []
    monkeypatch.setattr(derivatives, "to_native", lambda *a: (calls.append(a), nib.save(
        nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(a[3]))))
    mni, native = tmp_path / "out/x_space-S_T1w.nii.gz", tmp_path / "out/x_T1w.nii.gz"
    assert derivatives.main(["image", "--harmonized", str(image), "--raw", "raw.nii.gz", "--transform", "t.mat",
                             "--mni-output", str(mni), "--native-output", str(native)]) == 0
    assert nib.load(str(mni)).shape == (4, 4, 4) and nib.load(str(native)).shape == (2, 2, 2)
    side = json.loads((tmp_path / "out/x_space-S_T1w.json").read_text())
    assert side["Space"] == derivatives.SPACE and side["Provenance"]["checkpoint_sha256"] == "ab"
    assert "Space" not in json.loads((tmp_path / "out/x_T1w.json").read_text())
    assert calls[0][1:3] == ("raw.nii.gz", "t.mat")
    (tmp_path / "h.json").unlink()  # no provenance: nothing written
    assert derivatives.main(["image", "--harmonized", str(image), "--raw", "r", "--transform", "t",
                             "--mni-output", str(tmp_path / "b/a.nii.gz"), "--native-output",
                             str(tmp_path / "b/n.nii.gz")]) == 2
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
