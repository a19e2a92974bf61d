"""Issue 26's probes of careless or hostile input, run against one or two harmodiff source trees.

Each probe is one command in a fresh folder (its own $TMPDIR, a 120 s limit); the table gives its
exit status, the first line it printed on stderr and what it did to its files (an input replaced,
a device node turned into a plain file, a NaN image written, temporaries left in $TMPDIR...).

    git worktree add /tmp/old <commit before issue 26>
    python benchmarks/input_probes.py --before /tmp/old/src --after src > benchmarks/input_probes.md

The probes' inputs (a synthetic 4 mm scan, its preprocessed 2 mm version) are made once with the
--after tree; the demo's shipped model is the checkpoint. The shell-injection and BIDS probes need
the whole workflow and are the tests tests/test_injection.py and tests/test_workflow.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "resources/demo-model/checkpoint.pt"
PY = sys.executable
RECORD = '{"skullstrip": "ants", "source": "raw/X.nii.gz"}\n'  # a preprocessing record, as harmonize reads it


def run(src: Path, cwd: Path, argv: list[str], timeout: int = 120) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": str(src), "TMPDIR": str(cwd / "tmp")}
    (cwd / "tmp").mkdir(exist_ok=True)
    try:
        p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"still running after {timeout} s"
    lines = [ln for ln in (p.stderr + p.stdout).splitlines()
             if ln.strip() and not ln.startswith(("  ", "Traceback", "harmonize ->", "Using profile", "Building DAG",
                                                   "Job stats", "job ", "---", "total ", "Reasons", "This was a dry"))]
    first = next((ln for ln in lines if "Error" in ln or ln.startswith("error")), lines[-1] if lines else "")
    return str(p.returncode), first[:150]


def temporaries(cwd: Path) -> str:
    n = sum(1 for _ in (cwd / "tmp").rglob("*")) if (cwd / "tmp").exists() else 0
    return f"{n} files left in $TMPDIR" if n else "$TMPDIR clean"


def inputs(work: Path, src: Path) -> dict:
    """A raw 4 mm scan and its preprocessed 2 mm version (the demo model's grid)."""
    cohort = work / "cohort"
    subprocess.run([PY, "-m", "harmodiff.synth", str(cohort), "--train-sites", "1", "--train-subjects-per-site", "1",
                    "--test-sites", "1", "--test-subjects", "1", "--render-spacing", "4", "--native-spacing", "3.6",
                    "4.4", "--quiet"], check=True, env={**os.environ, "PYTHONPATH": str(src)})
    raw = sorted((cohort / "raw/test").rglob("*.nii.gz"))[0]
    pre = work / "pre"
    subprocess.run([PY, "-m", "harmodiff.preprocess", "--input", str(raw), "--output", str(pre / "X.nii.gz"),
                    "--mask-output", str(pre / "X_mask.nii.gz"), "--spacing", "2", "--shape", "80", "96", "80",
                    "--threads", "1"], check=True, env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True)
    return {"raw": raw, "pre": pre / "X.nii.gz", "mask": pre / "X_mask.nii.gz"}


def _null(path: Path) -> Path:
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


def _is_device(path: Path) -> str:
    return "still a device" if stat.S_ISCHR(path.lstat().st_mode) else "REPLACED by a regular file"


def _nan_output(path: Path) -> str:
    if not path.exists():
        return "no output"
    data = np.asarray(nib.load(str(path)).dataobj)
    return f"output written, {np.isnan(data).mean():.0%} NaN" if np.isnan(data).any() else "output written, finite"


def _sheet(cwd: Path, rows: list[tuple]) -> Path:
    lines = ["scan_id\tsubject\tsite\tcohort\tpath"] + ["\t".join(r) for r in rows]
    (cwd / "scans.tsv").write_text("\n".join(lines) + "\n")
    return cwd / "scans.tsv"


def _img(path: Path, data, slope=None) -> Path:
    img = nib.Nifti1Image(data, np.diag([2, 2, 2, 1]))
    if slope:
        img.header.set_slope_inter(slope, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def harmonize_argv(d: dict, out: str, *extra) -> list[str]:
    return [PY, "-m", "harmodiff.harmonize", "--checkpoint", str(MODEL), "--input", str(d["pre"]), "--mask",
            str(d["mask"]), "--target-site", "TRA", "--output", out, "--steps", "1", "--batch-size", "27",
            "--device", "cpu", *extra]


def preprocess_argv(raw, *extra, output: str = "p.nii.gz") -> list[str]:
    return [PY, "-m", "harmodiff.preprocess", "--input", str(raw), "--output", output, "--mask-output",
            "m.nii.gz", "--spacing", "4", "--shape", "40", "48", "40", "--threads", "1", *extra]


def _two_scans(cwd: Path, d: dict) -> None:
    """a.nii.gz and b.nii.gz: two different scans for a sheet's rows."""
    shutil.copy(d["raw"], cwd / "a.nii.gz")
    shutil.copy(d["pre"], cwd / "b.nii.gz")


# name, setup(cwd, data) -> argv, check(cwd, data) -> what happened
def probes():
    def subject_shell(cwd, d):
        _two_scans(cwd, d)
        _sheet(cwd, [("a", "$(touch PWNED)", "TRA", "train", "a.nii.gz"), ("b", "s2", "TSA", "test", "b.nii.gz")])
        return [PY, "-m", "harmodiff.scans", "check", "scans.tsv"]

    def bids_sidecar(cwd, d):
        (cwd / "bids").mkdir()
        nib.save(nib.load(str(d["raw"])), str(cwd / "bids/sub-01_T1w.nii"))
        (cwd / "bids/sub-01_T1w.json").write_text('{"MagneticFieldStrength": 3}')
        return preprocess_argv(cwd / "bids/sub-01_T1w.nii", output="bids/sub-01_T1w.nii.gz")

    def harmonize_sidecar(cwd, d):
        (cwd / "in").mkdir()
        shutil.copy(d["pre"], cwd / "in/X.nii.gz")
        shutil.copy(d["mask"], cwd / "in/X_mask.nii.gz")
        (cwd / "in/X.json").write_text(RECORD)
        return harmonize_argv({"pre": cwd / "in/X.nii.gz", "mask": cwd / "in/X_mask.nii.gz"}, "in/X.nii")

    def unchanged(name, text):
        return lambda cwd, d: f"{name} {'unchanged' if (cwd / name).read_text() == text else 'REPLACED'}"

    def device(flag):
        def setup(cwd, d):
            _null(cwd / "null")
            return preprocess_argv(d["raw"], flag, "null")
        return setup

    def sheet_device(cwd, d):
        _null(cwd / "null")
        (cwd / "ds/sub-01/anat").mkdir(parents=True)
        shutil.copy(d["raw"], cwd / "ds/sub-01/anat/sub-01_T1w.nii.gz")
        (cwd / "ds/participants.tsv").write_text("participant_id\tsite\nsub-01\tA\n")
        return [PY, "-m", "harmodiff.scans", "bids", "ds", "-o", "null"]

    def config_nan(cwd, d):
        (cwd / "c.yaml").write_text("target_sites: [A]\nharmonize:\n  scale: .nan\n")
        return [PY, "-m", "harmodiff.config", "check", "c.yaml"]

    def slope(cwd, d):
        _img(cwd / "big.nii.gz", np.full((40, 40, 40), 1000, np.int16), slope=1e38)
        return [PY, "-m", "harmodiff.scans", "readable", "--scan-ids", "a", "--images", "big.nii.gz", "--output", "r.tsv"]

    def slope_pre(cwd, d):
        _img(cwd / "big.nii.gz", (np.asarray(nib.load(str(d["raw"])).dataobj) > 0).astype(np.int16) * 1000, slope=1e38)
        return preprocess_argv(cwd / "big.nii.gz")

    def complex_(cwd, d):
        _img(cwd / "c.nii.gz", (np.asarray(nib.load(str(d["raw"])).dataobj) * (1 + 1j)).astype(np.complex64))
        return [PY, "-m", "harmodiff.scans", "readable", "--scan-ids", "a", "--images", "c.nii.gz", "--output", "r.tsv"]

    def scaled(factor, shift):
        def setup(cwd, d):
            img = nib.load(str(d["pre"]))
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32) * factor + shift, img.affine, img.header),
                     str(cwd / "s.nii.gz"))
            return harmonize_argv({"pre": cwd / "s.nii.gz", "mask": d["mask"]}, "h.nii.gz")
        return setup

    def shipped_grid(cwd, d):
        return [PY, "-c", "import torch; c = torch.load('{tree}/resources/demo-model/checkpoint.pt', "
                          "weights_only=True); print(c.get('voxel_mm'), file=__import__('sys').stderr)"]

    def same_file(cwd, d):
        _two_scans(cwd, d)
        _sheet(cwd, [("a", "s1", "TRA", "train", "a.nii.gz"), ("b", "s2", "TSA", "test", "b.nii.gz"),
                     ("c", "s1", "TSA", "test", "./a.nii.gz")])
        return [PY, "-m", "harmodiff.scans", "check", "scans.tsv"]

    def same_image(cwd, d):
        shutil.copy(d["raw"], cwd / "a.nii.gz")
        nib.save(nib.load(str(d["raw"])), str(cwd / "copy.nii"))
        return [PY, "-m", "harmodiff.scans", "readable", "--scan-ids", "a", "c", "--images", "a.nii.gz", "copy.nii",
                "--output", "r.tsv"]

    def mask_clash(cwd, d):
        _two_scans(cwd, d)
        _sheet(cwd, [("x", "s1", "TSA", "test", "a.nii.gz"), ("x_mask", "s2", "TSA", "test", "b.nii.gz")])
        return [PY, "-m", "harmodiff.scans", "check", "scans.tsv"]

    def directory_path(cwd, d):
        (cwd / "folder.nii.gz").mkdir()
        shutil.copy(d["raw"], cwd / "a.nii.gz")
        _sheet(cwd, [("a", "s1", "TRA", "train", "a.nii.gz"), ("b", "s2", "TSA", "test", "folder.nii.gz")])
        return [PY, "-m", "harmodiff.scans", "check", "scans.tsv"]

    def segment(cwd, d):
        return [PY, "-m", "harmodiff.segment", "--input", str(d["pre"]), "--mask", str(d["mask"]), "--output-prefix",
                "seg", "--threads", "1"]

    def bomb(cwd, d):
        import gzip
        import io

        header = nib.Nifti1Header()
        header.set_data_shape((1200, 1200, 1200))
        header.set_data_dtype(np.uint8)
        header.set_qform(np.eye(4), 1)
        buf = io.BytesIO()
        header.write_to(buf)
        with gzip.open(cwd / "bomb.nii.gz", "wb") as f:
            f.write(buf.getvalue() + b"\0" * 4)
            for _ in range(103):
                f.write(bytes(1 << 24))
        return [PY, "-m", "harmodiff.scans", "readable", "--scan-ids", "a", "--images", "bomb.nii.gz", "--output", "r.tsv"]

    def outdir(cwd, d):
        (cwd / "out.nii.gz").mkdir()
        return harmonize_argv(d, "out.nii.gz")

    def folders(cwd, d):
        return [PY, "-m", "harmodiff.anatomy", "--input", "missing.nii.gz", "--mask", "m.nii.gz", "--output",
                "a/b/A.nii.gz", "--coarse-output", "c/Ac.nii.gz"]

    def sigterm(cwd, d):
        script = ("import os, signal\nfrom harmodiff.io import atomic_path\nwith atomic_path('x.nii.gz') as tmp:\n"
                  "    tmp.write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGTERM)\n")
        return [PY, "-c", script]

    def bids_dry_run(cwd, d):
        """A BIDS study as the test cohort with the shipped model: the DAG is built (a dry run)."""
        root = cwd / "my study"
        for site in ("SA", "SB"):
            (root / f"sub-01/ses-{site}/anat").mkdir(parents=True)
            shutil.copy(d["raw"], root / f"sub-01/ses-{site}/anat/sub-01_ses-{site}_T1w.nii.gz")
        (root / "sub-01/sub-01_sessions.tsv").write_text("session_id\tsite\nses-SA\tSA\nses-SB\tSB\n")
        (cwd / "study.yaml").write_text(f"cohort:\n  source: bids\n  bids:\n    root: {root}\n    cohort: test\n"
                                        "target_sites: [TRA]\nevaluation:\n  methods: [preprocessed, diffusion]\n"
                                        "  reference_site: SA\ntrain:\n"
                                        "  pretrained: {tree}/resources/demo-model/checkpoint.pt\n")
        return [str(Path(PY).with_name("snakemake")), "-s", "{tree}/Snakefile", "-n", "--configfile",
                str(ROOT / "config/config.yaml"), "study.yaml"]

    def leftovers(cwd, d):
        left = sorted(p.name for p in cwd.iterdir() if p.name not in ("tmp",))
        return "left: " + (", ".join(left) or "nothing")

    def hidden(cwd, d):
        left = [p for p in cwd.iterdir() if p.name.startswith(".x.")]
        return f"partial left, mode {oct(stat.S_IMODE(left[0].stat().st_mode))}" if left else "no partial left"

    return [
        ("subject `$(touch PWNED)` in a sheet", subject_shell, lambda c, d: ""),
        ("preprocess over a BIDS scan's sidecar", bids_sidecar, unchanged("bids/sub-01_T1w.json",
                                                                          '{"MagneticFieldStrength": 3}')),
        ("harmonize over its input's record", harmonize_sidecar, unchanged("in/X.json", RECORD)),
        ("--qc-output /dev/null copy", device("--qc-output"), lambda c, d: _is_device(c / "null")),
        ("--transform-output /dev/null copy", device("--transform-output"), lambda c, d: _is_device(c / "null")),
        ("scans bids -o /dev/null copy", sheet_device, lambda c, d: _is_device(c / "null")),
        ("harmonize --scale nan", lambda c, d: harmonize_argv(d, "h.nii.gz", "--scale", "nan"),
         lambda c, d: _nan_output(c / "h.nii.gz")),
        ("config harmonize.scale: .nan", config_nan, lambda c, d: ""),
        ("scl_slope 1e38 (read-in-full check)", slope, lambda c, d: ""),
        ("scl_slope 1e38 (preprocess)", slope_pre, lambda c, d: ""),
        ("complex64 scan", complex_, lambda c, d: ""),
        ("harmonize an all-negative scan", scaled(1.0, -2000.0), lambda c, d: _nan_output(c / "h.nii.gz")),
        ("harmonize a 1e-30-scaled scan", scaled(1e-30, 0.0), lambda c, d: _nan_output(c / "h.nii.gz")),
        ("shipped model's voxel_mm", shipped_grid, lambda c, d: ""),
        ("one file under two scan_ids", same_file, lambda c, d: ""),
        ("one image in two files (.nii copy)", same_image, lambda c, d: ""),
        ("scan_ids x and x_mask at one site", mask_clash, lambda c, d: ""),
        ("a directory as a sheet's scan", directory_path, lambda c, d: ""),
        ("preprocess's temporaries", lambda c, d: preprocess_argv(d["raw"]), lambda c, d: temporaries(c)),
        ("segment's temporaries", segment, lambda c, d: temporaries(c)),
        ("harmonize --steps 100000", lambda c, d: harmonize_argv(d, "h.nii.gz", "--steps", "100000"), lambda c, d: ""),
        ("harmonize --strength nan", lambda c, d: harmonize_argv(d, "h.nii.gz", "--start-from", "source",
                                                                 "--strength", "nan"), lambda c, d: _nan_output(c / "h.nii.gz")),
        ("harmonize --seed 2^65", lambda c, d: harmonize_argv(d, "h.nii.gz", "--seed", str(2**65)), lambda c, d: ""),
        ("a directory as --output", outdir, lambda c, d: ""),
        ("1.7 MB gzip of 1200^3 voxels", bomb, lambda c, d: ""),
        ("a failed command's folders", folders, leftovers),
        ("SIGTERM during a save", sigterm, hidden),
        ("a BIDS study with the shipped model (dry run)", bids_dry_run, lambda c, d: ""),
    ]


