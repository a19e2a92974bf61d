import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from harmodiff import scans
from harmodiff.io import InputError


def _nii(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4)), str(path))
    return path


@pytest.fixture
def sheet(tmp_path):
    for n in ("a", "b", "c"):
        _nii(tmp_path / f"{n}.nii.gz")
    df = pd.DataFrame({"scan_id": ["s1", "s2", "s3"], "subject": ["x", "y", "x"], "site": ["A", "A", "B"],
                       "cohort": ["train", "train", "test"], "path": ["a.nii.gz", "b.nii.gz", "c.nii.gz"]})
    return tmp_path, df


def _write(tmp_path, df):
    p = tmp_path / "scans.tsv"
    df.to_csv(p, sep="\t", index=False)
    return p


def test_valid_sheet_resolves_relative_paths(sheet):
    tmp, df = sheet
    out = scans.read_scan_sheet(_write(tmp, df), target_sites=["A"])
    assert list(out["path"]) == [str((tmp / f"{n}.nii.gz").resolve()) for n in "abc"]


def test_unknown_column(sheet):
    tmp, df = sheet
    df["age"] = 30
    with pytest.raises(InputError, match=r"unknown column\(s\) \['age'\]"):
        scans.read_scan_sheet(_write(tmp, df))


def test_duplicate_scan_id_names_rows(sheet):
    tmp, df = sheet
    df.loc[2, "scan_id"] = "s1"
    with pytest.raises(InputError, match=r"row 4: duplicate scan_id 's1' \(first on row 2\)"):
        scans.read_scan_sheet(_write(tmp, df))


def test_missing_and_non_nifti_files_name_row_and_path(sheet):
    tmp, df = sheet
    df.loc[1, "path"] = "gone.nii.gz"
    with pytest.raises(InputError, match=r"row 3 \(scan_id 's2'\): file not found: .*gone.nii.gz"):
        scans.read_scan_sheet(_write(tmp, df))
    (tmp / "text.nii.gz").write_text("hello")
    df.loc[1, "path"] = "text.nii.gz"
    with pytest.raises(InputError, match=r"row 3 \(scan_id 's2'\): not a NIfTI file: .*text.nii.gz"):
        scans.read_scan_sheet(_write(tmp, df))


def test_bad_cohort_value_names_row_and_column(sheet):
    tmp, df = sheet
    df.loc[0, "cohort"] = "training"
    with pytest.raises(InputError, match=r"row 2 \(scan_id 's1'\): cohort: 'training' is not one of"):
        scans.read_scan_sheet(_write(tmp, df))


def test_target_without_training_scans(sheet):
    tmp, df = sheet
    with pytest.raises(InputError, match=r"target site 'B' has no training scans and no target-only scans "
                                         r"\(cohort target\) to learn it from \(training sites: \['A'\]\)"):
        scans.read_scan_sheet(_write(tmp, df), target_sites=["B"])


def test_a_target_site_may_be_a_scanner_known_only_by_its_target_only_scans(sheet):
    tmp, df = sheet
    new = df.iloc[[0]].assign(scan_id="n1", subject="n1", site="NEW", cohort="target")
    new["path"] = [str(_nii(tmp / "n1.nii.gz"))]
    both = pd.concat([df, new], ignore_index=True)
    assert list(scans.read_scan_sheet(_write(tmp, both), target_sites=["A", "NEW"])["cohort"])[-1] == "target"
    with pytest.raises(InputError, match=r"site 'NEW' has target-only scans \(cohort target\) but is not in config "
                                         "target_sites"):
        scans.read_scan_sheet(_write(tmp, both), target_sites=["A"])
    clash = both.assign(site=lambda d: d["site"].where(d["cohort"] != "target", "A"))
    with pytest.raises(InputError, match=r"site 'A' has target-only scans \(cohort target\) and is a training site"):
        scans.read_scan_sheet(_write(tmp, clash), target_sites=["A"])
    # a pretrained model's sites count as training sites when the sheet has none
    scans.check_target_sites(new, ["NEW", "TRA"], "sheet", trained_sites=["TRA"])
    with pytest.raises(InputError, match=r"site 'TRA' has target-only scans .* and is a training site"):
        scans.check_target_sites(new.assign(site="TRA"), ["TRA"], "sheet", trained_sites=["TRA"])


