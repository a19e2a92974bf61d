import hashlib
import json

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from conftest import dice
from harmodiff import synth


def test_plan_matches_written_cohort(tiny_cohort):
    out, cfg = tiny_cohort
    sheet = pd.read_csv(out / "scans.tsv", sep="\t")
    pd.testing.assert_frame_equal(sheet, synth.cohort_plan(cfg))
    train = sheet[sheet.cohort == "train"]
    test = sheet[sheet.cohort == "test"]
    assert set(train.site).isdisjoint(test.site)           # test sites unseen in training
    assert train.subject.is_unique                           # distinct training subjects
    assert (test.groupby("subject").site.nunique() == cfg.test_sites).all()  # traveling subjects


def test_truth_volumes_equal_the_maps(tiny_cohort):
    out, cfg = tiny_cohort
    subjects = pd.read_csv(out / "truth/subjects.tsv", sep="\t")
    for row in subjects.itertuples():
        for tissue in ("gm", "wm", "csf"):
            img = nib.load(out / f"truth/subjects/{row.subject}_{tissue}.nii.gz")
            ml = img.get_fdata().sum() * np.prod(img.header.get_zooms()) / 1000
            assert abs(ml - getattr(row, f"{tissue}_ml")) < 1e-3 * ml
        total = row.gm_ml + row.wm_ml + row.csf_ml
        assert abs(row.gm_ratio - row.gm_ml / total) < 1e-5
        assert 1000 < total < 2000  # a plausible adult brain, in ml


def test_recorded_affine_maps_native_scan_onto_mni_truth(tiny_cohort):
    out, cfg = tiny_cohort
    scans = pd.read_csv(out / "truth/scans.tsv", sep="\t")
    for row in scans.itertuples():
        native = nib.load(out / f"truth/scans/{row.scan_id}_brainmask.nii.gz")
        truth = nib.load(out / f"truth/subjects/{row.subject}_mask.nii.gz")
        scan_to_mni = np.array(json.loads(row.scan_to_mni))
        # MNI truth voxel -> MNI mm -> scanner mm -> native voxel
        m = np.linalg.inv(native.affine) @ np.linalg.inv(scan_to_mni) @ truth.affine
        back = ndimage.affine_transform(native.get_fdata().astype(np.float32), m[:3, :3], m[:3, 3],
                                        output_shape=truth.shape, order=1) > 0.5
        assert dice(back, truth.get_fdata() > 0.5) >= 0.98, row.scan_id
        # the pose is a real rotation (the scan is not simply in MNI orientation)
        assert not np.allclose(scan_to_mni[:3, :3], np.eye(3), atol=1e-3)


