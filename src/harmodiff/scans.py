"""Scan sheets: the TSV every run starts from (scan_id, subject, site, cohort, path).

`read_scan_sheet` validates a sheet against `schemas/scans.schema.yaml` and checks what a schema
cannot: unique scan_ids, files that exist and are NIfTI, and target sites that have training
scans or target-only scans (cohort `target`: a scanner the model was not trained on, its site token
learned from them, `harmodiff.sites`). Every error names the sheet row (1-based line number in the file, header = line 1).

Builders (`python -m harmodiff.scans {synthetic,bids,srpbs} ...`):

* synthetic: the sheet of a cohort written by `harmodiff.synth`.
* bids: `sub-*/[ses-*/]anat/*_T1w.nii[.gz]`; the site comes from a column of the session's
  `sub-*_sessions.tsv` if it has that column, else from `participants.tsv`.
* srpbs: the SRPBS traveling-subject release laid out as
  `sub-XX/ses-site<CODE>/anat/sub-XX_ses-site<CODE>[_run-N]_T1w.nii[.gz]` (site = CODE). Repeated
  scans of a subject at a site (several runs) are reduced to the first run, which is how the
  release's 97 unique T1 scans are counted.
"""

from __future__ import annotations

import argparse
import re
from importlib import resources
from pathlib import Path

import jsonschema
import nibabel as nib
import pandas as pd
import yaml

from harmodiff.io import InputError, check_outputs, not_a_file, write_text
from harmodiff.manifests import add_manifest_option

COLUMNS = ["scan_id", "subject", "site", "cohort", "path"]
# train: the model learns its sites from these; test: harmonized and evaluated; target: scans of a scanner the
# model was not trained on, only to learn its site token from (and histogram matching's reference)
COHORTS = ("train", "test", "target")
REFERENCE_COHORTS = ("train", "target")  # the scans a target site is known by: its training or target-only ones


def _schema() -> dict:
    text = resources.files("harmodiff").joinpath("schemas/scans.schema.yaml").read_text()
    return yaml.safe_load(text)


def _is_nifti(path: Path) -> bool:
    try:
        img = nib.load(str(path))
    except Exception:
        return False
    return isinstance(img, (nib.Nifti1Image, nib.Nifti2Image))


# what the id columns may hold: they name output files and Snakemake wildcards, and go on command lines
_ID_CHARACTERS = "may hold only letters, digits and _ . + - and must start with a letter or digit"
_ALLOWED = {"scan_id": _ID_CHARACTERS, "subject": _ID_CHARACTERS, "site": _ID_CHARACTERS,
            "path": "holds a tab, newline or other control character"}
# file names a scan's outputs share a folder with: scan x's mask is x_mask.nii.gz
_OUTPUT_SUFFIXES = ("_mask",)


def _refuse_clashing_file_names(df: pd.DataFrame, source: str) -> None:
    """InputError when one scan's output names another's (scan 'x_mask' beside scan 'x' at a site)."""
    keys = {(site, scan): i + 2 for i, (site, scan) in enumerate(zip(df["site"], df["scan_id"]))}
    for (site, scan), line in keys.items():
        for suffix in _OUTPUT_SUFFIXES:
            other = keys.get((site, scan.removesuffix(suffix))) if scan.endswith(suffix) else None
            if other:
                raise InputError(f"{source}, row {line} (scan_id {scan!r}): its preprocessed image would have the "
                                 f"name of row {other}'s {suffix.strip('_')} ({scan.removesuffix(suffix)!r} at "
                                 f"site {site!r}); rename one")