def test_bids_builder_reads_site_from_sessions_then_participants(tmp_path):
    _nii(tmp_path / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz")
    _nii(tmp_path / "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz")
    _nii(tmp_path / "sub-02/anat/sub-02_T1w.nii")
    _nii(tmp_path / "sub-02/anat/sub-02_T2w.nii")  # not a T1w: ignored
    pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "scanner": ["P1", "P2"]}).to_csv(
        tmp_path / "participants.tsv", sep="\t", index=False)
    pd.DataFrame({"session_id": ["ses-1", "ses-2"], "scanner": ["S1", "S2"]}).to_csv(
        tmp_path / "sub-01/sub-01_sessions.tsv", sep="\t", index=False)
    df = scans.from_bids(tmp_path, site_column="scanner", cohort="train")
    got = dict(zip(df["scan_id"], df["site"]))
    assert got == {"sub-01_ses-1": "S1", "sub-01_ses-2": "S2", "sub-02": "P2"}
    assert set(df["subject"]) == {"sub-01", "sub-02"}
    with pytest.raises(InputError, match="no 'site' for sub-"):
        scans.from_bids(tmp_path, site_column="site")


def test_srpbs_builder_drops_repeated_runs(tmp_path):
    for sub in ("sub-01", "sub-02"):
        for site in ("KPM", "ATV", "HUH"):
            _nii(tmp_path / f"{sub}/ses-site{site}/anat/{sub}_ses-site{site}_T1w.nii.gz")
    _nii(tmp_path / "sub-01/ses-siteKPM/anat/sub-01_ses-siteKPM_run-2_T1w.nii.gz")
    df = scans.from_srpbs(tmp_path)
    assert len(df) == 6
    assert set(df["site"]) == {"KPM", "ATV", "HUH"} and set(df["cohort"]) == {"test"}
    kpm1 = df.set_index("scan_id").loc["sub-01_ses-siteKPM", "path"]
    assert kpm1.endswith("sub-01_ses-siteKPM_T1w.nii.gz")


def test_cli_check_reports_row(sheet, capsys):
    tmp, df = sheet
    df.loc[0, "path"] = "missing.nii.gz"
    with pytest.raises(SystemExit) as exc:
        scans.main(["check", str(_write(tmp, df))])
    assert exc.value.code == 2
    assert "row 2" in capsys.readouterr().err


def test_a_sheet_without_test_or_train_rows_is_one_line_at_parse_time(tmp_path):
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from harmodiff.io import InputError
    from harmodiff.workflow_support import scan_table

    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "a.nii.gz"))
    for cohort, missing in (("train", "test"), ("test", "train")):
        sheet = tmp_path / f"{cohort}.tsv"
        pd.DataFrame({"scan_id": ["a"], "subject": ["s1"], "site": ["X"], "cohort": [cohort],
                      "path": ["a.nii.gz"]}).to_csv(sheet, sep="\t", index=False)
        targets = ["X"] if cohort == "train" else []
        with pytest.raises(InputError, match=f"no '{missing}' rows"):
            scan_table({"cohort": {"source": "sheet", "sheet": str(sheet)}, "target_sites": targets})


