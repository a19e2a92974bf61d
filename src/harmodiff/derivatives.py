"""The harmonized scans as a BIDS-Derivatives dataset (results/derivatives/harmodiff), as nipreps
users expect: `dataset_description.json` with GeneratedBy, and per harmonized scan

    sub-<s>/ses-site<site>/anat/sub-<s>_ses-site<site>_space-MNI152NLin2009aSym_desc-harmonizedTO<target>_T1w.nii.gz
    sub-<s>/ses-site<site>/anat/sub-<s>_ses-site<site>_desc-harmonizedTO<target>_T1w.nii.gz   (the scan's own grid)

each with a JSON sidecar of its provenance (checkpoint sha256, target site, guidance and scale,
steps, start, noise seed, harmodiff version; `harmonize` records them next to its output).

    python -m harmodiff.derivatives description --output DIR/dataset_description.json
    python -m harmodiff.derivatives image --harmonized X.nii.gz --raw RAW.nii.gz --transform T.mat \\
        --mni-output ..._space-MNI152NLin2009aSym_..._T1w.nii.gz --native-output ..._T1w.nii.gz
"""

from __future__ import annotations

import argparse
import json
import shutil
from harmodiff import __version__
from harmodiff.antsio import to_native
from harmodiff.io import InputError, atomic_path, json_sidecar, outputs_together, write_json, one_line_errors
from harmodiff.layout import SPACE

BIDS_VERSION = "1.10.0"


def dataset_description() -> dict:
    return {"Name": "harmodiff: site-harmonized T1-weighted scans", "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "harmodiff", "Version": __version__,
                             "Description": "patch-level 3D diffusion harmonization guided by an anatomy "
                                            "map and a site embedding"}]}


def image_sidecar(provenance: dict, space: str | None, sources: list[str]) -> dict:
    return {"Description": f"harmonized to site {provenance['target_site']}", "SkullStripped": True,
            "Sources": sources, **({"Space": space} if space else {}), "Provenance": provenance}


def export_image(harmonized, raw, transform, mni_output, native_output) -> None:
    """The working-grid image (copied) and its native-space version, each with its sidecar."""
    outputs = [mni_output, json_sidecar(mni_output), native_output, json_sidecar(native_output)]
    with outputs_together(outputs, inputs=[harmonized, raw, transform]):  # checked before anything is read
        record = json_sidecar(harmonized)
        if not record.is_file():
            raise InputError(f"{record}: the provenance `harmonize` writes next to {harmonized} is missing")
        try:
            provenance = json.loads(record.read_text())
        except ValueError as exc:
            raise InputError(f"{record}: not JSON ({exc})") from None
        with atomic_path(mni_output) as tmp:
            shutil.copyfile(harmonized, tmp)
        write_json(image_sidecar(provenance, SPACE, [str(harmonized)]), json_sidecar(mni_output))
        to_native(harmonized, raw, transform, native_output)
        write_json(image_sidecar(provenance, None, [str(harmonized), str(raw), str(transform)]),
                   json_sidecar(native_output))


@one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.derivatives", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("description", help="write dataset_description.json")
    d.add_argument("--output", required=True)
    i = sub.add_parser("image", help="one harmonized scan in MNI and native space, with sidecars")
    for name in ("harmonized", "raw", "transform", "mni-output", "native-output"):
        i.add_argument(f"--{name}", required=True)
    a = p.parse_args(argv)
    if a.cmd == "description":
        write_json(dataset_description(), a.output)
    else:
        export_image(a.harmonized, a.raw, a.transform, a.mni_output, a.native_output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
