"""Result paths (harmodiff.layout): each pattern written once, and the paths the rules match."""

from harmodiff import layout
from harmodiff.layout import Paths, result_path


def test_a_field_left_out_stays_a_snakemake_wildcard():
    assert result_path("stage", ".nii.gz", stage="preprocessed", cohort="test") == \
        "results/preprocessed/test/{site}/{scan}.nii.gz"
    assert result_path("stage", "_A.nii.gz", "out", stage="anatomy", cohort="train", site="TRA", scan="s1") == \
        "out/anatomy/train/TRA/s1_A.nii.gz"


def test_every_path_fills_its_pattern():
    paths = Paths("res")
    assert paths.method_image("preprocessed", "none", "TSA", "s1") == "res/preprocessed/test/TSA/s1.nii.gz"
    assert paths.method_image("diffusion", "TRA", "TSA", "s1") == "res/harmonized/diffusion/TRA/TSA/s1.nii.gz"
    assert paths.sweep_image(layout.sweep_method("cfg", 1.0), "TRA", "TSA", "s1") == "res/sweep/cfg_1/TRA/TSA/s1.nii.gz"
    assert paths.seed_image(3, "TRA", "TSA", "s1") == "res/seeds/3/TRA/TSA/s1.nii.gz"
    assert paths.segmentation_volumes("histmatch", "TRA", "TSA", "s1") == \
        "res/segmentation/histmatch/TRA/TSA/s1_volumes.json"
    assert paths.manifest("train") == "res/manifests/train.tsv"
    assert paths.derivative_images("sub-01", "TSA", "TR_A")[1] == \
        "res/derivatives/harmodiff/sub-01/ses-siteTSA/anat/sub-01_ses-siteTSA_desc-harmonizedTOTRA_T1w.nii.gz"