def validate_scan_sheet(df: pd.DataFrame, *, source: str = "scan sheet", base_dir: Path | None = None,
                        target_sites=(), check_files: bool = True) -> pd.DataFrame:
    """Validate a scan sheet DataFrame; returns a copy with absolute paths.

    Raises InputError naming the row and the problem.
    """
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown:
        raise InputError(f"{source}: unknown column(s) {unknown}; a scan sheet has exactly {COLUMNS}")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{source}: missing column(s) {missing}; a scan sheet has exactly {COLUMNS}")
    if df.empty:
        raise InputError(f"{source}: no scans listed")
    validator = jsonschema.Draft202012Validator(_schema())
    df = df[COLUMNS].copy()
    seen: dict[str, int] = {}
    files: dict[Path, tuple[int, str]] = {}
    paths = []
    for i, row in enumerate(df.itertuples(index=False)):
        line = i + 2
        record = {c: ("" if pd.isna(v) else str(v)) for c, v in zip(COLUMNS, row)}
        errors = sorted(validator.iter_errors(record), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            where = e.path[0] if e.path else "row"
            message = _ALLOWED.get(where) if e.validator == "pattern" else None
            message = f"{record[where]!r} {message}" if message else e.message
            raise InputError(f"{source}, row {line} (scan_id {record['scan_id']!r}): {where}: {message}")
        if record["scan_id"] in seen:
            raise InputError(f"{source}, row {line}: duplicate scan_id {record['scan_id']!r} "
                             f"(first on row {seen[record['scan_id']]})")
        seen[record["scan_id"]] = line
        p = Path(record["path"])
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if check_files:
            if not p.is_file():
                raise InputError(f"{source}, row {line} (scan_id {record['scan_id']!r}): {not_a_file(p)}: {p}")
            if not _is_nifti(p):
                raise InputError(f"{source}, row {line} (scan_id {record['scan_id']!r}): not a NIfTI file: {p}")
            p = p.resolve()
            if p in files:
                first, first_id = files[p]
                raise InputError(f"{source}, row {line} (scan_id {record['scan_id']!r}): the same file as row "
                                 f"{first} (scan_id {first_id!r}): {p}; a scan listed twice, and possibly as "
                                 "training and test scan at once")
            files[p] = (line, record["scan_id"])
        paths.append(str(p))
    df["path"] = paths
    _refuse_clashing_file_names(df, source)
    check_target_sites(df, target_sites, source)
    return df.reset_index(drop=True)


def check_target_sites(df: pd.DataFrame, target_sites, source: str, *, trained_sites=None) -> None:
    """InputError naming a target site with neither training scans nor target-only scans, a site with both,
    and target-only scans of a site that is not a target. `trained_sites`: the sites of a pretrained model
    (there are no training scans), which a target without target-only scans must be among."""
    train_sites = set(df.loc[df["cohort"] == "train", "site"]) if trained_sites is None else set(trained_sites)
    target_only = set(df.loc[df["cohort"] == "target", "site"])
    both = sorted(train_sites & target_only)
    if both:
        raise InputError(f"{source}: site {both[0]!r} has target-only scans (cohort target) and is a training site; "
                         "target-only scans are of a scanner the model was not trained on: name it differently")
    unused = sorted(target_only - set(target_sites))
    if unused and target_sites:  # a sheet read without its run's targets is not checked for them
        raise InputError(f"{source}: site {unused[0]!r} has target-only scans (cohort target) but is not in config "
                         "target_sites")
    for site in target_sites:
        if site not in train_sites | target_only:
            known = "the pretrained model's sites" if trained_sites is not None else "training sites"
            raise InputError(f"{source}: target site {site!r} has no training scans and no target-only scans "
                             f"(cohort target) to learn it from ({known}: {sorted(train_sites) or 'none'})")


def read_scan_sheet(path: str | Path, *, target_sites=(), check_files: bool = True) -> pd.DataFrame:
    """Read and validate a scan sheet TSV; relative paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: scan sheet not found")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable TSV ({exc})") from None
    return validate_scan_sheet(df, source=str(path), base_dir=path.parent,
                               target_sites=target_sites, check_files=check_files)


def write_scan_sheet(df: pd.DataFrame, path: str | Path) -> Path:
    return write_text(df[COLUMNS].to_csv(sep="\t", index=False), path)


# --------------------------------------------------------------------------------------------
# builders


def from_synthetic(cohort_dir: str | Path) -> pd.DataFrame:
    """The sheet of a cohort written by `harmodiff.synth` (validated, absolute paths)."""
    return read_scan_sheet(Path(cohort_dir) / "scans.tsv")


_T1W = re.compile(r"^(sub-[^_]+)(?:_(ses-[^_]+))?(?:_.*)?_T1w\.nii(\.gz)?$")


def _bids_t1w_files(root: Path):
    for f in sorted(root.glob("sub-*/anat/*_T1w.nii*")) + sorted(root.glob("sub-*/ses-*/anat/*_T1w.nii*")):
        m = _T1W.match(f.name)
        if m:
            yield f, m.group(1), m.group(2)


def _bids_table(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable TSV ({exc})") from None


def _bids_value(column: str, sub: str, ses: str | None, sessions: pd.DataFrame | None,
                participants: pd.DataFrame | None) -> str | None:
    """A session's value of `column` from sub-*_sessions.tsv, else the subject's from participants.tsv."""
    for table, key, wanted in ((sessions, "session_id", ses), (participants, "participant_id", sub)):
        if wanted and table is not None and {column, key} <= set(table.columns):
            hit = table.loc[table[key] == wanted, column]
            if len(hit) and hit.iloc[0] not in ("", "n/a"):
                return hit.iloc[0]
    return None


def from_bids(root: str | Path, *, site_column: str = "site", cohort: str = "test",
              cohort_column: str | None = None) -> pd.DataFrame:
    """Sheet of a BIDS dataset: the site of each scan from its session's row of
    sub-*_sessions.tsv, else its subject's of participants.tsv; its cohort likewise from
    `cohort_column` when given (per session or per subject), else `cohort` for every scan."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: BIDS root not found")
    participants = _bids_table(root / "participants.tsv")
    sessions_of: dict[str, pd.DataFrame | None] = {}  # read once per subject, not once per scan
    rows = []
    for f, sub, ses in _bids_t1w_files(root):
        if sub not in sessions_of:
            sessions_of[sub] = _bids_table(root / sub / f"{sub}_sessions.tsv")
        sessions = sessions_of[sub]
        where = f"{sub}{' ' + ses if ses else ''}"
        site = _bids_value(site_column, sub, ses, sessions, participants)
        if site is None:
            raise InputError(f"{f}: no {site_column!r} for {where} in {sub}_sessions.tsv or participants.tsv")
        role = cohort
        if cohort_column:
            role = _bids_value(cohort_column, sub, ses, sessions, participants)
            if role not in COHORTS:
                raise InputError(f"{f}: column {cohort_column!r} of {sub}_sessions.tsv or participants.tsv must say "
                                 f"{', '.join(COHORTS[:-1])} or {COHORTS[-1]} for {where}, got {role!r}")
        scan_id = f.name.split(".nii")[0].removesuffix("_T1w")
        rows.append((scan_id, sub, str(site), role, str(f.resolve())))
    if not rows:
        raise InputError(f"{root}: no sub-*/[ses-*/]anat/*_T1w.nii[.gz] files found")
    return validate_scan_sheet(pd.DataFrame(rows, columns=COLUMNS), source=str(root))


