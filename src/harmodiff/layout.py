"""The one owner of result paths and names, and of the manifests that carry lists of scans.

Every per-scan list a job reads (training scans, images to compare, volumes to tabulate) travels
as a manifest: a TSV with one row per entry and named columns, written by the workflow's
`manifest` rule from `Layout.manifest_table`. No job's command line grows with the number of
scans (Linux refuses a single argument over 128 KiB; SRPBS's similarity job alone had 215 KB),
and no module zips parallel lists back together by position.
"""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

import pandas as pd

from harmodiff.config import EvaluationConfig
from harmodiff.io import InputError, write_text

DERIVATIVES = "derivatives/harmodiff"  # the BIDS-Derivatives dataset, under results/
SPACE = "MNI152NLin2009aSym"  # nilearn's MNI152 2009a template: the working grid's space


class _Wildcards(dict):
    def __missing__(self, key):
        return "{" + key + "}"


# every per-scan (or per-subject) result's path, written once: a stem pattern, the files being stem +
# suffix. The rules' output: and input: and the Layout's paths all format these (`result_path`).
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


# --- manifests ------------------------------------------------------------------------------

def manifest_text(table: pd.DataFrame) -> str:
    return table.to_csv(sep="\t", index=False, lineterminator="\n")


def write_manifest(table: pd.DataFrame, path) -> None:
    write_text(manifest_text(table), path)


def read_manifest(path, columns) -> pd.DataFrame:
    """A manifest's rows, every value a string; names the file and the problem when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable TSV manifest ({str(exc).splitlines()[0]})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{path}: manifest lacks the column(s) {', '.join(missing)} "
                         f"(has: {', '.join(table.columns) or 'none'})")
    if table.empty:
        raise InputError(f"{path}: manifest has no rows")
    empty = [c for c in columns if (table[c] == "").any()]
    if empty:
        row = int((table[empty[0]] == "").to_numpy().argmax()) + 2
        raise InputError(f"{path}: line {row}: empty {empty[0]!r}")
    return table


# the list option of each manifest column
LIST_OPTIONS = {"image": "images", "mask": "masks", "anatomy": "anatomy", "site": "sites", "method": "methods",
                "target": "targets", "subject": "subjects", "scan_id": "scan-ids", "truth": "truths",
                "truth_mask": "truth-masks", "volumes": "volumes"}


def add_list_options(parser: argparse.ArgumentParser, columns, *, manifest: str = "--manifest",
                     required: bool = True, options: dict[str, str] | None = None) -> None:
    """`manifest` FILE (a TSV with these columns), or one list option per column (`--images a b`).

    A column's option is LIST_OPTIONS[column] unless `options` names another."""
    columns = {c: (options or {}).get(c, LIST_OPTIONS.get(c, c)) for c in columns}
    dest = manifest.lstrip("-").replace("-", "_")
    parser.add_argument(manifest, dest=dest,
                        help=f"TSV with the columns {', '.join(columns)}, one row per entry (instead of the lists)")
    for option in columns.values():
        parser.add_argument(f"--{option}", nargs="+")
    groups = parser.get_default("_list_groups") or []
    parser.set_defaults(_list_groups=[*groups, (manifest, dest, columns, required)])


