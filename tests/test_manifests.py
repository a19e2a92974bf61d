"""Manifests (harmodiff.manifests): lists of scans travel as TSV files whose rows keep each entry's
fields together; a CLI reads one into a DataFrame, and a bad one is a usage error naming the file."""

import argparse

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT
from harmodiff import manifests, metrics
from harmodiff.io import InputError
from harmodiff.plan import RunPlan
from harmodiff.workflow_support import scan_table


@pytest.fixture(scope="module")
def test_run():
    config = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    plan = RunPlan(config, scan_table(config))
    return plan, manifests.ManifestTables(plan), config


def test_every_manifest_row_keeps_its_scan_together(test_run):
    plan, tables, config = test_run
    scans = plan.scans
    for name in tables.names():
        table = tables.table(name)
        assert len(table) > 0, name
        for row in table.to_dict("records"):
            files = [row[c] for c in manifests.FILE_COLUMNS if c in row]
            if "scan_id" in row:  # each file of the row belongs to the row's scan or subject
                subject = scans.loc[row["scan_id"], "subject"]
                assert all(row["scan_id"] in f or subject in f for f in files), row
            if "site" in row and "image" in row:
                assert f"/{row['site']}/" in row["image"], row
            if "subject" in row and "image" in row:
                assert row["subject"] in row["image"], row


def test_manifest_sizes_follow_the_config(test_run):
    plan, tables, config = test_run
    n_test = len(plan.test)
    image_methods = plan.image_methods()  # preprocessed, diffusion, histmatch, rawcopy
    assert image_methods == ["preprocessed", "diffusion", "histmatch", "rawcopy"]
    assert len(tables.table("segmentations")) == len(image_methods) * n_test
    sweep = config["evaluation"]["guidance_sweep"]
    sweep_scans = (plan.test["subject"] == plan.test_subjects[0]).sum()
    extra = (len(sweep["cfg"]) + len(sweep["cfgpp"]) + len(sweep["seeds"])) * sweep_scans
    assert len(tables.table("similarity")) == len(image_methods) * n_test + extra
    assert list(tables.table("train")["site"]) == list(plan.train["site"])
    # the main setting (CFG++ 0.6) in the sweep is the main harmodiff image, not a second run
    similarity = tables.table("similarity")
    main = similarity[similarity["method"] == "cfgpp_0.6"]
    assert len(main) == sweep_scans and main["image"].str.contains("/harmonized/diffusion/").all()


def test_a_new_sites_target_only_scans_teach_its_token_and_are_histogram_matchings_reference():
    config = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    config["cohort"]["synthetic"].update(new_sites=1, new_site_subjects=2)
    config["target_sites"] = ["TRA", "NSA"]
    plan = RunPlan(config, scan_table(config))
    tables = manifests.ManifestTables(plan)
    assert plan.learned_sites == ["NSA"] and plan.learned_site_file("TRA") is None
    assert plan.learned_site_file("NSA") == "results/model/diffusion/sites/NSA.site.pt"
    target_only = ["results/preprocessed/target/NSA/sub-ns001_ses-NSA.nii.gz",
                   "results/preprocessed/target/NSA/sub-ns002_ses-NSA.nii.gz"]
    for name in ("learn_site-NSA", "histmatch-NSA"):
        assert list(tables.table(name)["image"]) == target_only
        assert list(tables.table(name)["mask"]) == [f.replace(".nii.gz", "_mask.nii.gz") for f in target_only]
    assert "learn_site-TRA" not in tables.names() and list(tables.table("histmatch-TRA")["image"]) == [
        "results/preprocessed/train/TRA/sub-tr001_ses-TRA.nii.gz"]
    assert "NSA" not in set(tables.table("train")["site"])  # the model never trains on them
    # every traveling subject's truth at the new site is scored like a training site's
    truth = tables.table("truth_targets")
    assert sorted(truth.loc[truth["target"] == "NSA", "subject"]) == plan.test_subjects


