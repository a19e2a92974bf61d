"""How well the segmentation's tissue ratios follow the true ones, on a synthetic cohort large
enough for a correlation to mean something.

    python benchmarks/segmentation_truth.py [SUBJECTS] [WORKDIR] > benchmarks/segmentation_truth.md

Renders SUBJECTS (default 8) traveling subjects at the demo's three test sites (same seed, so
the same site effects as `make demo`), preprocesses every scan as the workflow does (ANTs skull
strip, N4, affine to MNI, 2 mm working grid; two scans in parallel, single-threaded each), runs
Atropos with the MNI priors, and compares GM/WM/CSF ratios from summed posteriors and from
partial-volume unmixing (`evaluation.tissue_fractions`) with the true ratios. Also scores the
noise- and bias-free renderings on the same grid, which isolates the site effects. ~17 min on
2 cores.
"""

import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from harmodiff import segment as sg
from harmodiff.tables import markdown_table
from harmodiff.io import load_image, load_mask
from harmodiff.metrics import truth_on_grid
from harmodiff.synth import SynthConfig, generate


def _preprocess(args):
    from harmodiff.antsio import set_threads
    from harmodiff.config import GridConfig, PreprocessConfig
    from harmodiff.preprocess import PreprocessPaths, preprocess

    raw, out, mask = args
    set_threads(1)
    preprocess(PreprocessPaths(raw, out, mask), GridConfig(spacing=2.0, shape=[80, 96, 80]),  # the demo grid
               PreprocessConfig(seed=0))
    return out


def _ratios(image, mask, affine):
    probs = sg.segment_atropos(image, mask, affine)
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    return {method: sg.tissue_volumes(sg.tissue_fractions(image, mask, affine, probs, method), voxel_ml)
            for method in sg.FRACTIONS}


def main(subjects: int = 8, workdir: str | None = None) -> None:
    work = Path(workdir or tempfile.mkdtemp(prefix="harmodiff-segtruth-"))
    # three training sites as in the demo, so the test sites get the demo's site parameters
    cfg = SynthConfig(train_sites=3, train_subjects_per_site=1, test_sites=3, test_subjects=subjects,
                      seed=0, render_spacing=1.5)
    sheet = generate(work / "synthetic", cfg, progress=False)
    test = sheet[sheet.cohort == "test"]
    jobs = [(str(work / "synthetic" / p) if not Path(p).is_absolute() else p,
             str(work / "pre" / f"{s}.nii.gz"), str(work / "pre" / f"{s}_mask.nii.gz"))
            for s, p in zip(test.scan_id, test.path)]
    (work / "pre").mkdir(exist_ok=True)
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_preprocess, jobs))
    truth = pd.read_csv(work / "synthetic/truth/subjects.tsv", sep="\t").set_index("subject")
    rows = []
    for row, (_, out, mask_path) in zip(test.itertuples(), jobs):
        img = load_image(out)
        image = np.asarray(img.dataobj, np.float32)
        mask = load_mask(mask_path, like=img)
        rendered = truth_on_grid(work / f"synthetic/truth/rendered/{row.scan_id}.nii.gz", img)
        true_mask = truth_on_grid(work / f"synthetic/truth/subjects/{row.subject}_mask.nii.gz", img) > 0.5
        for source, (im, mk) in {"preprocessed scan": (image, mask), "noise-free rendering": (rendered, true_mask)}.items():
            for method, vols in _ratios(im, mk, img.affine).items():
                rows.append({"images": source, "fractions": method, "subject": row.subject, "site": row.site,
                             **{t: vols[f"{t}_ratio"] for t in sg.TISSUES}})
    d = pd.DataFrame(rows).join(truth[[f"{t}_ratio" for t in sg.TISSUES]], on="subject")
    table = []
    for (source, method), g in d.groupby(["images", "fractions"], sort=False):
        entry = {"images": source, "tissue volume from": method, "scans": len(g)}
        for t in sg.TISSUES:
            entry[f"r {t.upper()}"] = float(g[t].corr(g[f"{t}_ratio"]))
        for t in ("gm", "wm"):
            entry[f"bias {t.upper()}"] = float((g[t] - g[f"{t}_ratio"]).mean())
        site_mean = g.groupby("site")["wm"].mean() - g.groupby("site")["wm_ratio"].mean()
        entry["WM site offset range"] = float(site_mean.max() - site_mean.min())
        table.append(entry)
    print(__doc__.split("\n\n")[0].replace("\n", " ") + "\n")
    print(f"Command: `python benchmarks/segmentation_truth.py {subjects}`; {len(test)} scans "
          f"({subjects} subjects x 3 sites), true GM ratio {truth.loc[test.subject.unique(), 'gm_ratio'].min():.3f}-"
          f"{truth.loc[test.subject.unique(), 'gm_ratio'].max():.3f}, WM "
          f"{truth.loc[test.subject.unique(), 'wm_ratio'].min():.3f}-{truth.loc[test.subject.unique(), 'wm_ratio'].max():.3f}.\n")
    print(markdown_table(pd.DataFrame(table)))
    d.to_csv(work / "segmentation_truth.csv", index=False)
    print(f"\nPer-scan values: {work / 'segmentation_truth.csv'}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8, sys.argv[2] if len(sys.argv) > 2 else None)
