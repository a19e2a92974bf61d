import numpy as np
import pandas as pd
import pytest

from harmodiff import evaluate, figures, layout, tables


def _pairs():
    rows = []
    rng = np.random.default_rng(0)
    for method in ("preprocessed", "diffusion", "cfg_2", "cfgpp_0.6", "cfg_0.5"):
        for subject in ("s1", "s2"):
            for a, b in (("A", "B"), ("A", "C"), ("B", "C")):
                rows.append({"method": method, "target": "none" if method == "preprocessed" else "T",
                             "subject": subject, "site_a": a, "site_b": b, "ssim": rng.uniform(0.7, 0.9),
                             "psnr": rng.uniform(20, 30)})
    return pd.DataFrame(rows)


def test_table1_sweep_rows_use_only_the_sweep_subjects():
    pairs = _pairs()
    t = tables.table1(pairs, ["cfg_2", "cfgpp_0.6", "cfg_0.5"], ["s1"])
    sweep = t[t.section == "guidance sweep"]
    assert list(sweep.method) == ["preprocessed", "cfg_0.5", "cfg_2", "cfgpp_0.6"]  # baseline, then by guidance, scale
    base = pairs[(pairs.method == "preprocessed") & (pairs.subject == "s1")]
    assert sweep.ssim_mean.iloc[0] == pytest.approx(base.ssim.mean())
    assert sweep.psnr_sd.iloc[0] == pytest.approx(base.psnr.std(ddof=1))
    assert (sweep.pairs == 3).all() and (sweep.subjects == 1).all()
    methods = t[t.section == "methods"]
    assert list(methods.method) == ["preprocessed", "diffusion"] and (methods.pairs == 6).all()
    md = tables.table1_markdown(t)
    assert "CFG++ lambda = 0.6" in md and "CFG w = 0.5" in md
    assert f"{sweep.ssim_mean.iloc[0]:.3f} ± {sweep.ssim_sd.iloc[0]:.3f}" in md


def test_sweep_method_names_round_trip():
    for guidance, scale in (("cfg", 2.0), ("cfgpp", 0.6), ("cfg", 0.5)):
        assert layout.parse_sweep_method(layout.sweep_method(guidance, scale)) == (guidance, scale)
    assert layout.sweep_method("cfgpp", 1.0) == "cfgpp_1"


def test_significance_stars_follow_the_thresholds():
    assert [figures.stars(p) for p in (0.0005, 0.005, 0.03, 0.05, 0.2)] == ["***", "**", "*", "", ""]


def test_truth_errors_against_hand_computation():
    ratios = pd.DataFrame({"method": "m", "target": "T", "scan_id": ["a", "b", "c"], "subject": ["s1", "s1", "s2"],
                           "site": ["X", "Y", "X"], "gm_ratio": [0.40, 0.44, 0.50], "wm_ratio": [0.35, 0.33, 0.30]})
    truth = pd.DataFrame({"subject": ["s1", "s2"], "gm_ratio": [0.42, 0.47], "wm_ratio": [0.34, 0.31],
                          "csf_ratio": [0.24, 0.22]})
    out = evaluate.truth_errors(ratios, truth).set_index("tissue")
    assert out.loc["GM", "mae"] == pytest.approx((0.02 + 0.02 + 0.03) / 3)
    assert out.loc["GM", "bias"] == pytest.approx((-0.02 + 0.02 + 0.03) / 3)
    assert out.loc["WM", "r"] == pytest.approx(np.corrcoef([0.35, 0.33, 0.30], [0.34, 0.34, 0.31])[0, 1])


