"""The one owner of result paths and names: each per-scan result's path pattern, written once
(`PATTERNS`), and the `Paths` of one run's results. What runs is `harmodiff.plan`; the lists of
scans jobs read are `harmodiff.manifests`.
"""

from __future__ import annotations

import re

import pandas as pd

from harmodiff.io import InputError

DERIVATIVES = "derivatives/harmodiff"  # the BIDS-Derivatives dataset, under results/
SPACE = "MNI152NLin2009aSym"  # nilearn's MNI152 2009a template: the working grid's space


class _Wildcards(dict):
    def __missing__(self, key):
        return "{" + key + "}"


# every per-scan (or per-subject) result's path, written once: a stem pattern, the files being stem +
# suffix. The rules' output: and input: and `Paths` all format these (`result_path`).
PATTERNS = {
    "stage": "{results}/{stage}/{cohort}/{site}/{scan}",           # preprocessed, anatomy, qc
    "harmonized": "{results}/harmonized/{method}/{target}/{site}/{scan}",
    "sweep": "{results}/sweep/{method}/{target}/{site}/{scan}",    # the guidance sweep's other settings
    "seed": "{results}/seeds/{seed}/{target}/{site}/{scan}",       # the main setting under another run seed
    "segmentation": "{results}/segmentation/{method}/{target}/{site}/{scan}",
    "truth_at_site": "{results}/synthetic/truth/at_site/{target}/{subject}",
    "truth_subject": "{results}/synthetic/truth/subjects/{subject}",
    "truth_target": "{results}/segmentation/truth/{target}/{subject}",
    "derivative": "{results}/" + DERIVATIVES + "/sub-{sub}/ses-site{ses}/anat/sub-{sub}_ses-site{ses}",
    "manifest": "{results}/manifests/{name}",
    "learned_site": "{results}/model/{run}/sites/{target}",        # a target site's token (harmodiff.sites)
}


def result_path(pattern: str, suffix: str = "", results: str = "results", **fields) -> str:
    """PATTERNS[pattern] + suffix with `fields` filled in; a field not given stays a Snakemake wildcard
    (`result_path("stage", ".nii.gz", stage="preprocessed", cohort="test")` is
    `results/preprocessed/test/{site}/{scan}.nii.gz`)."""
    return PATTERNS[pattern].format_map(_Wildcards(results=results, **fields)) + suffix


def derivative_suffixes(target_label: str = "{tgt}") -> tuple[str, str]:
    """(MNI-space, native-space) suffixes of a derivative image harmonized to a target."""
    desc = f"desc-harmonizedTO{target_label}_T1w.nii.gz"
    return f"_space-{SPACE}_{desc}", f"_{desc}"


def bids_label(name: str, prefix: str = "") -> str:
    """A BIDS label from a subject, session or site name: the prefix (sub-, ses-) dropped and only
    letters and digits kept (BIDS labels are alphanumeric)."""
    label = re.sub(r"[^A-Za-z0-9]", "", str(name).removeprefix(prefix))
    if not label:
        raise InputError(f"{name!r}: has no letters or digits to make a BIDS label from")
    return label


def sweep_method(guidance: str, scale: float) -> str:
    """Name of one guidance setting of the Table 1 sweep, e.g. cfgpp_0.6."""
    return f"{guidance}_{float(scale):g}"


def parse_sweep_method(name: str) -> tuple[str, float]:
    guidance, _, scale = name.rpartition("_")
    return guidance, float(scale)


# --- result paths -----------------------------------------------------------------------------

class Paths:
    """Every result path of one run (under `results`)."""

    def __init__(self, results: str = "results"):
        self.results = results

    def stage_file(self, stage: str, cohort: str, site: str, scan: str, suffix: str) -> str:
        return result_path("stage", suffix, self.results, stage=stage, cohort=cohort, site=site, scan=scan)

    def stage_files(self, stage: str, suffix: str, scans: pd.DataFrame) -> list[str]:
        """The stage's file of every scan (a scan table indexed by scan id, with cohort and site)."""
        return [self.stage_file(stage, r.cohort, r.site, r.Index, suffix) for r in scans.itertuples()]

    def method_image(self, method: str, target: str, site: str, scan: str) -> str:
        if method == "preprocessed":
            return self.stage_file("preprocessed", "test", site, scan, ".nii.gz")
        return result_path("harmonized", ".nii.gz", self.results, method=method, target=target, site=site, scan=scan)

    def test_mask(self, site: str, scan: str) -> str:
        return self.stage_file("preprocessed", "test", site, scan, "_mask.nii.gz")

    def seed_image(self, seed, target: str, site: str, scan: str) -> str:
        return result_path("seed", ".nii.gz", self.results, seed=seed, target=target, site=site, scan=scan)

    def sweep_image(self, method: str, target: str, site: str, scan: str) -> str:
        """A guidance sweep setting's image (`method`: `sweep_method(guidance, scale)`)."""
        return result_path("sweep", ".nii.gz", self.results, method=method, target=target, site=site, scan=scan)

    def segmentation_volumes(self, method: str, target: str, site: str, scan: str) -> str:
        return result_path("segmentation", "_volumes.json", self.results, method=method, target=target, site=site,
                           scan=scan)

    def truth_at_site(self, target: str, subject: str) -> str:
        return result_path("truth_at_site", ".nii.gz", self.results, target=target, subject=subject)

    def truth_subject_mask(self, subject: str) -> str:
        return result_path("truth_subject", "_mask.nii.gz", self.results, subject=subject)

    def truth_rendered(self, scan: str) -> str:
        """A scan's subject rendered noise-free at the scan's site, on the render grid."""
        return f"{self.results}/synthetic/truth/rendered/{scan}.nii.gz"

    def target_truth_volumes(self, target: str, subject: str) -> str:
        return result_path("truth_target", "_volumes.json", self.results, target=target, subject=subject)

    def manifest(self, name: str) -> str:
        return result_path("manifest", ".tsv", self.results, name=name)

    def learned_site(self, run: str, target: str, suffix: str = ".site.pt") -> str:
        """A target site's token learned for the model of training run `run` (suffix .site_loss.png: its loss
        curve, which `harmodiff.sites learn` writes beside it)."""
        return result_path("learned_site", suffix, self.results, run=run, target=target)

    # the BIDS-Derivatives dataset of the harmonized scans (harmodiff.derivatives)
    def derivatives_root(self) -> str:
        return f"{self.results}/{DERIVATIVES}"

    def derivative_images(self, subject: str, site: str, target: str) -> tuple[str, str]:
        """(MNI-space, native-space) paths of a subject's scan at a site harmonized to target."""
        stem = result_path("derivative", "", self.results, sub=bids_label(subject, "sub-"), ses=bids_label(site, "ses-"))
        mni, native = derivative_suffixes(bids_label(target))
        return stem + mni, stem + native
