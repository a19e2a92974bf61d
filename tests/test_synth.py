import hashlib
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
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
    # each subject's age and the one site a pooled study has it from: a training subject's own, a test site
    sheet = pd.read_csv(out / "scans.tsv", sep="\t")
    own = sheet.groupby("subject").site.agg(set)
    for row in subjects.itertuples():
        assert row.atrophy_mm == pytest.approx(synth.subject_params(cfg, subjects.index.get_loc(row.Index))["atrophy_mm"],
                                               abs=1e-6)
        assert row.study_site in own[row.subject] and cfg.age_years[0] <= row.age <= cfg.age_years[1]
        assert row.cohort == ("test" if len(own[row.subject]) > 1 else "train")


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


def test_a_new_site_adds_its_target_only_scans_and_truth_and_changes_nothing_else(tmp_path):
    cfg = synth.SynthConfig(train_sites=1, train_subjects_per_site=1, test_sites=1, test_subjects=1,
                            seed=3, render_spacing=3.0, native_spacing=(3.0, 3.5))
    grown = synth.SynthConfig(**{**cfg.__dict__, "new_sites": 1, "new_site_subjects": 2})
    synth.generate(tmp_path / "a", cfg, progress=False)
    synth.generate(tmp_path / "b", grown, progress=False)
    plan = synth.cohort_plan(grown)
    assert list(plan.loc[plan["cohort"] == "target", "scan_id"]) == ["sub-ns001_ses-NSA", "sub-ns002_ses-NSA"]
    pd.testing.assert_frame_equal(plan.iloc[:2], synth.cohort_plan(cfg))
    # every image of the cohort without the new site is byte for byte in the one with it
    for f in (tmp_path / "a").rglob("*.nii.gz"):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes(), f
    subjects = pd.read_csv(tmp_path / "b/truth/subjects.tsv", sep="\t").set_index("subject")
    assert subjects.loc["sub-ns002", "cohort"] == "target" and subjects.loc["sub-ns002", "study_site"] == "NSA"
    # the traveling subject's truth at the new site: its anatomy at the new site's contrast
    at_new = nib.load(tmp_path / "b/truth/at_site/NSA/sub-ts01.nii.gz").get_fdata()
    at_train = nib.load(tmp_path / "b/truth/at_site/TRA/sub-ts01.nii.gz").get_fdata()
    sites = json.loads((tmp_path / "b/truth/sites.json").read_text())
    assert sites["NSA"]["contrast"] != sites["TRA"]["contrast"] and not np.allclose(at_new, at_train)
    np.testing.assert_array_equal(at_new > 0, at_train > 0)


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