def test_truth_errors_score_each_fractions_method_and_combat_under_its_label():
    from harmodiff import segment

    assert evaluate.FRACTIONS == segment.FRACTIONS
    base = {"method": "preprocessed", "target": "none", "scan_id": ["a", "b", "c"], "subject": ["s1", "s1", "s2"],
            "site": ["X", "Y", "X"], "fractions": "unmix", "gm_ratio": [0.40, 0.44, 0.50], "wm_ratio": [0.3] * 3,
            "unmix_gm_ratio": [0.40, 0.44, 0.50], "unmix_wm_ratio": [0.3] * 3,
            "posterior_gm_ratio": [0.45, 0.46, 0.47], "posterior_wm_ratio": [0.3] * 3}
    pre = pd.DataFrame(base)
    combat = pre.assign(method="combat", target="X", gm_ratio=[0.41, 0.43, 0.49],
                        unmix_gm_ratio=np.nan, posterior_gm_ratio=np.nan)
    truth = pd.DataFrame({"subject": ["s1", "s2"], "gm_ratio": [0.42, 0.47], "wm_ratio": [0.3, 0.3], "csf_ratio": [0.28, 0.23]})
    out = evaluate.truth_errors(pd.concat([pre, combat]), truth)
    gm = out[out.tissue == "GM"].set_index(["method", "fractions"])
    assert sorted(gm.index) == [("combat", "unmix"), ("preprocessed", "posterior"), ("preprocessed", "unmix")]
    assert gm.loc[("preprocessed", "posterior"), "bias"] == pytest.approx((0.03 + 0.04 + 0.0) / 3)
    assert gm.loc[("preprocessed", "unmix"), "mae"] == pytest.approx((0.02 + 0.02 + 0.03) / 3)
    assert gm.loc[("combat", "unmix"), "mae"] == pytest.approx((0.01 + 0.01 + 0.02) / 3)


def test_combat_rows_are_added_for_the_preprocessed_scans():
    rng = np.random.default_rng(1)
    rows = []
    for method in ("preprocessed", "diffusion"):
        for site, shift in (("X", 0.0), ("Y", 0.03), ("Z", -0.02)):
            for s in range(4):
                gm = 0.45 + 0.01 * s + shift + rng.normal(0, 0.001)
                rows.append({"method": method, "target": "none" if method == "preprocessed" else "T",
                             "scan_id": f"s{s}{site}", "subject": f"s{s}", "site": site, "gm_ml": 1.0,
                             "gm_ratio": gm, "wm_ratio": 0.8 - gm, "csf_ratio": 0.2 + rng.normal(0, 0.01)})
    df = evaluate.add_combat(pd.DataFrame(rows), "X")
    combat = df[df.method == "combat"]
    assert len(combat) == 12 and set(combat.target) == {"X"} and combat.gm_ml.isna().all()
    spread = combat.groupby("site").gm_ratio.mean()
    assert spread.max() - spread.min() < 0.005  # the site shifts (0.05 apart) are gone
    assert evaluate.add_combat(pd.DataFrame(rows), "KPM").query("method == 'combat'").target.iloc[0] == "pooled"


def test_table1_puts_seed_replicates_in_the_sweep_section():
    rows = [{"method": m, "target": "T", "subject": subj, "site_a": "A", "site_b": "B", "ssim": v, "psnr": 20.0}
            for m, subj, v in [("preprocessed", "s1", 0.5), ("diffusion", "s1", 0.8), ("diffusion", "s2", 0.6),
                               ("diffusion_seed1", "s1", 0.7), ("cfg_2", "s1", 0.9)]]
    t = tables.table1(pd.DataFrame(rows), ["cfg_2"], ["s1"])
    assert list(t[t.section == "guidance sweep"].method) == ["preprocessed", "cfg_2", "diffusion_seed1"]
    methods = t[t.section == "methods"].set_index("method")
    assert list(methods.index) == ["preprocessed", "diffusion"] and methods.loc["diffusion", "ssim_mean"] == 0.7


