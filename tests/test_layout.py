"""Result paths and manifests (harmodiff.layout): lists of scans travel as TSV files whose rows
keep each entry's fields together, and every CLI reads a manifest exactly as it reads the lists."""

import argparse

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT
from harmodiff import layout, metrics
from harmodiff.io import InputError
from harmodiff.workflow_support import scan_table


@pytest.fixture(scope="module")
def test_layout():
    config = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    return layout.Layout(config, scan_table(config)), config


def test_every_manifest_row_keeps_its_scan_together(test_layout):
    lay, config = test_layout
    scans = lay.scans
    for name in lay.manifest_names():
        table = lay.manifest_table(name)
        assert len(table) > 0, name
        for row in table.to_dict("records"):
            files = [row[c] for c in lay.FILE_COLUMNS if c in row]
            if "scan_id" in row:  # each file of the row belongs to the row's scan or subject
                subject = scans.loc[row["scan_id"], "subject"]
                assert all(row["scan_id"] in f or subject in f for f in files), row
            if "site" in row and "image" in row:
                assert f"/{row['site']}/" in row["image"], row
            if "subject" in row and "image" in row:
                assert row["subject"] in row["image"], row


def test_manifest_sizes_follow_the_config(test_layout):
    lay, config = test_layout
    n_test = len(lay.test)
    image_methods = lay.image_methods()  # preprocessed, diffusion, histmatch, rawcopy
    assert image_methods == ["preprocessed", "diffusion", "histmatch", "rawcopy"]
    assert len(lay.manifest_table("segmentations")) == len(image_methods) * n_test
    sweep = config["evaluation"]["guidance_sweep"]
    sweep_scans = (lay.test["subject"] == lay.test_subjects[0]).sum()
    extra = (len(sweep["cfg"]) + len(sweep["cfgpp"]) + len(sweep["seeds"])) * sweep_scans
    assert len(lay.manifest_table("similarity")) == len(image_methods) * n_test + extra
    assert list(lay.manifest_table("train")["site"]) == list(lay.train["site"])
    # the main setting (CFG++ 0.6) in the sweep is the main harmodiff image, not a second run
    similarity = lay.manifest_table("similarity")
    main = similarity[similarity["method"] == "cfgpp_0.6"]
    assert len(main) == sweep_scans and main["image"].str.contains("/harmonized/diffusion/").all()


def test_manifest_round_trip_keeps_ids_as_text(tmp_path):
    table = pd.DataFrame({"image": ["a.nii.gz", "b.nii.gz"], "scan_id": ["007", "1e3"]})
    layout.write_manifest(table, tmp_path / "m.tsv")
    back = layout.read_manifest(tmp_path / "m.tsv", ["image", "scan_id"])
    assert list(back["scan_id"]) == ["007", "1e3"]  # not 7 and 1000.0


@pytest.mark.parametrize("text, message", [
    (None, "manifest not found"),
    ("image\tsite\na.nii.gz\tX\n", "lacks the column(s) mask"),
    ("image\tmask\n", "has no rows"),
    ("image\tmask\na.nii.gz\t\n", "line 2: empty 'mask'"),
])
def test_bad_manifest_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "m.tsv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError) as info:
        layout.read_manifest(path, ["image", "mask"])
    assert str(path) in str(info.value) and message in str(info.value) and "\n" not in str(info.value)


def _parser():
    p = argparse.ArgumentParser()
    layout.add_list_options(p, ("image", "site"))
    return p


def test_lists_and_manifest_give_the_same_arguments(tmp_path):
    pd.DataFrame({"image": ["a", "b"], "site": ["X", "Y"]}).to_csv(tmp_path / "m.tsv", sep="\t", index=False)
    p = _parser()
    from_lists = layout.resolve_lists(p, p.parse_args(["--images", "a", "b", "--sites", "X", "Y"]))
    from_file = layout.resolve_lists(p, p.parse_args(["--manifest", str(tmp_path / "m.tsv")]))
    assert (from_lists.images, from_lists.sites) == (from_file.images, from_file.sites) == (["a", "b"], ["X", "Y"])


@pytest.mark.parametrize("argv, message", [
    (["--images", "a", "b", "--sites", "X"], "same number of entries: --images 2, --sites 1"),
    (["--images", "a"], "--sites missing"),
    (["--manifest", "m.tsv", "--images", "a"], "not both"),
    ([], "give --manifest FILE or all of --images, --sites"),
])
def test_list_mistakes_are_usage_errors(argv, message, capsys):
    p = _parser()
    with pytest.raises(SystemExit) as info:
        layout.resolve_lists(p, p.parse_args(argv))
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_similarity_cli_reads_a_manifest_as_it_reads_the_lists(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for site in ("A", "B", "C"):
        data = rng.normal(500, 50, (10, 10, 10)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{site}.nii.gz"))
        nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), str(tmp_path / f"{site}_m.nii.gz"))
        rows.append({"image": str(tmp_path / f"{site}.nii.gz"), "mask": str(tmp_path / f"{site}_m.nii.gz"),
                     "method": "m", "target": "T", "subject": "s1", "site": site})
    table = pd.DataFrame(rows)
    layout.write_manifest(table, tmp_path / "pairs.tsv")
    assert metrics.main(["pairs", "--manifest", str(tmp_path / "pairs.tsv"), "--output", str(tmp_path / "a.csv")]) == 0
    lists = [f"--{layout.LIST_OPTIONS[c]}" if i == 0 else v for c in table.columns
             for i, v in enumerate([None, *table[c]])]
    assert metrics.main(["pairs", *lists, "--output", str(tmp_path / "b.csv")]) == 0
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    pd.testing.assert_frame_equal(a, b)
    assert list(zip(a["site_a"], a["site_b"])) == [("A", "B"), ("A", "C"), ("B", "C")]


def test_figure2_subject_and_sites_are_configurable(test_layout):
    lay, config = test_layout
    subject = lay.test_subjects[1]
    sites = sorted(lay.test.loc[lay.test["subject"] == subject, "site"])[::-1]
    config = {**config, "evaluation": {**config["evaluation"], "figure_subject": subject, "figure_sites": sites}}
    chosen = layout.Layout(config, lay.scans).manifest_table("figure2")
    assert list(chosen["site"].drop_duplicates()) == sites  # the configured order
    assert chosen["image"].str.contains(subject).all()
    config["evaluation"]["figure_sites"] = ["NOPE"]
    with pytest.raises(InputError, match=f"{subject} has no test scan at NOPE"):
        layout.Layout(config, lay.scans).manifest_table("figure2")
