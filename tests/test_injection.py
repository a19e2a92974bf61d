"""Values from data (scan-sheet paths, subjects, sites, BIDS folder names) never run as shell code:
every value the rules splice into a command is quoted, and the id columns hold file-name
characters only (tests/test_scans.py checks those at validation)."""

import re

import pandas as pd
import pytest
import yaml

from conftest import ROOT, snakemake

# a placeholder the shell commands fill in from a job: input, output, log, params or wildcards
PLACEHOLDER = re.compile(r"(?<!\{)\{((?:input|output|log|params|wildcards)(?:\.\w+)?)(:\w+)?\}(?!\})")
# a folder name with the shell's ways in: the BIDS end-to-end run keeps its study there
# (tests/test_workflow.py::test_e2e_a_bids_study_harmonized_with_a_pretrained_model)
HOSTILE_FOLDER = "bids study $(touch PWNED1) `touch PWNED2`; touch PWNED3 & x"


def test_every_value_a_rule_splices_into_its_command_is_quoted():
    """Snakemake's `:q` quotes a value (each item of a list) for the shell; a value left bare is a
    way in for a path such as `raw/$(touch PWNED).nii.gz`."""
    bare, quoted = [], 0
    for smk in sorted((ROOT / "workflow/rules").glob("*.smk")):
        for line in smk.read_text().splitlines():
            if 'f"' in line:  # a Python f-string (an input function's name), not a shell command
                continue
            for m in PLACEHOLDER.finditer(line):
                if m.group(2) != ":q":
                    bare.append(f"{smk.name}: {m.group(0)}")
                quoted += 1
    assert not bare, bare
    assert quoted > 60  # every rule's command was read


def test_a_subject_named_like_shell_code_stops_the_run_at_validation_naming_the_row(tmp_path):
    """Before: figure2's `--subject {params.subject}` ran it. Now the sheet is refused before any job."""
    import nibabel as nib
    import numpy as np

    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(100, 10, (8, 8, 8)).astype(np.float32), np.eye(4)),
                 str(tmp_path / f"{name}.nii.gz"))
    pd.DataFrame({"scan_id": ["a", "b"], "subject": ["s1", "$(touch PWNED)"], "site": ["X", "Y"],
                  "cohort": ["train", "test"], "path": ["a.nii.gz", "b.nii.gz"]}).to_csv(
        tmp_path / "scans.tsv", sep="\t", index=False)
    cfg = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    cfg["cohort"] = {"source": "sheet", "sheet": str(tmp_path / "scans.tsv")}
    cfg["target_sites"] = ["X"]
    cfg["evaluation"].update(reference_site="Y", external={})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "--cores", "1", "--configfile", str(tmp_path / "c.yaml"), check=False)
    assert proc.returncode != 0
    assert "row 3 (scan_id 'b'): subject: '$(touch PWNED)' may hold only letters" in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("PWNED")) and not (tmp_path / "results").exists()


def test_a_bids_folder_named_like_shell_code_is_refused_naming_it(tmp_path):
    """BIDS labels become scan_ids and subjects: a `sub-$(...)` folder stops at validation."""
    import nibabel as nib
    import numpy as np

    from harmodiff import scans
    from harmodiff.io import InputError

    path = tmp_path / "sub-$(touch PWNED)" / "anat" / "sub-$(touch PWNED)_T1w.nii.gz"
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(path))
    (tmp_path / "participants.tsv").write_text("participant_id\tsite\nsub-$(touch PWNED)\tA\n")
    with pytest.raises(InputError, match=r"scan_id 'sub-\$\(touch PWNED\)'.* may hold only letters"):
        scans.from_bids(tmp_path)
    assert not list(tmp_path.rglob("PWNED"))