def test_participants_and_srpbs_filters_pin_the_scan_set(tmp_path):
    """cohort.participants keeps those test subjects (training scans stay); cohort.srpbs.sites and
    .subjects pin the traveling-subject set; a name with no scans is one line naming it."""
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from harmodiff.io import InputError
    from harmodiff.workflow_support import scan_table

    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    for sub in ("sub-01", "sub-02", "sub-03"):
        for site in ("ATV", "KUS", "KPM"):
            d = tmp_path / "srpbs" / sub / f"ses-site{site}" / "anat"
            d.mkdir(parents=True)
            nib.save(img, str(d / f"{sub}_ses-site{site}_T1w.nii.gz"))
    nib.save(img, str(tmp_path / "t.nii.gz"))
    pd.DataFrame({"scan_id": ["t1"], "subject": ["t1"], "site": ["TR"], "cohort": ["train"],
                  "path": [str(tmp_path / "t.nii.gz")]}).to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    srpbs = {"root": str(tmp_path / "srpbs"), "training_sheet": str(tmp_path / "train.tsv")}
    config = {"cohort": {"source": "srpbs", "srpbs": srpbs}, "target_sites": ["TR"]}
    assert (scan_table(config)["cohort"] == "test").sum() == 9
    config["cohort"]["srpbs"] = {**srpbs, "sites": ["ATV", "KUS"], "subjects": ["sub-01", "sub-02"]}
    pinned = scan_table(config)
    test = pinned[pinned["cohort"] == "test"]
    assert sorted(zip(test["subject"], test["site"])) == [("sub-01", "ATV"), ("sub-01", "KUS"),
                                                          ("sub-02", "ATV"), ("sub-02", "KUS")]
    assert list(pinned.loc[pinned["cohort"] == "train", "scan_id"]) == ["t1"]
    config["cohort"]["participants"] = ["sub-02"]
    assert set(scan_table(config).query("cohort == 'test'")["subject"]) == {"sub-02"}
    config["cohort"]["participants"] = ["sub-03"]  # filtered out by srpbs.subjects already
    with pytest.raises(InputError, match=r"cohort.participants: sub-03 not found in srpbs test scans"):
        scan_table(config)
    config["cohort"] = {"source": "srpbs", "srpbs": {**srpbs, "sites": ["XYZ"]}}
    with pytest.raises(InputError, match=r"cohort.srpbs.sites: XYZ not found in .*srpbs \(has: ATV, KPM, KUS\)"):
        scan_table(config)