_SRPBS = re.compile(r"^(sub-[^_]+)_ses-site([A-Za-z0-9]+)(?:_run-(\d+))?_T1w\.nii(\.gz)?$")


def from_srpbs(root: str | Path, *, cohort: str = "test") -> pd.DataFrame:
    """Sheet of the SRPBS traveling-subject release (see the module docstring for the layout)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: SRPBS root not found")
    found: dict[tuple[str, str], list[tuple[int, Path]]] = {}
    for f in sorted(root.glob("sub-*/ses-site*/anat/*_T1w.nii*")):
        m = _SRPBS.match(f.name)
        if not m:
            continue
        sub, site, run = m.group(1), m.group(2), int(m.group(3) or 1)
        found.setdefault((sub, site), []).append((run, f))
    if not found:
        raise InputError(f"{root}: no sub-XX/ses-site<CODE>/anat/*_T1w.nii[.gz] files found")
    rows = []
    for (sub, site), runs in sorted(found.items()):
        run, f = min(runs)
        rows.append((f"{sub}_ses-site{site}", sub, site, cohort, str(f.resolve())))
    return validate_scan_sheet(pd.DataFrame(rows, columns=COLUMNS), source=str(root))


def combine(*sheets: pd.DataFrame, target_sites=()) -> pd.DataFrame:
    """Concatenate sheets (e.g. a training cohort and the SRPBS test cohort) and re-validate."""
    df = pd.concat(sheets, ignore_index=True)
    return validate_scan_sheet(df, source="combined scan sheet", target_sites=target_sites)


def readable_report(scan_ids, paths) -> pd.DataFrame:
    """Every scan read in full, as every tool reads it (`io.load_image`: header, voxel data, gzip
    checksum, NaNs, empty image), and its image hashed (a second row with the same image is a
    problem: a scan listed twice): one row per scan with its problem ('' when it is usable)."""
    from harmodiff.io import load_image

    import hashlib

    import numpy as np

    rows, first_with = [], {}
    for scan_id, path in zip(scan_ids, paths):
        try:
            img = load_image(path)
            problem, shape = "", "x".join(map(str, img.shape))
            # the image itself, however it is stored (a .nii and a .nii.gz copy are one scan)
            voxels = np.ascontiguousarray(np.asanyarray(img.dataobj))
            digest = hashlib.sha256(str((voxels.dtype.str, voxels.shape)).encode() + img.affine.tobytes()
                                    + voxels.tobytes()).hexdigest()
            if digest in first_with:
                problem = (f"the same image (voxels and affine) as scan {first_with[digest]!r}: a scan listed "
                           "twice, and possibly as training and test scan at once")
            first_with.setdefault(digest, scan_id)
        except InputError as exc:
            problem, shape, digest = str(exc).removeprefix(f"{path}: "), "", ""
        rows.append({"scan_id": scan_id, "path": str(path), "shape": shape, "sha256": digest, "problem": problem})
    return pd.DataFrame(rows, columns=["scan_id", "path", "shape", "sha256", "problem"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.scans", description="Build or check a scan sheet.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate a sheet")
    c.add_argument("sheet")
    c.add_argument("--target-site", action="append", default=[])
    s = sub.add_parser("synthetic", help="sheet of a harmodiff.synth cohort")
    s.add_argument("cohort_dir")
    b = sub.add_parser("bids", help="sheet of a BIDS dataset")
    b.add_argument("root")
    b.add_argument("--site-column", default="site")
    b.add_argument("--cohort", choices=COHORTS, default="test")
    b.add_argument("--cohort-column", help="column of sessions.tsv / participants.tsv saying train, test or target")
    u = sub.add_parser("readable", help="read every scan in full before any job starts; exit 2 naming the bad ones")
    add_manifest_option(u, ("scan_id", "image"))
    u.add_argument("--output", required=True, help="TSV: scan_id path shape problem (written only when all pass)")
    r = sub.add_parser("srpbs", help="sheet of the SRPBS traveling-subject release")
    r.add_argument("root")
    r.add_argument("--cohort", choices=COHORTS, default="test")
    for q in (s, b, r):
        q.add_argument("-o", "--output", required=True, help="TSV to write")
    a = p.parse_args(argv)
    try:
        if a.cmd == "readable":
            check_outputs([a.output])
            report = readable_report(list(a.manifest["scan_id"]), list(a.manifest["image"]))
            bad = report[report["problem"] != ""]
            if len(bad):
                shown = "; ".join(f"{r.path}: {r.problem}" for r in bad.head(3).itertuples())
                more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
                raise InputError(f"{len(bad)} of {len(report)} scans cannot be used: {shown}{more}")
            write_text(report.to_csv(sep="\t", index=False), a.output)
            print(f"{len(report)} scans read in full: OK")
            return 0
        if a.cmd == "check":
            df = read_scan_sheet(a.sheet, target_sites=a.target_site)
            print(f"{a.sheet}: {len(df)} scans, sites {sorted(set(df['site']))}: OK")
            return 0
        check_outputs([a.output])
        if a.cmd == "synthetic":
            df = from_synthetic(a.cohort_dir)
        elif a.cmd == "bids":
            df = from_bids(a.root, site_column=a.site_column, cohort=a.cohort, cohort_column=a.cohort_column)
        else:
            df = from_srpbs(a.root, cohort=a.cohort)
        write_scan_sheet(df, a.output)
    except InputError as exc:
        p.exit(2, f"error: {exc}\n")
    print(f"wrote {len(df)} scans to {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
