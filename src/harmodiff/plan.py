"""What one run does: which methods harmonize to which targets, the guidance sweep and its extra
runs, Figure 2's subject and sites, the BIDS names of the harmonized scans. Built once by the
workflow (`workflow/rules/common.smk`) from the config and the scan table; the paths are
`harmodiff.layout`'s, the manifests `harmodiff.manifests`'.
"""

from __future__ import annotations

import functools

import pandas as pd

from harmodiff.config import EvaluationConfig, TrainConfig
from harmodiff.io import InputError
from harmodiff.layout import Paths, bids_label, sweep_method
from harmodiff.scans import REFERENCE_COHORTS


class RunPlan:
    """config is the workflow config (a dict), scans the scan table (`workflow_support.scan_table`)."""

    def __init__(self, config: dict, scans: pd.DataFrame, results: str = "results"):
        self.scans, self.paths = scans, Paths(results)
        # the typed section: its defaults are harmodiff.config's, not restated here
        self.evaluation = evaluation = EvaluationConfig.of(config.get("evaluation"))
        self.methods = list(evaluation.methods)
        self.external = {name: m.to_dict() for name, m in evaluation.external.items()}
        self.sweep = evaluation.guidance_sweep
        self.synthetic = config["cohort"]["source"] == "synthetic"
        self.target_sites = list(config["target_sites"])
        self.test = scans[scans["cohort"] == "test"]
        self.train = scans[scans["cohort"] == "train"]
        self.run = TrainConfig.of(config.get("train")).run
        # target sites the model was not trained on: their tokens are learned from their target-only scans
        target_only = scans[scans["cohort"] == "target"]
        self.learned_sites = [t for t in self.target_sites if (target_only["site"] == t).any()]
        unmatched = [t for t in self.target_sites if not len(self.reference_scans(t))]
        if "histmatch" in self.methods and unmatched:  # a pretrained model without training scans
            raise InputError(f"config evaluation.methods: histmatch matches to the target site's training or "
                             f"target-only scans, and target site {unmatched[0]} has none here (remove histmatch, "
                             "or add its scans)")
        self.test_subjects = list(dict.fromkeys(self.test["subject"]))
        # paired t-tests against this site (evaluation.reference_site; else the first test site)
        self.reference_site = evaluation.reference_site or sorted(set(self.test["site"]))[0]
        self.sweep_subjects = self.test_subjects[: self.sweep.subjects or len(self.test_subjects)]
        self.main_setting = (config["harmonize"]["guidance"], float(config["harmonize"]["scale"]))
        # one scan per subject: the grid its truth is resampled onto (a dict: O(1) per job at 10,000 scans)
        self.subject_reference = {}
        for r in self.test.itertuples():
            self.subject_reference.setdefault(r.subject, r)

    # targets
    def reference_scans(self, target: str) -> pd.DataFrame:
        """The scans of a target site the run has: its training scans, or its target-only scans."""
        scans = self.scans[self.scans["site"] == target]
        return scans[scans["cohort"].isin(REFERENCE_COHORTS)]

    def learned_site_file(self, target: str) -> str | None:
        """The learned token of a target site the model was not trained on (None for a training site)."""
        return self.paths.learned_site(self.run, target) if target in self.learned_sites else None

    # methods and targets
    def method_targets(self, method: str) -> list[str]:
        """The target sites a method harmonizes to ('none' for the unharmonized scans)."""
        if method == "preprocessed":
            return ["none"]
        if method in self.external:
            return [self.external[method]["target"]]
        return list(self.target_sites)

    def image_methods(self) -> list[str]:
        """Methods that produce images (ComBat adjusts tissue ratios only); diffusion always runs."""
        builtin = [m for m in ("preprocessed", "diffusion", "histmatch") if m in self.methods or m == "diffusion"]
        return builtin + list(self.external)

    def harmonized_files(self, method: str = "diffusion") -> list[str]:
        return [self.paths.method_image(method, t, r.site, r.Index)
                for t in self.method_targets(method) for r in self.test.itertuples()]

    def image_rows(self):
        """(method, target, scan row, image) of every image method's output on every test scan."""
        for method in self.image_methods():
            for target in self.method_targets(method):
                for r in self.test.itertuples():
                    yield method, target, r, self.paths.method_image(method, target, r.site, r.Index)

    # the guidance sweep (Table 1) and the main setting's seed replicates
    def sweep_settings(self) -> list[tuple[str, float, str]]:
        """(guidance, scale, method name) of the Table 1 guidance sweep."""
        return [(g, s, sweep_method(g, s)) for g in ("cfg", "cfgpp") for s in getattr(self.sweep, g)]

    def seed_replicates(self) -> list[tuple[int, str]]:
        """(run seed, method name) of the main setting's extra seeds on the sweep subjects."""
        return [(seed, f"diffusion_seed{seed}") for seed in self.sweep.seeds]

    def sweep_scans(self) -> pd.DataFrame:
        """The sweep subjects' test scans."""
        return self.test[self.test["subject"].isin(self.sweep_subjects)]

    def sweep_image(self, guidance: str, scale, target: str, site: str, scan: str) -> str:
        """The main harmonization's file when the setting is the main one (nothing is run twice)."""
        if (guidance, float(scale)) == self.main_setting:
            return self.paths.method_image("diffusion", target, site, scan)
        return self.paths.sweep_image(sweep_method(guidance, scale), target, site, scan)

    def extra_runs(self, target: str = "{target}", site: str = "{site}", scan: str = "{scan}") -> list[dict]:
        """What a sweep subject's scan is harmonized with beyond the main setting, in the job that runs the
        main one (one model load): the sweep's other settings, then the main setting under each run seed.
        Each an output (a pattern when target, site and scan are left as wildcards) and the guidance, scale
        and seed that differ from the main setting's ('' where the main setting's holds)."""
        runs = [{"output": self.sweep_image(g, s, target, site, scan), "guidance": g, "scale": f"{float(s):g}",
                 "seed": ""} for g, s, _ in self.sweep_settings() if (g, float(s)) != self.main_setting]
        return runs + [{"output": self.paths.seed_image(seed, target, site, scan), "guidance": "", "scale": "",
                        "seed": str(seed)} for seed, _ in self.seed_replicates()]

    def sweep_rows(self):
        """(method name, target, scan row, image) of the guidance sweep and the seed replicates."""
        for target in self.target_sites:
            for r in self.sweep_scans().itertuples():
                for guidance, scale, name in self.sweep_settings():
                    yield name, target, r, self.sweep_image(guidance, scale, target, r.site, r.Index)
                for seed, name in self.seed_replicates():
                    yield name, target, r, self.paths.seed_image(seed, target, r.site, r.Index)

    # the BIDS-Derivatives dataset
    def derivative_images(self, target: str, site: str, scan: str) -> tuple[str, str]:
        """(MNI-space, native-space) paths of a scan harmonized to target."""
        return self.paths.derivative_images(self.scans.loc[scan, "subject"], site, target)

    @functools.cached_property
    def bids_index(self) -> dict[tuple[str, str, str], tuple[str, str, str]]:
        """(subject, session, target) labels -> (target, site, scan) of every derivative image;
        two scans that would get one name are an error naming both."""
        index: dict = {}
        for target in self.target_sites:
            for r in self.test.itertuples():
                key = (bids_label(r.subject, "sub-"), bids_label(r.site, "ses-"), bids_label(target))
                if key in index:
                    raise InputError(f"scans {index[key][2]} and {r.Index} would share one BIDS name "
                                     f"(sub-{key[0]}, ses-site{key[1]}, target {key[2]}): rename a subject or site")
                index[key] = (target, r.site, r.Index)
        return index

    def derivative_files(self) -> list[str]:
        files = [f"{self.paths.derivatives_root()}/dataset_description.json"]
        for target, site, scan in self.bids_index.values():
            files += self.derivative_images(target, site, scan)
        return files

    # Figure 2
    def figure_subject(self) -> str:
        subject = self.evaluation.figure_subject or self.test_subjects[0]
        if subject not in self.test_subjects:
            raise InputError(f"config evaluation.figure_subject: {subject!r} is not a test subject "
                             f"({', '.join(self.test_subjects)})")
        return subject

    def figure_sites(self) -> list[str]:
        """Figure 2's columns: evaluation.figure_sites, or every site the subject was scanned at."""
        subject = self.figure_subject()
        scanned = sorted(self.test.loc[self.test["subject"] == subject, "site"])
        chosen = self.evaluation.figure_sites or scanned
        unknown = [s for s in chosen if s not in scanned]
        if unknown:
            raise InputError(f"config evaluation.figure_sites: {subject} has no test scan at "
                             f"{', '.join(unknown)} (scanned at: {', '.join(scanned)})")
        return list(chosen)
