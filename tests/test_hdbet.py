"""HD-BET 2's real inference path (nnU-Net reading, reorientation, resampling, export onto the
scan's grid) with the small model folder in tests/data/hd-bet-tiny, trained here on synthetic
4 mm scans (`make hdbet-tiny`). Its masks are scored against the synthetic cohort's truth."""

import hashlib
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT

from harmodiff import hdbet_weights as hw
from harmodiff import preprocess as pp
from harmodiff.config import HDBET_FILES, GridConfig, PreprocessConfig
from harmodiff.io import InputError
from harmodiff.synth import SynthConfig, generate, native_brain_mask

TINY = ROOT / "tests/data/hd-bet-tiny"
# the cohort the tiny model was trained on (Makefile: hdbet-tiny); its 9 training scans were seen
# in training, its 4 test-cohort scans were not
COHORT = SynthConfig(train_sites=3, train_subjects_per_site=3, test_sites=2, test_subjects=2, seed=3,
                     render_spacing=4.0, native_spacing=(3.6, 4.4))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("hdbet-cohort")
    sheet = generate(out, COHORT, progress=False)
    return out, sheet


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _held_out(cohort):
    out, sheet = cohort
    rows = sheet[sheet["cohort"] == "test"]
    return [(out / r.path, native_brain_mask(out, r.scan_id)) for r in rows.itertuples()]


def test_unseen_scans_masks_match_the_truth(cohort):
    for scan, truth in _held_out(cohort):
        mask = pp.skullstrip_hdbet(scan, TINY, threads=1)
        true = np.asarray(nib.load(truth).dataobj) > 0
        assert mask.shape == true.shape
        assert _dice(mask.numpy() > 0.5, true) > 0.93, scan.name  # measured 0.943-0.972


def test_mask_follows_the_scan_whatever_its_orientation(cohort, tmp_path):
    """The same scan stored with its axes permuted and flipped (LPS, another axis order) gives the
    same mask on each file's own grid: HD-BET's reorientation and its export back onto the scan."""
    scan, _ = _held_out(cohort)[0]
    img = nib.load(scan)
    data = np.asarray(img.dataobj)
    ref = pp.skullstrip_hdbet(scan, TINY, threads=1).numpy() > 0.5
    src = nib.orientations.io_orientation(img.affine)
    for codes in (("L", "P", "S"), ("S", "R", "A")):
        ornt = nib.orientations.ornt_transform(src, nib.orientations.axcodes2ornt(codes))
        moved = nib.Nifti1Image(nib.orientations.apply_orientation(data, ornt).astype(np.float32),
                                img.affine @ nib.orientations.inv_ornt_aff(ornt, data.shape))
        path = tmp_path / f"{''.join(codes)}.nii.gz"
        nib.save(moved, path)
        assert nib.aff2axcodes(nib.load(path).affine) == codes
        mask = pp.skullstrip_hdbet(path, TINY, threads=1).numpy() > 0.5
        back = nib.orientations.apply_orientation(mask, nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt(codes), src))
        assert back.shape == ref.shape
        assert (back == ref).mean() > 0.995, codes


def test_resamples_back_onto_a_finer_scan(cohort, tmp_path):
    """A 2 mm copy of a scan: HD-BET predicts at the model's 4 mm and resamples the mask back onto
    the 2 mm grid; the mask still matches the truth brought onto that grid."""
    from scipy import ndimage

    scan, truth = _held_out(cohort)[1]
    img = nib.load(scan)
    fine = ndimage.zoom(np.asarray(img.dataobj, dtype=np.float32), 2, order=1)
    affine = img.affine.copy()
    affine[:3, :3] /= 2
    affine[:3, 3] -= img.affine[:3, :3] @ np.full(3, 0.25)  # voxel centres of the finer grid
    path = tmp_path / "fine.nii.gz"
    nib.save(nib.Nifti1Image(fine, affine), path)
    true = ndimage.zoom(np.asarray(nib.load(truth).dataobj, dtype=np.float32), 2, order=1) > 0.5
    mask = pp.skullstrip_hdbet(path, TINY, threads=1)
    assert mask.shape == fine.shape and np.allclose(mask.spacing, np.array(img.header.get_zooms()[:3]) / 2)
    assert _dice(mask.numpy() > 0.5, true) > 0.88