def test_truth_errors_against_the_segmented_truth_at_the_target():
    """Each scan's ratio vs its subject's truth-at-target ratio (same segmentation); scans of a
    target that was not rendered (the unharmonized 'none') use the first rendered target."""
    ratios = pd.DataFrame({"method": ["diffusion", "diffusion", "preprocessed"], "target": ["T", "T", "none"],
                           "scan_id": ["a", "b", "c"], "subject": ["s1", "s2", "s1"], "site": ["X", "X", "Y"],
                           "gm_ratio": [0.40, 0.50, 0.45], "wm_ratio": [0.35, 0.30, 0.33],
                           "posterior_gm_ratio": [0.40, 0.50, 0.45], "posterior_wm_ratio": [0.35, 0.30, 0.33]})
    truth = pd.DataFrame({"subject": ["s1", "s2"], "gm_ratio": [0.42, 0.47], "wm_ratio": [0.34, 0.31]})
    at_target = pd.DataFrame({"subject": ["s1", "s2"], "target": ["T", "T"], "posterior_gm_ratio": [0.41, 0.46],
                              "posterior_wm_ratio": [0.36, 0.32]})
    out = evaluate.truth_errors(ratios, truth, at_target).set_index(["method", "tissue"])
    assert out.loc[("diffusion", "GM"), "mae_vs_target"] == pytest.approx((0.01 + 0.04) / 2)
    assert out.loc[("diffusion", "WM"), "bias_vs_target"] == pytest.approx((-0.01 - 0.02) / 2)
    assert out.loc[("preprocessed", "GM"), "bias_vs_target"] == pytest.approx(0.04)
    assert out.loc[("diffusion", "GM"), "mae"] == pytest.approx((0.02 + 0.03) / 2)  # the old columns stay


def test_figure2_keeps_the_sites_in_the_order_given(tmp_path, monkeypatch):
    """evaluation.figure_sites [KUS, ATV] draws KUS first, and the difference as ATV - KUS (it used to sort)."""
    from harmodiff.io import save_image

    images, methods, sites = [], [], []
    for method in ("preprocessed", "diffusion:TRA"):
        for site, level in (("KUS", 300.0), ("ATV", 500.0)):
            path = save_image(np.full((6, 6, 4), level), np.eye(4), tmp_path / f"{method}_{site}.nii.gz")
            images.append(str(path))
            methods.append(method)
            sites.append(site)
    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, outputs: drawn.update(
        titles=[ax.get_title() for ax in fig.axes if ax.get_title()],
        difference=float(fig.axes[2].images[0].get_array().mean())))
    figures.figure2(pd.DataFrame({"image": images, "method": methods, "site": sites}), "sub-01", [tmp_path / "f.png"])
    assert drawn["titles"][:3] == ["preprocessed: KUS", "preprocessed: ATV", "ATV - KUS"]
    assert drawn["difference"] == 200.0


def test_questions_figure_draws_each_method_s_first_target_values(tmp_path):
    effects = pd.DataFrame({"method": ["truth", "truth", "preprocessed", "diffusion", "diffusion"],
                            "tissue": ["GM", "WM", "GM", "GM", "GM"], "estimate": [-0.02, 0.0, -0.01, -0.018, 0.5],
                            "ci_low": [np.nan, np.nan, -0.015, -0.025, 0.4], "ci_high": [np.nan, np.nan, -0.005, -0.01, 0.6],
                            "true_effect": -0.02})
    classifier = pd.DataFrame({"method": ["preprocessed", "diffusion"], "site_accuracy": [0.9, 0.4], "chance": 1 / 3})
    icc = pd.DataFrame({"method": ["preprocessed", "preprocessed", "diffusion", "diffusion"],
                        "tissue": ["GM", "WM", "GM", "WM"], "icc": [0.6, 0.5, 0.8, 0.9]})
    panels = figures.question_panels(effects, classifier, icc)
    assert list(panels["effect"].method) == ["preprocessed", "diffusion"]  # not the truth, the first target
    assert panels["effect"].estimate.tolist() == [-0.01, -0.018]
    assert panels["icc"].set_index("method").loc["diffusion", "WM"] == 0.9
    figures.questions_figure(effects, classifier, icc, [tmp_path / "q.png"])
    from PIL import Image

    assert Image.open(tmp_path / "q.png").size[0] > 800