def measure(src: Path, data: dict, work: Path) -> list[dict]:
    rows = []
    for i, (name, setup, check) in enumerate(probes()):
        cwd = work / f"probe{i}"
        cwd.mkdir()
        argv = [a.replace("{tree}", str(src.parent)) for a in setup(cwd, data)]
        if (cwd / "study.yaml").exists():
            (cwd / "study.yaml").write_text((cwd / "study.yaml").read_text().replace("{tree}", str(src.parent)))
        code, said = run(src, cwd, argv)
        rows.append({"probe": name, "exit": code, "said": said, "effect": check(cwd, data)})
        print(f"{src}: {name}: {code} {said[:80]}", file=sys.stderr)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", type=Path, required=True, help="src/ of the tree before issue 26")
    p.add_argument("--after", type=Path, default=ROOT / "src")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="probes-"))
    data = inputs(work / "inputs", a.after.resolve())
    results = {}
    for label, src in (("before", a.before.resolve()), ("after", a.after.resolve())):
        (work / label).mkdir()
        results[label] = measure(src, data, work / label)
    print("# Issue 26's probes, before and after\n")
    print(f"`python benchmarks/input_probes.py --before {a.before} --after {a.after}` (each probe: a fresh folder, "
          "its own $TMPDIR, 120 s at most).\n")
    print("| probe | before: exit, first line, effect | after: exit, first line, effect |")
    print("|---|---|---|")
    for b, f in zip(results["before"], results["after"]):
        cell = lambda r: f"{r['exit']}: {r['said'].replace('|', '/')}{'; ' + r['effect'] if r['effect'] else ''}"  # noqa: E731
        print(f"| {b['probe']} | {cell(b)} | {cell(f)} |")
    json.dump(results, open(work / "results.json", "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