def test_readable_reads_voxel_data_and_names_every_bad_scan(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from harmodiff import scans

    good = np.ones((6, 6, 6), np.float32)
    nan = good.copy()
    nan[2, 2, 2] = np.nan
    for name, data in (("good", good), ("nan", nan), ("zero", np.zeros_like(good))):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    report = scans.readable_report(["g", "n", "z"], [tmp_path / f"{n}.nii.gz" for n in ("good", "nan", "zero")])
    assert list(report["shape"]) == ["6x6x6", "", ""]
    assert report["problem"][0] == "" and "NaN" in report["problem"][1] and report["problem"][2] != ""
    out = tmp_path / "report.tsv"
    with pytest.raises(SystemExit) as info:
        scans.main(["readable", "--manifest", _listing(tmp_path / "both.tsv", {"g": "good", "n": "nan"}),
                    "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: 1 of 2 scans cannot be used:") and "nan.nii.gz" in err
    assert not out.exists()
    assert scans.main(["readable", "--manifest", _listing(tmp_path / "good.tsv", {"g": "good"}), "--output", str(out)]) == 0
    assert out.read_text().splitlines()[1].split("\t")[2] == "6x6x6"


def _listing(path, scans: dict) -> str:
    """A raw_scans manifest (scan_id, image) of the scans {id: name} beside it."""
    pd.DataFrame({"scan_id": list(scans), "image": [str(path.parent / f"{n}.nii.gz") for n in scans.values()]}).to_csv(
        path, sep="\t", index=False)
    return str(path)


HOSTILE = ["$(touch PWNED)", "`touch PWNED`", "a;touch PWNED", "a b", "a\nb", "-rf"]


@pytest.mark.parametrize("column", ["scan_id", "subject", "site"])
@pytest.mark.parametrize("value", HOSTILE)
def test_id_columns_hold_only_file_name_characters_naming_the_row(sheet, column, value):
    """subject, site and scan_id name output files and go on command lines: shell syntax, spaces,
    newlines or a leading '-' stop the sheet at validation, naming the row and the column."""
    tmp, df = sheet
    df.loc[1, column] = value
    with pytest.raises(InputError) as info:
        scans.validate_scan_sheet(df, base_dir=tmp)
    assert f"row 3 (scan_id {df.loc[1, 'scan_id']!r}): {column}: {value!r} may hold only letters" in str(info.value)
    assert not list(tmp.glob("PWNED*"))


def test_a_path_may_hold_shell_characters_but_no_control_characters(sheet):
    tmp, df = sheet
    odd = tmp / "my study $(touch PWNED) `x`; y" / "c.nii.gz"
    _nii(odd)
    df.loc[2, "path"] = str(odd)
    out = scans.validate_scan_sheet(df, base_dir=tmp)
    assert out.loc[2, "path"] == str(odd.resolve())
    df.loc[2, "path"] = "c\n.nii.gz"
    with pytest.raises(InputError, match=r"row 4 \(scan_id 's3'\): path: 'c\\n.nii.gz' holds a tab, newline"):
        scans.validate_scan_sheet(df, base_dir=tmp)


def test_one_file_under_two_scan_ids_is_refused_naming_both_rows(sheet):
    """The same file as a training and a test scan (by name, or through a symlink) would leak test
    data into training."""
    tmp, df = sheet
    (tmp / "link.nii.gz").symlink_to(tmp / "a.nii.gz")
    for path in ("a.nii.gz", "./a.nii.gz", "link.nii.gz"):
        df.loc[2, "path"] = path
        with pytest.raises(InputError, match=r"row 4 \(scan_id 's3'\): the same file as row 2 \(scan_id 's1'\)"):
            scans.validate_scan_sheet(df, base_dir=tmp)


def test_one_image_in_two_files_is_refused_by_the_read_in_full_check(tmp_path):
    """A .nii copy of a .nii.gz is another file but the same scan: scans_readable hashes each
    image's voxels and affine and names the second row."""
    rng = np.random.default_rng(0)
    img = nib.Nifti1Image(rng.normal(100, 10, (6, 6, 6)).astype(np.float32), np.diag([2, 2, 2, 1]))
    nib.save(img, str(tmp_path / "a.nii.gz"))
    nib.save(img, str(tmp_path / "copy.nii"))
    nib.save(nib.Nifti1Image(img.get_fdata().astype(np.float32), np.eye(4)), str(tmp_path / "moved.nii.gz"))
    report = scans.readable_report(["a", "copy", "moved"], [tmp_path / n for n in ("a.nii.gz", "copy.nii", "moved.nii.gz")])
    assert list(report["problem"] == "") == [True, False, True]  # same voxels, other affine: another scan
    assert report["problem"][1].startswith("the same image (voxels and affine) as scan 'a'")


def test_a_scan_id_that_names_another_scans_mask_is_refused(sheet):
    tmp, df = sheet
    df.loc[1, "scan_id"] = "s1_mask"  # s1 is at site A too: s1's mask would be s1_mask.nii.gz
    with pytest.raises(InputError, match=r"row 3 \(scan_id 's1_mask'\): .* name of row 2's mask"):
        scans.validate_scan_sheet(df, base_dir=tmp)
    df.loc[1, "site"] = "B"  # at another site the names do not meet
    assert len(scans.validate_scan_sheet(df, base_dir=tmp)) == 3


def test_a_directory_or_fifo_is_named_as_what_it_is(sheet):
    import os

    tmp, df = sheet
    (tmp / "folder.nii.gz").mkdir()
    os.mkfifo(tmp / "pipe.nii.gz")
    for name, what in (("folder.nii.gz", "a directory"), ("pipe.nii.gz", "a FIFO")):
        df.loc[1, "path"] = name
        with pytest.raises(InputError, match=rf"row 3 \(scan_id 's2'\): not a regular file \({what}"):
            scans.validate_scan_sheet(df, base_dir=tmp)


def _bids_study(root, sites=("A", "B"), subjects=("sub-01", "sub-02")):
    """A tiny BIDS tree: each subject scanned once at each site (ses-<site>), the site in sessions.tsv."""
    rng = np.random.default_rng(len(str(root)))
    for sub in subjects:
        for site in sites:
            path = root / sub / f"ses-{site}" / "anat" / f"{sub}_ses-{site}_T1w.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(rng.normal(100, 10, (4, 4, 4)).astype(np.float32), np.eye(4)), str(path))
        pd.DataFrame({"session_id": [f"ses-{s}" for s in sites], "site": list(sites)}).to_csv(
            root / sub / f"{sub}_sessions.tsv", sep="\t", index=False)
    return root


def test_bids_cohort_per_subject_or_per_session_from_a_column(tmp_path):
    root = _bids_study(tmp_path / "my study")
    pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "role": ["train", "test"]}).to_csv(
        root / "participants.tsv", sep="\t", index=False)
    df = scans.from_bids(root, cohort_column="role")
    assert dict(zip(df["scan_id"], df["cohort"])) == {"sub-01_ses-A": "train", "sub-01_ses-B": "train",
                                                      "sub-02_ses-A": "test", "sub-02_ses-B": "test"}
    sessions = root / "sub-01" / "sub-01_sessions.tsv"  # a session's value wins over its subject's
    pd.DataFrame({"session_id": ["ses-A", "ses-B"], "site": ["A", "B"], "role": ["test", "n/a"]}).to_csv(
        sessions, sep="\t", index=False)
    df = scans.from_bids(root, cohort_column="role")
    assert dict(zip(df["scan_id"], df["cohort"]))["sub-01_ses-A"] == "test"
    assert dict(zip(df["scan_id"], df["cohort"]))["sub-01_ses-B"] == "train"
    pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "role": ["train", "validation"]}).to_csv(
        root / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"sub-02_ses-A_T1w.nii.gz: column 'role' .* must say train, test or target for "
                                         r"sub-02 ses-A, got 'validation'"):
        scans.from_bids(root, cohort_column="role")


