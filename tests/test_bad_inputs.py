"""Bad input files x every image-reading CLI: exit code 2, one line on stderr naming the file and
the problem, and nothing left in the output folder (the probe table of issue 15, as tests)."""

import gzip
import importlib

import nibabel as nib
import numpy as np
import pytest


AFFINE = np.eye(4) * 2 + np.diag([0, 0, 0, -1])


def _write(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return path


def _bad(kind, path):
    """A bad input of one kind at path (.nii.gz); returns (path, words the message must contain)."""
    good = np.random.default_rng(0).normal(500, 50, (12, 12, 12))
    if kind == "missing":
        return path, "not found"
    if kind == "not_nifti":
        path.write_text("scan_id\tpath\n")
        return path, "not a readable NIfTI"
    if kind == "4d":
        return _write(path, np.stack([good, good], -1)), "3-D"
    if kind == "nan":
        data = good.copy()
        data[3, 3, 3] = np.nan
        return _write(path, data), "NaN"
    if kind == "empty":
        return _write(path, np.zeros_like(good)), "all zero"
    if kind == "truncated":
        _write(path, good)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        return path, ""
    if kind == "corrupt":
        _write(path, good)
        raw = bytearray(gzip.decompress(path.read_bytes()))
        packed = bytearray(gzip.compress(bytes(raw)))
        packed[len(packed) // 2] ^= 0xFF  # one flipped byte inside the compressed voxels
        path.write_bytes(bytes(packed))
        return path, ""
    raise ValueError(kind)


KINDS = ["missing", "not_nifti", "4d", "nan", "empty", "truncated", "corrupt"]

# module, argv with {bad}, {good}, {mask} and {out} filled in; the bad file is the scan read first
CLIS = {
    "preprocess": ("harmodiff.preprocess", ["--input", "{bad}", "--output", "{out}/p.nii.gz", "--mask-output",
                                            "{out}/m.nii.gz"]),
    "anatomy": ("harmodiff.anatomy", ["--input", "{bad}", "--mask", "{mask}", "--output", "{out}/A.nii.gz",
                                      "--coarse-output", "{out}/Ac.nii.gz"]),
    "anatomy_mask": ("harmodiff.anatomy", ["--input", "{good}", "--mask", "{bad}", "--output", "{out}/A.nii.gz",
                                           "--coarse-output", "{out}/Ac.nii.gz"]),
    "harmonize": ("harmodiff.harmonize", ["--checkpoint", "{out}/../none.pt", "--input", "{bad}", "--mask", "{mask}",
                                          "--target-site", "A", "--output", "{out}/h.nii.gz"]),
    "histmatch": ("harmodiff.histmatch", ["match", "--input", "{bad}", "--mask", "{mask}", "--reference",
                                          "{out}/../r.npy", "--output", "{out}/x.nii.gz"]),
    "segment": ("harmodiff.segment", ["--input", "{bad}", "--mask", "{mask}", "--output-prefix", "{out}/seg"]),
    "external": ("harmodiff.external", ["--input", "{bad}", "--mask", "{mask}", "--space", "mni",
                                        "--output", "{out}/e.nii.gz"]),
    "truth_image": ("harmodiff.metrics", ["truth-image", "--truth", "{bad}", "--truth-mask", "{mask}", "--like",
                                          "{good}", "--output", "{out}/t.nii.gz", "--mask-output", "{out}/tm.nii.gz"]),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cli", list(CLIS))
def test_bad_input_is_one_line_naming_the_file_and_leaves_nothing(cli, kind, tmp_path, capsys):
    module, template = CLIS[cli]
    good = _write(tmp_path / "good.nii.gz", np.random.default_rng(1).normal(500, 50, (12, 12, 12)))
    mask_data = np.zeros((12, 12, 12))
    mask_data[3:9, 3:9, 3:9] = 1
    mask = _write(tmp_path / "mask.nii.gz", mask_data)
    bad, words = _bad(kind, tmp_path / "bad.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.format(bad=bad, good=good, mask=mask, out=out) for a in template]
    try:
        rc = importlib.import_module(module).main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.count("\n") == 0 and str(bad) in err and words in err, err
    assert "Traceback" not in err
    assert list(out.iterdir()) == []