def test_preprocess_records_the_weights_sha256(cohort, tmp_path):
    scan, _ = _held_out(cohort)[2]
    out = tmp_path / "pre.nii.gz"
    pp.preprocess(pp.PreprocessPaths(scan, out, tmp_path / "mask.nii.gz"),
                  GridConfig(spacing=4.0, shape=[40, 48, 40]),
                  PreprocessConfig(skullstrip="hdbet", hdbet_weights=str(TINY), threads=1, brain_volume_ml=(500, 3500)))
    record = json.loads((tmp_path / "pre.json").read_text())
    expected = hashlib.sha256("".join(
        f"{n}:{hashlib.sha256((TINY / n).read_bytes()).hexdigest()}\n" for n in HDBET_FILES).encode()).hexdigest()
    assert record["skullstrip"] == "hdbet" and record["hdbet_weights_sha256"] == expected
    assert 1000 < record["brain_volume_ml"] < 2500 and record["template_correlation"] > 0.5


def test_changed_weights_change_the_sha256(tmp_path):
    copy = tmp_path / "w"
    shutil.copytree(TINY, copy)
    before = pp.hdbet_weights_sha256(copy)
    ckpt = copy / "fold_all/checkpoint_final.pth"
    data = bytearray(ckpt.read_bytes())
    data[-100] ^= 1
    ckpt.write_bytes(bytes(data))
    assert pp.hdbet_weights_sha256(copy) != before


def test_a_foreign_model_folder_is_one_clear_line(cohort, tmp_path):
    scan, _ = _held_out(cohort)[0]
    copy = tmp_path / "w"
    shutil.copytree(TINY, copy)
    (copy / "plans.json").write_text(json.dumps({"plans_name": "x", "configurations": {}}))
    with pytest.raises(InputError) as err:
        pp.skullstrip_hdbet(scan, copy, threads=1)
    assert str(copy) in str(err.value) and "not an HD-BET 2 model folder" in str(err.value)
    assert "\n" not in str(err.value)


def test_train_tiny_writes_a_folder_hdbet_loads(cohort, tmp_path):
    """Two steps on two scans: the folder has HD-BET's three files, and HD-BET's own loader builds
    the network and takes the state dict (strict), then predicts a mask on the scan's grid."""
    out, _ = cohort
    scans, masks = hw.cohort_pairs(out, 2)
    folder = hw.train_tiny(scans, masks, tmp_path / "w", steps=2, features=(2, 4), patch_size=(64, 80, 64))
    assert all((folder / n).is_file() for n in HDBET_FILES)
    mask = pp.skullstrip_hdbet(scans[0], folder, threads=1)
    assert mask.shape == nib.load(scans[0]).shape


def test_pairs_that_do_not_match_are_refused(tmp_path):
    with pytest.raises(InputError, match="as many brain masks as scans"):
        hw.train_tiny([tmp_path / "a.nii.gz"], [], tmp_path / "w")


@pytest.mark.e2e
def test_skullstrip_hdbet_through_the_workflow(tmp_path):
    """config/test.yaml with `skullstrip: hdbet`: the preprocess rule runs HD-BET on a 2 mm scan,
    records the weights' sha256, and its mask matches the truth on the working grid; without the
    weights the run stops before any job, naming the missing file."""
    import yaml

    from conftest import dice, snakemake
    from test_workflow import _truth_on_grid

    cfg = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    cfg["preprocess"].update(skullstrip="hdbet", hdbet_weights=str(tmp_path / "missing"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    target = "results/preprocessed/test/TSA/sub-ts01_ses-TSA.nii.gz"
    proc = snakemake(tmp_path, target, "--cores", "2", "--configfile", str(tmp_path / "c.yaml"), check=False)
    assert proc.returncode != 0
    assert "Missing input files" in proc.stdout + proc.stderr and "checkpoint_final.pth" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()

    cfg["preprocess"]["hdbet_weights"] = str(TINY)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path, target, "--cores", "2", "--configfile", str(tmp_path / "c.yaml"))
    record = json.loads((tmp_path / target.replace(".nii.gz", ".json")).read_text())
    assert record["skullstrip"] == "hdbet" and record["hdbet_weights_sha256"] == pp.hdbet_weights_sha256(TINY)
    mask_img = nib.load(tmp_path / target.replace(".nii.gz", "_mask.nii.gz"))
    truth = _truth_on_grid(tmp_path / "results/synthetic/truth/subjects/sub-ts01_mask.nii.gz", mask_img) > 0.5
    assert dice(mask_img.get_fdata() > 0.5, truth) >= 0.9