def resolve_lists(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the list options from their manifest; the lists given either way must pair up."""
    for manifest, dest, columns, required in getattr(args, "_list_groups", None) or []:
        attrs = {column: option.replace("-", "_") for column, option in columns.items()}
        given = [f"--{columns[c]}" for c, attr in attrs.items() if getattr(args, attr) is not None]
        path = getattr(args, dest)
        if path:
            if given:
                parser.error(f"give {manifest} or {', '.join(given)}, not both")
            try:
                table = read_manifest(path, list(columns))
            except InputError as exc:
                parser.error(str(exc))
            for column, attr in attrs.items():
                setattr(args, attr, list(table[column]))
            continue
        if not given and not required:
            for attr in attrs.values():
                setattr(args, attr, [])
            continue
        missing = [f"--{columns[c]}" for c, attr in attrs.items() if getattr(args, attr) is None]
        if missing:
            parser.error(f"give {manifest} FILE or all of {', '.join('--' + o for o in columns.values())} "
                         f"({', '.join(missing)} missing)")
        lengths = {f"--{columns[c]}": len(getattr(args, attr)) for c, attr in attrs.items()}
        if len(set(lengths.values())) > 1:
            parser.error("the lists need the same number of entries: "
                         + ", ".join(f"{k} {v}" for k, v in lengths.items()))
    return args


# --- result paths -----------------------------------------------------------------------------

class Layout:
    """Paths of every result of one run, and the tables of entries its evaluation reads.

    config is the workflow config (a dict), scans the scan table (`workflow_support.scan_table`)."""

    def __init__(self, config: dict, scans: pd.DataFrame, results: str = "results"):
        self.scans, self.results = scans, results
        # the typed section: its defaults are harmodiff.config's, not restated here
        self.evaluation = evaluation = EvaluationConfig.of(config.get("evaluation"))
        self.methods = list(evaluation.methods)
        self.external = {name: m.to_dict() for name, m in evaluation.external.items()}
        self.sweep = evaluation.guidance_sweep
        self.synthetic = config["cohort"]["source"] == "synthetic"
        self.target_sites = list(config["target_sites"])
        self.test = scans[scans["cohort"] == "test"]
        self.train = scans[scans["cohort"] == "train"]
        untrained = [t for t in self.target_sites if not (self.train["site"] == t).any()]
        if "histmatch" in self.methods and untrained:  # a pretrained model without training scans
            raise InputError(f"config evaluation.methods: histmatch matches to the target site's training scans, "
                             f"and target site {untrained[0]} has none here (remove histmatch, or add its "
                             "training scans)")
        self.test_subjects = list(dict.fromkeys(self.test["subject"]))
        # paired t-tests against this site (evaluation.reference_site; else the first test site)
        self.reference_site = evaluation.reference_site or sorted(set(self.test["site"]))[0]
        self.sweep_subjects = self.test_subjects[: self.sweep.subjects or len(self.test_subjects)]
        self.main_setting = (config["harmonize"]["guidance"], float(config["harmonize"]["scale"]))
        # one scan per subject: the grid its truth is resampled onto (a dict: O(1) per job at 10,000 scans)
        self.subject_reference = {}
        for r in self.test.itertuples():
            self.subject_reference.setdefault(r.subject, r)

    # paths
    def stage_file(self, stage: str, cohort: str, site: str, scan: str, suffix: str) -> str:
        return result_path("stage", suffix, self.results, stage=stage, cohort=cohort, site=site, scan=scan)

    def stage_files(self, stage: str, suffix: str, scans: pd.DataFrame | None = None) -> list[str]:
        scans = self.scans if scans is None else scans
        return [self.stage_file(stage, r.cohort, r.site, r.Index, suffix) for r in scans.itertuples()]

    def method_image(self, method: str, target: str, site: str, scan: str) -> str:
        if method == "preprocessed":
            return self.stage_file("preprocessed", "test", site, scan, ".nii.gz")
        return result_path("harmonized", ".nii.gz", self.results, method=method, target=target, site=site, scan=scan)

    def test_mask(self, site: str, scan: str) -> str:
        return self.stage_file("preprocessed", "test", site, scan, "_mask.nii.gz")

    def seed_image(self, seed, target: str, site: str, scan: str) -> str:
        return result_path("seed", ".nii.gz", self.results, seed=seed, target=target, site=site, scan=scan)

    def sweep_image(self, guidance: str, scale, target: str, site: str, scan: str) -> str:
        """The main harmonization's file when the setting is the main one (nothing is run twice)."""
        if (guidance, float(scale)) == self.main_setting:
            return self.method_image("diffusion", target, site, scan)
        return result_path("sweep", ".nii.gz", self.results, method=sweep_method(guidance, scale), target=target,
                           site=site, scan=scan)

    def truth_at_site(self, target: str, subject: str) -> str:
        return result_path("truth_at_site", ".nii.gz", self.results, target=target, subject=subject)

    def truth_subject_mask(self, subject: str) -> str:
        return result_path("truth_subject", "_mask.nii.gz", self.results, subject=subject)

    def target_truth_volumes(self, target: str, subject: str) -> str:
        return result_path("truth_target", "_volumes.json", self.results, target=target, subject=subject)

    def manifest(self, name: str) -> str:
        return result_path("manifest", ".tsv", self.results, name=name)

    # the BIDS-Derivatives dataset of the harmonized scans (harmodiff.derivatives)
    def derivatives_root(self) -> str:
        return f"{self.results}/{DERIVATIVES}"

    def derivative_images(self, target: str, site: str, scan: str) -> tuple[str, str]:
        """(MNI-space, native-space) paths of a scan harmonized to target."""
        r = self.scans.loc[scan]
        stem = result_path("derivative", "", self.results, sub=bids_label(r.subject, "sub-"),
                           ses=bids_label(site, "ses-"))
        mni, native = derivative_suffixes(bids_label(target))
        return stem + mni, stem + native

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
        files = [f"{self.derivatives_root()}/dataset_description.json"]
        for target, site, scan in self.bids_index.values():
            files += self.derivative_images(target, site, scan)
        return files

    # what runs
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

    def sweep_settings(self) -> list[tuple[str, float, str]]:
        """(guidance, scale, method name) of the Table 1 guidance sweep."""
        return [(g, s, sweep_method(g, s)) for g in ("cfg", "cfgpp") for s in getattr(self.sweep, g)]

    def seed_replicates(self) -> list[tuple[int, str]]:
        """(run seed, method name) of the main setting's extra seeds on the sweep subjects."""
        return [(seed, f"diffusion_seed{seed}") for seed in self.sweep.seeds]

    def sweep_scans(self) -> list[str]:
        """Ids of the sweep subjects' test scans."""
        return list(self.test.index[self.test["subject"].isin(self.sweep_subjects)])

    def extra_runs(self) -> list[tuple[str, str, str, str]]:
        """What a sweep subject's scan is harmonized with beyond the main setting, in the job that
        runs the main one (one model load): the sweep's other settings, then the main setting
        under each run seed. (output pattern with {target}, {site}, {scan}; guidance; scale;
        seed), '-' where the main setting's value holds."""
        w = ("{target}", "{site}", "{scan}")
        runs = [(self.sweep_image(g, s, *w), g, f"{float(s):g}", "-")
                for g, s, _ in self.sweep_settings() if (g, float(s)) != self.main_setting]
        return runs + [(self.seed_image(seed, *w), "-", "-", str(seed)) for seed, _ in self.seed_replicates()]

    def harmonized_files(self, method: str = "diffusion") -> list[str]:
        return [self.method_image(method, t, r.site, r.Index)
                for t in self.method_targets(method) for r in self.test.itertuples()]

    def _image_rows(self):
        """(method, target, scan row, image) of every image method's output on every test scan."""
        for method in self.image_methods():
            for target in self.method_targets(method):
                for r in self.test.itertuples():
                    yield method, target, r, self.method_image(method, target, r.site, r.Index)

    def _sweep_rows(self):
        """(method name, target, scan row, image) of the guidance sweep and the seed replicates."""
        sweep_scans = self.test[self.test["subject"].isin(self.sweep_subjects)]
        for target in self.target_sites:
            for r in sweep_scans.itertuples():
                for guidance, scale, name in self.sweep_settings():
                    yield name, target, r, self.sweep_image(guidance, scale, target, r.site, r.Index)
                for seed, name in self.seed_replicates():
                    yield name, target, r, self.seed_image(seed, target, r.site, r.Index)

    # the tables the evaluation reads (each becomes results/manifests/<name>.tsv)
    def manifest_names(self) -> list[str]:
        names = ["raw_scans", "train", "leakage", "segmentations", "similarity", "figure2", "sweep_subjects"]
        names += [f"histmatch-{t}" for t in self.target_sites]
        if self.synthetic:
            names += ["truth_similarity", "truth_targets", "truth_preprocessing"]
        return names

    FILE_COLUMNS = ("image", "mask", "anatomy", "volumes", "truth", "truth_mask")

    def manifest_files(self, name: str) -> list[str]:
        """Every file manifest `name` lists (what a job reading it depends on)."""
        table = self.manifest_table(name)
        return [f for c in self.FILE_COLUMNS if c in table for f in table[c]]

    @functools.cache  # noqa: B019 (one Layout per workflow run: the cache lives as long as the run)
    def manifest_table(self, name: str) -> pd.DataFrame:
        if name.startswith("histmatch-"):
            return self._scan_table(self.train[self.train["site"] == name.removeprefix("histmatch-")], "image", "mask")
        builders = {"raw_scans": lambda: pd.DataFrame({"scan_id": list(self.scans.index),
                                                       "image": list(self.scans["path"])}),
                    "train": lambda: self._scan_table(self.train, "image", "mask", "site"),
                    "leakage": lambda: self._scan_table(self.scans, "image", "mask", "anatomy", "site"),
                    "segmentations": self._segmentations, "similarity": self._similarity,
                    "figure2": self._figure2, "truth_similarity": self._truth_similarity,
                    "sweep_subjects": lambda: pd.DataFrame({"subject": self.sweep_subjects}),
                    "truth_targets": self._truth_targets, "truth_preprocessing": self._truth_preprocessing}
        if name not in builders or name not in self.manifest_names():
            raise KeyError(f"no manifest {name!r} in this run (known: {', '.join(self.manifest_names())})")
        return builders[name]()

    def _scan_table(self, scans: pd.DataFrame, *columns: str) -> pd.DataFrame:
        files = {"image": ("preprocessed", ".nii.gz"), "mask": ("preprocessed", "_mask.nii.gz"),
                 "anatomy": ("anatomy", "_A.nii.gz")}
        table = {c: self.stage_files(*files[c], scans) for c in columns if c in files}
        if "site" in columns:
            table["site"] = list(scans["site"])
        return pd.DataFrame(table, columns=list(columns))

    def _segmentations(self) -> pd.DataFrame:
        rows = [{"volumes": result_path("segmentation", "_volumes.json", self.results, method=m, target=t, site=r.site,
                                        scan=r.Index), "method": m,
                 "target": t, "scan_id": r.Index, "subject": r.subject, "site": r.site}
                for m, t, r, _ in self._image_rows()]
        return pd.DataFrame(rows)

    def _similarity(self) -> pd.DataFrame:
        """Images compared across sites: every image method on all test subjects, and the guidance
        sweep and seed replicates on the sweep subjects (Table 1)."""
        rows = [{"image": image, "mask": self.test_mask(r.site, r.Index), "method": m, "target": t,
                 "subject": r.subject, "site": r.site}
                for m, t, r, image in [*self._image_rows(), *self._sweep_rows()]]
        return pd.DataFrame(rows)

    def _truth_similarity(self) -> pd.DataFrame:
        """Every image at a target site vs the subject rendered at that site; the unharmonized scans
        are scored against every target."""
        def row(method, target, r, image):
            return {"image": image, "mask": self.test_mask(r.site, r.Index), "method": method, "target": target,
                    "scan_id": r.Index, "truth": self.truth_at_site(target, r.subject),
                    "truth_mask": self.truth_subject_mask(r.subject)}

        rows = []
        for target in self.target_sites:
            for m, t, r, image in self._image_rows():
                if t == target or m == "preprocessed":
                    rows.append(row(m, target, r, image))
        rows += [row(*entry) for entry in self._sweep_rows()]
        return pd.DataFrame(rows)

    def _truth_targets(self) -> pd.DataFrame:
        """Each traveling subject rendered noise-free at each target, segmented like the harmonized scans."""
        rows = [{"volumes": self.target_truth_volumes(t, s), "target": t, "subject": s}
                for t in self.target_sites for s in self.test_subjects]
        return pd.DataFrame(rows)

    def _truth_preprocessing(self) -> pd.DataFrame:
        rows = [{"image": self.stage_file("preprocessed", r.cohort, r.site, r.Index, ".nii.gz"),
                 "mask": self.stage_file("preprocessed", r.cohort, r.site, r.Index, "_mask.nii.gz"),
                 "scan_id": r.Index, "truth": f"{self.results}/synthetic/truth/rendered/{r.Index}.nii.gz",
                 "truth_mask": self.truth_subject_mask(r.subject)} for r in self.scans.itertuples()]
        return pd.DataFrame(rows)

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

    def _figure2(self) -> pd.DataFrame:
        subject = self.figure_subject()
        rows = self.test[self.test["subject"] == subject].drop_duplicates("site").set_index("site")
        entries = []
        for method in self.image_methods():
            target = self.method_targets(method)[0]
            for site in self.figure_sites():
                label = method if target == "none" else f"{method}:{target}"  # drawn as an arrow
                entries.append({"image": self.method_image(method, target, site, rows.loc[site, "scan_id"]),
                                "method": label, "site": site})
        return pd.DataFrame(entries)