def test_a_bids_study_runs_as_the_test_cohort_with_a_training_sheet_or_a_pretrained_model(tmp_path):
    """The study's scans are the test cohort (cohort.bids.cohort: test); training scans come from a
    sheet, or none are needed with train.pretrained, whose model.json names the sites it knows."""
    import json

    from harmodiff.workflow_support import scan_table

    root = _bids_study(tmp_path / "study")
    train_root = _bids_study(tmp_path / "train", sites=("TRA",), subjects=("sub-91",))
    sheet = tmp_path / "train.tsv"
    pd.DataFrame({"scan_id": ["t1"], "subject": ["sub-91"], "site": ["TRA"], "cohort": ["train"],
                  "path": [str(train_root / "sub-91/ses-TRA/anat/sub-91_ses-TRA_T1w.nii.gz")]}).to_csv(
        sheet, sep="\t", index=False)
    config = {"cohort": {"source": "bids", "bids": {"root": str(root), "training_sheet": str(sheet)}},
              "target_sites": ["TRA"]}
    table = scan_table(config)
    assert sorted(table.query("cohort == 'test'").index) == ["sub-01_ses-A", "sub-01_ses-B", "sub-02_ses-A",
                                                             "sub-02_ses-B"]
    assert list(table.query("cohort == 'train'").index) == ["t1"]
    config["cohort"]["bids"].pop("training_sheet")
    with pytest.raises(InputError, match=r"no 'train' rows, so nothing to train the model on .*train.pretrained"):
        scan_table(config)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"site_labels": {"sites": ["TRA", "TRB"]}}))
    config["train"] = {"pretrained": str(model / "checkpoint.pt")}
    assert len(scan_table(config)) == 4
    config["target_sites"] = ["TRC"]
    with pytest.raises(InputError, match=r"target_sites .*: target site 'TRC' has no training scans and no "
                                         r"target-only scans .*\(the pretrained model's sites: \['TRA', 'TRB'\]\)"):
        scan_table(config)


def test_histmatch_without_training_scans_at_the_target_is_one_line():
    from harmodiff.plan import RunPlan

    table = pd.DataFrame({"scan_id": ["a", "b"], "subject": ["s1", "s1"], "site": ["A", "B"],
                          "cohort": ["test", "test"], "path": ["a", "b"]}).set_index("scan_id", drop=False)
    config = {"cohort": {"source": "bids"}, "target_sites": ["TRA"], "harmonize": {"guidance": "cfgpp", "scale": 0.6},
              "evaluation": {"methods": ["preprocessed", "diffusion", "histmatch"]}}
    with pytest.raises(InputError, match=r"evaluation.methods: histmatch .* target site TRA has none here"):
        RunPlan(config, table)
    config["evaluation"]["methods"] = ["preprocessed", "diffusion", "combat"]
    assert RunPlan(config, table).methods == ["preprocessed", "diffusion", "combat"]