def test_the_ventricles_are_the_deep_csf_in_the_box_and_grow_by_the_requested_distance():
    """A brain ball (radius 60 mm) centred on MNI (0, -8, 12): a CSF ball of radius 8 mm at the centre (the
    ventricles), a deep CSF ball outside the box (x = 32 mm, 22 mm deep) and a CSF shell at the edge; the rest is WM."""
    n, spacing = 64, 2.0
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = np.array([0.0, -8.0, 12.0]) - spacing * (n - 1) / 2
    mm = [affine[k, 3] + spacing * g for k, g in enumerate(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"))]
    r_centre = np.sqrt(mm[0] ** 2 + (mm[1] + 8) ** 2 + (mm[2] - 12) ** 2)
    brain = r_centre <= 60
    ventricle = r_centre <= 8
    cleft = np.sqrt((mm[0] - 32) ** 2 + (mm[1] + 8) ** 2 + (mm[2] - 12) ** 2) <= 6
    csf = (ventricle | cleft | (brain & (r_centre > 56))).astype(np.float32)
    wm = (brain & (csf == 0)).astype(np.float32)
    gm = np.zeros_like(wm)
    found = synth.lateral_ventricles(csf, brain, affine, spacing)
    np.testing.assert_array_equal(found, ventricle)
    g2, w2, c2 = synth._grow_ventricles(gm, wm, csf, found, spacing, 4.0)
    grown = _ball_radius((c2 * (r_centre < 30)).sum() * spacing ** 3) - _ball_radius(ventricle.sum() * spacing ** 3)
    assert abs(grown - 4.0) < 0.5, grown
    np.testing.assert_allclose(g2 + w2 + c2, gm + wm + csf, atol=1e-6)  # tissue becomes CSF, none is made
    np.testing.assert_array_equal(c2[cleft], csf[cleft])                  # the cleft is not a ventricle
    with pytest.raises(ValueError, match="no lateral ventricles"):
        synth.lateral_ventricles(csf * ~ventricle * ~cleft, brain, affine, spacing)


def test_the_ventricles_grow_linearly_with_age_and_not_at_all_by_default():
    cfg = synth.SynthConfig(ventricle_growth_mm=(0.0, 3.0))
    params = [synth.subject_params(cfg, i) for i in range(8)]
    ages = np.array([p["age"] for p in params])
    growth = np.array([p["ventricle_growth_mm"] for p in params])
    np.testing.assert_allclose(growth, 3.0 * (ages - 20.0) / 60.0, atol=1e-9)
    default = [synth.subject_params(synth.SynthConfig(), i) for i in range(8)]
    assert all(p["ventricle_growth_mm"] == 0 for p in default)
    for p, q in zip(params, default):  # the growth takes no draw: every other parameter is the same
        assert {k: v for k, v in p.items() if k != "ventricle_growth_mm"} == \
            {k: v for k, v in q.items() if k != "ventricle_growth_mm"}


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


def test_the_signal_equations_give_the_hand_computed_values():
    seq = {"family": "mprage", "ti_ms": 900.0, "tr_ms": 2300.0, "inversion_efficiency": 0.95}
    # 0.7 |1 - 1.95 e^-0.9 + 0.95 e^-2.3| = 0.7 |1 - 0.79281084 + 0.09524590|
    assert abs(float(synth.sequence_signal(1000.0, 0.7, seq)) - 0.21170454) < 1e-6
    # an echo time decays it by e^(-TE/T2*): e^(-4/50) = 0.92311635
    assert abs(float(synth.sequence_signal(1000.0, 0.7, {**seq, "te_ms": 4.0}, 50.0)) - 0.21170454 * 0.92311635) < 1e-6
    # a perfect inversion with full recovery nulls a tissue at TI = T1 ln 2
    null = {"family": "mprage", "ti_ms": 1000.0 * np.log(2), "tr_ms": 1e9, "inversion_efficiency": 1.0}
    assert abs(float(synth.sequence_signal(1000.0, 1.0, null))) < 1e-6
    # 0.7 sin 25 (1 - e^-0.02) / (1 - cos 25 e^-0.02) = 0.7 * 0.42261826 * 0.01980133 / 0.11163852
    spgr = {"family": "spgr", "tr_ms": 20.0, "flip_deg": 25.0}
    assert abs(float(synth.sequence_signal(1000.0, 0.7, spgr)) - 0.0524724) < 1e-6
    # relaxation times between the fields: a power law through RELAXATION's 1.5 T and 3 T values
    lo, hi = synth.RELAXATION["wm"]["t1"]
    assert synth.nominal("wm", "t1", 1.5) == lo and abs(synth.nominal("wm", "t1", 3.0) - hi) < 1e-9
    assert abs(synth.nominal("wm", "t1", 1.5 * np.sqrt(2)) - np.sqrt(lo * hi)) < 1e-6


def test_the_best_monotone_map_undoes_a_monotone_change_and_nothing_more():
    from harmodiff.metrics import best_monotone_map

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (20, 20, 20))
    mask = np.ones(x.shape, bool)
    np.testing.assert_allclose(best_monotone_map(x, np.exp(3 * x), mask), np.exp(3 * x), rtol=1e-6)
    y = x + rng.normal(0, 0.1, x.shape)  # what no curve of x can know: about the noise's sd is left
    assert 0.08 < np.sqrt(np.mean((best_monotone_map(x, y, mask) - y) ** 2)) < 0.1


def _brains_at_four_sites(site_model: str, seed: int = 3):
    """One subject's noise-free brain at four sites (median-500 units), its brain mask and deep GM."""
    from harmodiff.intensity import median_normalize

    cfg = synth.SynthConfig(train_sites=4, test_sites=1, seed=seed, render_spacing=2.0, site_model=site_model)
    subject = synth.render_subject(cfg, 0)
    brain = subject["brain_mask"]
    images = [median_normalize(synth.render_site_mni(subject, site, cfg.render_spacing) * brain, brain)
              for site in list(synth.all_site_params(cfg).values())[:4]]
    return images, brain, (subject["gm"] > 0.5) & (subject["deep_gm"] > 0.9)


def test_tissue_sites_differ_by_more_than_one_intensity_curve():
    """The best monotone map from one site's noise-free brain to another's (fit on the truth itself)
    leaves deep gray matter off by a clear error with the tissue model where two sites' sequences
    differ (measured, seed 3: up to 30 in brain-median-500 units, 1.5 between two 1.5 T SPGRs) and
    by little with the contrast model, whose sites are one curve apart (at most 7: their blur)."""
    from harmodiff.metrics import best_monotone_map

    error = {}
    for model in ("contrast", "tissue"):
        images, brain, deep = _brains_at_four_sites(model)
        error[model] = [float(np.abs(best_monotone_map(a, b, brain) - b)[deep].mean())
                        for i, a in enumerate(images) for b in images[:i] + images[i + 1:]]
    assert max(error["contrast"]) < 10, error
    assert max(error["tissue"]) > 20 and max(error["tissue"]) > 3 * max(error["contrast"]), error


def test_tissue_properties_vary_inside_a_class_and_stay_the_subjects():
    cfg = synth.SynthConfig(train_sites=1, test_sites=1, render_spacing=3.0, site_model="tissue")
    subject = synth.render_subject(cfg, 0)
    props = synth.tissue_properties(subject, 3.0)
    gm_t1, wm_t1 = props["gm"]["t1"], props["wm"]["t1"]
    gm = subject["gm"] > 0.5
    deep, cortex = gm & (subject["deep_gm"] > 0.9), gm & (subject["deep_gm"] == 0)
    assert deep.sum() > 20 and np.median(gm_t1[deep]) < 0.9 * np.median(gm_t1[cortex])
    assert np.median(props["gm"]["t2s"][deep]) < 0.7 * np.median(props["gm"]["t2s"][cortex])  # iron
    wm = subject["wm"] > 0.5
    y = np.broadcast_to(np.arange(wm.shape[1])[None, :, None], wm.shape)
    front, back = wm & (y > np.median(y[wm])), wm & (y <= np.median(y[wm]))
    assert np.median(wm_t1[front]) > np.median(wm_t1[back])
    again = synth.tissue_properties(synth.render_subject(cfg, 0), 3.0)  # the subject's, the same each time
    np.testing.assert_array_equal(again["gm"]["t1"], gm_t1)
    assert np.all(synth.tissue_properties(subject, 1.5)["wm"]["t1"] < wm_t1)  # shorter T1 at the lower field