def test_the_runs_manifest_lists_each_sweep_scans_other_settings_under_its_main_image(test_run):
    """config/test.yaml: main CFG++ 0.6, sweep cfg [1.0], cfgpp [0.6], seeds [1], one sweep subject:
    per sweep scan, CFG 1.0 and the main setting under run seed 1; CFG++ 0.6 is the main run itself."""
    plan, tables, _ = test_run
    runs = tables.table("sweep_runs")
    sweep_scans = plan.sweep_scans()
    assert len(runs) == 2 * len(sweep_scans) * len(plan.target_sites)
    for r in sweep_scans.itertuples():
        main = plan.paths.method_image("diffusion", "TRA", r.site, r.Index)
        mine = runs[runs["main_output"] == main]
        assert mine[["guidance", "scale", "seed"]].values.tolist() == [["cfg", "1", ""], ["", "", "1"]]
        assert list(mine["output"]) == [plan.paths.sweep_image("cfg_1", "TRA", r.site, r.Index),
                                        plan.paths.seed_image(1, "TRA", r.site, r.Index)]


def test_manifest_round_trip_keeps_ids_as_text(tmp_path):
    table = pd.DataFrame({"image": ["a.nii.gz", "b.nii.gz"], "scan_id": ["007", "1e3"]})
    manifests.write_manifest(table, tmp_path / "m.tsv")
    back = manifests.read_manifest(tmp_path / "m.tsv", ["image", "scan_id"])
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
        manifests.read_manifest(path, ["image", "mask"])
    assert str(path) in str(info.value) and message in str(info.value) and "\n" not in str(info.value)


def test_a_manifest_option_gives_the_table_or_a_usage_error_naming_the_file(tmp_path, capsys):
    p = argparse.ArgumentParser()
    manifests.add_manifest_option(p, ("image", "site"))
    manifests.add_manifest_option(p, ("run", "seed"), option="--runs", required=False, may_be_empty=("seed",))
    pd.DataFrame({"image": ["a", "b"], "site": ["X", "Y"]}).to_csv(tmp_path / "m.tsv", sep="\t", index=False)
    pd.DataFrame({"run": ["r"], "seed": [""]}).to_csv(tmp_path / "r.tsv", sep="\t", index=False)
    a = p.parse_args(["--manifest", str(tmp_path / "m.tsv"), "--runs", str(tmp_path / "r.tsv")])
    assert a.manifest.values.tolist() == [["a", "X"], ["b", "Y"]] and a.runs["seed"].tolist() == [""]
    assert p.parse_args(["--manifest", str(tmp_path / "m.tsv")]).runs is None
    for argv, message in ([["--manifest", str(tmp_path / "r.tsv")], "lacks the column(s) image, site"],
                          [[], "the following arguments are required: --manifest"]):
        with pytest.raises(SystemExit) as info:
            p.parse_args(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err


def test_similarity_cli_reads_its_entries_from_the_manifest(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for site in ("A", "B", "C"):
        data = rng.normal(500, 50, (10, 10, 10)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{site}.nii.gz"))
        nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), str(tmp_path / f"{site}_m.nii.gz"))
        rows.append({"image": str(tmp_path / f"{site}.nii.gz"), "mask": str(tmp_path / f"{site}_m.nii.gz"),
                     "method": "m", "target": "T", "subject": "s1", "site": site})
    table = pd.DataFrame(rows)
    manifests.write_manifest(table, tmp_path / "pairs.tsv")
    assert metrics.main(["pairs", "--manifest", str(tmp_path / "pairs.tsv"), "--output", str(tmp_path / "a.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), metrics.pairwise_similarity(table))
    assert list(zip(pd.read_csv(tmp_path / "a.csv")["site_a"], pd.read_csv(tmp_path / "a.csv")["site_b"])) == [
        ("A", "B"), ("A", "C"), ("B", "C")]


def test_figure2_subject_and_sites_are_configurable(test_run):
    plan, _, config = test_run
    subject = plan.test_subjects[1]
    sites = sorted(plan.test.loc[plan.test["subject"] == subject, "site"])[::-1]
    config = {**config, "evaluation": {**config["evaluation"], "figure_subject": subject, "figure_sites": sites}}
    chosen = manifests.ManifestTables(RunPlan(config, plan.scans)).table("figure2")
    assert list(chosen["site"].drop_duplicates()) == sites  # the configured order
    assert chosen["image"].str.contains(subject).all()
    config["evaluation"]["figure_sites"] = ["NOPE"]
    with pytest.raises(InputError, match=f"{subject} has no test scan at NOPE"):
        manifests.ManifestTables(RunPlan(config, plan.scans)).table("figure2")