def test_two_sites_of_one_subject_differ_in_contrast_but_share_anatomy(tiny_cohort):
    out, cfg = tiny_cohort
    scans = pd.read_csv(out / "truth/scans.tsv", sep="\t")
    test = scans[scans.cohort == "test"]
    a, b = test.scan_id.iloc[0], test.scan_id.iloc[1]
    subject = test.subject.iloc[0]
    ra = nib.load(out / f"truth/rendered/{a}.nii.gz").get_fdata()
    rb = nib.load(out / f"truth/rendered/{b}.nii.gz").get_fdata()
    gm = nib.load(out / f"truth/subjects/{subject}_gm.nii.gz").get_fdata() > 0.7
    wm = nib.load(out / f"truth/subjects/{subject}_wm.nii.gz").get_fdata() > 0.7
    ratio_a = ra[gm].mean() / ra[wm].mean()
    ratio_b = rb[gm].mean() / rb[wm].mean()
    assert abs(ratio_a - ratio_b) > 0.03                     # different GM/WM contrast
    sites = json.load(open(out / "truth/sites.json"))
    assert sites[test.site.iloc[0]]["contrast"] != sites[test.site.iloc[1]]["contrast"]
    brain = nib.load(out / f"truth/subjects/{subject}_mask.nii.gz").get_fdata() > 0.5
    # same anatomy: the two renderings are strongly correlated inside the brain
    r_same = np.corrcoef(ra[brain], rb[brain])[0, 1]
    assert r_same > 0.9


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    cfg = synth.SynthConfig(train_sites=1, train_subjects_per_site=1, test_sites=1, test_subjects=1,
                            seed=3, render_spacing=3.0, native_spacing=(3.0, 3.5))
    synth.generate(tmp_path / "a", cfg, progress=False)
    synth.generate(tmp_path / "b", cfg, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    other = synth.SynthConfig(**{**cfg.__dict__, "seed": 4})
    synth.generate(tmp_path / "c", other, progress=False)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def _sphere_phantom(spacing=1.0, n=80):
    """WM ball of radius 15 mm in a GM shell to 22 mm, CSF shell to 28 mm (the brain)."""
    c = (n - 1) / 2.0
    r = np.sqrt(sum(((g - c) * spacing) ** 2 for g in np.meshgrid(*[np.arange(n)] * 3, indexing="ij")))
    wm = (r <= 15).astype(np.float32)
    gm = ((r > 15) & (r <= 22)).astype(np.float32)
    csf = ((r > 22) & (r <= 28)).astype(np.float32)
    return gm, wm, csf, r <= 28


def _ball_radius(volume):
    return (3 * volume / (4 * np.pi)) ** (1 / 3)


def test_wm_shift_moves_the_boundary_by_the_requested_distance():
    gm, wm, csf, brain = _sphere_phantom()
    for shift in (2.0, -2.0):
        g2, w2, c2 = synth._reshape_tissues(gm, wm, csf, brain, 1.0, 0.0, shift)
        moved = _ball_radius(w2.sum()) - _ball_radius(wm.sum())  # how far the WM surface moved, mm
        assert abs(moved - shift) < 0.3, (shift, moved)
        np.testing.assert_allclose(g2 + w2 + c2, gm + wm + csf, atol=1e-6)  # tissue is moved, not made


def test_atrophy_turns_the_outer_cortex_into_csf():
    gm, wm, csf, brain = _sphere_phantom()
    g2, w2, c2 = synth._reshape_tissues(gm, wm, csf, brain, 1.0, 3.0, 0.0)
    outer = _ball_radius(gm.sum() + wm.sum())
    moved = outer - _ball_radius(g2.sum() + wm.sum())  # how far the GM/CSF surface moved inwards, mm
    assert abs(moved - 3.0) < 0.3, moved
    np.testing.assert_array_equal(w2, wm)
    # whole voxels change class: few voxels are left as a GM / CSF mixture
    assert ((g2 > 0.05) & (g2 < 0.95)).sum() < 0.25 * (gm > 0).sum()


def test_the_cli_renders_the_cohort_of_its_settings_file_with_options_on_top(tmp_path, monkeypatch, capsys):
    """The workflow's results/config/synth.yaml (settings_text of the config) gives synth the config's
    cohort.synthetic; an option overrides one key; a wrong key is one line naming the file."""
    import yaml

    from harmodiff.config import WorkflowConfig, settings_text
    from conftest import ROOT

    config = WorkflowConfig.from_dict(yaml.safe_load((ROOT / "config/test.yaml").read_text())).to_dict()
    settings = tmp_path / "synth.yaml"
    settings.write_text(settings_text(config, "synth"))
    made = []
    monkeypatch.setattr(synth, "generate", lambda out, cfg, progress: made.append(cfg) or pd.DataFrame())
    assert synth.main([str(tmp_path / "out"), "--config", str(settings), "--test-subjects", "5"]) == 0
    expected = {**config["cohort"]["synthetic"], "test_subjects": 5}
    assert {k: made[0].to_dict()[k] for k in expected} == expected
    assert made[0].warp_mm == synth.SynthConfig().warp_mm  # not a workflow setting: the module's default
    settings.write_text("cohort:\n  synthetic:\n    test_subjets: 2\n")
    capsys.readouterr()
    assert synth.main([str(tmp_path / "out"), "--config", str(settings)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {settings}: cohort.synthetic: unknown key 'test_subjets'") and "\n" not in err
