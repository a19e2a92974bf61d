"""Manifests: the TSV files that carry every list of scans a job reads.

A manifest has one row per entry and named columns (image, mask, site, ...), so an entry's fields
stay together and no job's command line grows with the number of scans (Linux refuses a single
argument over 128 KiB; SRPBS's similarity job alone had 215 KB). The workflow writes them (its
`manifest` rule, from `harmodiff.plan.ManifestTables`); a CLI takes one with `--manifest FILE`
(`add_manifest_option`) and gets it back as a DataFrame.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import pandas as pd

from harmodiff.io import InputError, write_text

# the columns that name files (what a job reading the manifest depends on)
FILE_COLUMNS = ("image", "mask", "anatomy", "volumes", "truth", "truth_mask")


def manifest_text(table: pd.DataFrame) -> str:
    return table.to_csv(sep="\t", index=False, lineterminator="\n")


def write_manifest(table: pd.DataFrame, path) -> None:
    write_text(manifest_text(table), path)


def read_manifest(path, columns, *, may_be_empty=()) -> pd.DataFrame:
    """A manifest's rows, every value a string; names the file and the problem when it is unusable.
    Every column of `columns` must be there; only those of `may_be_empty` may hold empty values."""
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
    empty = [c for c in columns if c not in may_be_empty and (table[c] == "").any()]
    if empty:
        row = int((table[empty[0]] == "").to_numpy().argmax()) + 2
        raise InputError(f"{path}: line {row}: empty {empty[0]!r}")
    table.attrs["path"] = str(path)
    return table


def listed_files(table: pd.DataFrame) -> list[str]:
    """Every file a manifest lists."""
    return [f for c in FILE_COLUMNS if c in table for f in table[c] if f]


class _ManifestType:
    """argparse `type=`: the path read into a DataFrame, or a usage error naming the file."""

    def __init__(self, columns, may_be_empty):
        self.columns, self.may_be_empty = tuple(columns), tuple(may_be_empty)

    def __call__(self, path: str) -> pd.DataFrame:
        try:
            return read_manifest(path, self.columns, may_be_empty=self.may_be_empty)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None


def add_manifest_option(parser: argparse.ArgumentParser, columns, *, option: str = "--manifest",
                        required: bool = True, may_be_empty=(), help: str = "") -> None:
    """`option FILE`: a manifest with these columns, parsed into a DataFrame (a bad file is a usage
    error naming it, exit 2)."""
    text = f"TSV with the columns {', '.join(columns)}, one row per entry"
    parser.add_argument(option, required=required, type=_ManifestType(columns, may_be_empty),
                        metavar="FILE", help=f"{help} ({text})" if help else text)


class ManifestTables:
    """The manifests one run's jobs read (each becomes results/manifests/<name>.tsv), from its
    `harmodiff.plan.RunPlan`."""

    def __init__(self, plan):
        self.plan, self.paths = plan, plan.paths

    def names(self) -> list[str]:
        plan = self.plan
        names = ["raw_scans", "train", "leakage", "segmentations", "similarity", "figure2", "sweep_subjects"]
        names += [f"histmatch-{t}" for t in plan.target_sites]
        names += [f"learn_site-{t}" for t in plan.learned_sites]
        if plan.extra_runs() and len(plan.sweep_scans()):
            names.append("sweep_runs")
        if plan.synthetic:
            names += ["truth_similarity", "truth_targets", "truth_preprocessing"]
        return names

    def files(self, name: str) -> list[str]:
        """Every file manifest `name` lists as an input (what a job reading it depends on); the runs
        manifest lists the job's outputs."""
        return [] if name == "sweep_runs" else listed_files(self.table(name))

    @functools.cache  # noqa: B019 (one set of tables per workflow run: the cache lives as long as the run)
    def table(self, name: str) -> pd.DataFrame:
        plan = self.plan
        if name.startswith(("histmatch-", "learn_site-")) and name in self.names():
            return self._scan_table(plan.reference_scans(name.partition("-")[2]), "image", "mask")
        builders = {"raw_scans": lambda: pd.DataFrame({"scan_id": list(plan.scans.index),
                                                       "image": list(plan.scans["path"])}),
                    "train": lambda: self._scan_table(plan.train, "image", "mask", "site"),
                    "leakage": lambda: self._scan_table(plan.scans, "image", "mask", "anatomy", "site"),
                    "segmentations": self._segmentations, "similarity": self._similarity,
                    "figure2": self._figure2, "truth_similarity": self._truth_similarity,
                    "sweep_subjects": lambda: pd.DataFrame({"subject": plan.sweep_subjects}),
                    "sweep_runs": self._sweep_runs,
                    "truth_targets": self._truth_targets, "truth_preprocessing": self._truth_preprocessing}
        if name not in builders or name not in self.names():
            raise KeyError(f"no manifest {name!r} in this run (known: {', '.join(self.names())})")
        return builders[name]()

    def _scan_table(self, scans: pd.DataFrame, *columns: str) -> pd.DataFrame:
        files = {"image": ("preprocessed", ".nii.gz"), "mask": ("preprocessed", "_mask.nii.gz"),
                 "anatomy": ("anatomy", "_A.nii.gz")}
        table = {c: self.paths.stage_files(*files[c], scans) for c in columns if c in files}
        if "site" in columns:
            table["site"] = list(scans["site"])
        return pd.DataFrame(table, columns=list(columns))

    def _segmentations(self) -> pd.DataFrame:
        rows = [{"volumes": self.paths.segmentation_volumes(m, t, r.site, r.Index), "method": m, "target": t,
                 "scan_id": r.Index, "subject": r.subject, "site": r.site} for m, t, r, _ in self.plan.image_rows()]
        return pd.DataFrame(rows)

    def _similarity(self) -> pd.DataFrame:
        """Images compared across sites: every image method on all test subjects, and the guidance
        sweep and seed replicates on the sweep subjects (Table 1)."""
        rows = [{"image": image, "mask": self.paths.test_mask(r.site, r.Index), "method": m, "target": t,
                 "subject": r.subject, "site": r.site}
                for m, t, r, image in [*self.plan.image_rows(), *self.plan.sweep_rows()]]
        return pd.DataFrame(rows)

    def _sweep_runs(self) -> pd.DataFrame:
        """Each sweep scan's extra runs, under the main harmonization they share a job with (`harmonize --runs`)."""
        plan, rows = self.plan, []
        for target in plan.target_sites:
            for r in plan.sweep_scans().itertuples():
                main = self.paths.method_image("diffusion", target, r.site, r.Index)
                rows += [{"main_output": main, **run} for run in plan.extra_runs(target, r.site, r.Index)]
        return pd.DataFrame(rows, columns=["main_output", "output", "guidance", "scale", "seed"])

    def _truth_similarity(self) -> pd.DataFrame:
        """Every image at a target site vs the subject rendered at that site; the unharmonized scans
        are scored against every target."""
        def row(method, target, r, image):
            return {"image": image, "mask": self.paths.test_mask(r.site, r.Index), "method": method, "target": target,
                    "scan_id": r.Index, "truth": self.paths.truth_at_site(target, r.subject),
                    "truth_mask": self.paths.truth_subject_mask(r.subject)}

        rows = []
        for target in self.plan.target_sites:
            for m, t, r, image in self.plan.image_rows():
                if t == target or m == "preprocessed":
                    rows.append(row(m, target, r, image))
        rows += [row(*entry) for entry in self.plan.sweep_rows()]
        return pd.DataFrame(rows)

    def _truth_targets(self) -> pd.DataFrame:
        """Each traveling subject rendered noise-free at each target, segmented like the harmonized scans."""
        rows = [{"volumes": self.paths.target_truth_volumes(t, s), "target": t, "subject": s}
                for t in self.plan.target_sites for s in self.plan.test_subjects]
        return pd.DataFrame(rows)

    def _truth_preprocessing(self) -> pd.DataFrame:
        rows = [{"image": self.paths.stage_file("preprocessed", r.cohort, r.site, r.Index, ".nii.gz"),
                 "mask": self.paths.stage_file("preprocessed", r.cohort, r.site, r.Index, "_mask.nii.gz"),
                 "scan_id": r.Index, "truth": self.paths.truth_rendered(r.Index),
                 "truth_mask": self.paths.truth_subject_mask(r.subject)} for r in self.plan.scans.itertuples()]
        return pd.DataFrame(rows)

    def _figure2(self) -> pd.DataFrame:
        plan = self.plan
        subject = plan.figure_subject()
        rows = plan.test[plan.test["subject"] == subject].drop_duplicates("site").set_index("site")
        entries = []
        for method in plan.image_methods():
            target = plan.method_targets(method)[0]
            for site in plan.figure_sites():
                label = method if target == "none" else f"{method}:{target}"  # drawn as an arrow
                entries.append({"image": self.paths.method_image(method, target, site, rows.loc[site, "scan_id"]),
                                "method": label, "site": site})
        return pd.DataFrame(entries)
