import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from harmodiff import metrics, tables


def _pair(shape=(24, 28, 20), seed=0):
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(500, 150, shape), 1.5).astype(np.float32)
    b = (a + rng.normal(0, 30, shape)).astype(np.float32)
    return a, b


def test_ssim_equals_scikit_image_and_psnr_the_formula():
    a, b = _pair()
    full = np.ones(a.shape, bool)
    ssim, psnr = metrics.ssim_psnr(a, b, full, full)
    assert ssim == pytest.approx(structural_similarity(a.astype(float), b.astype(float), data_range=1000.0), abs=1e-12)
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert psnr == pytest.approx(10 * np.log10(1000.0 ** 2 / mse), abs=1e-9)


def test_empty_field_of_view_does_not_change_the_score():
    a, b = _pair()
    mask = np.ones(a.shape, bool)
    pad = [(10, 10)] * 3
    pa, pb, pm = np.pad(a, pad), np.pad(b, pad), np.pad(mask, pad)
    assert metrics.ssim_psnr(pa, pb, pm, pm) == pytest.approx(metrics.ssim_psnr(a, b, mask, mask))
    # whereas SSIM over the padded volume is inflated by the matching zeros
    assert structural_similarity(pa.astype(float), pb.astype(float), data_range=1000.0) > \
        metrics.ssim_psnr(a, b, mask, mask)[0] + 0.05


def test_pairs_cover_every_two_sites_and_summary_is_mean_and_sd():
    a, b = _pair(seed=1)
    c = a + 50
    arrays = {"a": a, "b": b, "c": c, "m": np.ones(a.shape, np.float32)}
    entries = pd.DataFrame({"method": "x", "target": "T", "subject": "s1", "site": ["S1", "S2", "S3"],
                            "image": ["a", "b", "c"], "mask": "m"})
    pairs = metrics.pairwise_similarity(entries, loader=arrays.__getitem__)
    assert list(zip(pairs.site_a, pairs.site_b)) == [("S1", "S2"), ("S1", "S3"), ("S2", "S3")]
    full = np.ones(a.shape, bool)
    assert pairs.ssim.iloc[1] == pytest.approx(metrics.ssim_psnr(a, c, full, full)[0])
    summary = metrics.summarize(pairs)
    assert summary.ssim_mean.iloc[0] == pytest.approx(pairs.ssim.mean())
    assert summary.psnr_sd.iloc[0] == pytest.approx(np.std(pairs.psnr, ddof=1))
    assert summary.pairs.iloc[0] == 3 and summary.subjects.iloc[0] == 1


def test_truth_on_grid_resamples_by_world_coordinates(tmp_path):
    data = np.zeros((20, 20, 20), np.float32)
    data[8:12, 8:12, 8:12] = 1.0
    truth_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, truth_affine), str(tmp_path / "t.nii.gz"))
    like = nib.Nifti1Image(np.zeros((40, 40, 40), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    out = metrics.truth_on_grid(tmp_path / "t.nii.gz", like)
    # the 4-voxel cube at 2 mm (world 16..22 mm) covers 1 mm voxels 16..22
    assert out[19, 19, 19] == pytest.approx(1.0) and out[10, 10, 10] == 0.0
    assert out.sum() == pytest.approx(data.sum() * 8, rel=0.01)


def test_truth_summary_means_and_the_spread_over_seeds():
    rows = []
    for i, (s, m) in enumerate([(0.9, 10.0), (0.8, 20.0), (0.7, 30.0)]):
        rows.append({"method": "diffusion", "target": "T", "scan_id": f"s{i}", "ssim": s, "psnr": 20 + i, "mae": m})
    # scan s0 harmonized again under two other seeds: ssim 0.9, 0.8, 1.0 -> sd 0.1; mae 10, 14, 18 -> sd 4
    rows += [{"method": "diffusion_seed1", "target": "T", "scan_id": "s0", "ssim": 0.8, "psnr": 0, "mae": 14.0},
             {"method": "diffusion_seed2", "target": "T", "scan_id": "s0", "ssim": 1.0, "psnr": 0, "mae": 18.0},
             {"method": "preprocessed", "target": "T", "scan_id": "s0", "ssim": 0.5, "psnr": 15, "mae": 50.0}]
    detail = [0.9, 0.8, 0.7, 0.0, 0.0, 0.6]  # gradient_r: diffusion's three scans mean 0.8
    rows = [{**r, "gradient_r": g, "detail_ratio": 2 * g} for r, g in zip(rows, detail)]
    out = tables.truth_summary(pd.DataFrame(rows)).set_index("method")
    assert list(out.index) == ["diffusion", "preprocessed"]  # replicates fold into their method's row
    assert out.loc["diffusion", "gradient_r_mean"] == pytest.approx(0.8)
    assert out.loc["diffusion", "detail_ratio_mean"] == pytest.approx(1.6)
    d = out.loc["diffusion"]
    assert d.scans == 3 and d.ssim_mean == pytest.approx(0.8) and d.mae_mean == pytest.approx(20.0)
    assert d.ssim_sd == pytest.approx(0.1) and d.psnr_mean == pytest.approx(21.0)
    assert d.seeds == 3 and d.seed_scans == 1
    assert d.ssim_seed_sd == pytest.approx(0.1) and d.mae_seed_sd == pytest.approx(4.0)
    assert np.isnan(out.loc["preprocessed", "ssim_seed_sd"])


def test_truth_scores_mae_inside_the_true_brain():
    truth = np.zeros((12, 12, 12), np.float32)
    truth[2:10, 2:10, 2:10] = 500
    tm = truth > 0
    image = truth + 10 * tm
    image[2, 2, 2] = 0  # one brain voxel missed by the image's own mask
    mask = tm.copy()
    mask[2, 2, 2] = False
    scores = metrics.truth_scores(image, mask, truth, tm)
    assert scores["mae"] == pytest.approx((10 * (tm.sum() - 1) + 500) / tm.sum())
    same = metrics.truth_scores(truth, tm, truth, tm)
    assert {k: same[k] for k in ("ssim", "psnr", "mae")} == {"ssim": pytest.approx(1.0), "psnr": np.inf, "mae": 0.0}


def test_detail_scores_tell_blur_and_noise_from_the_truth():
    """The truth itself: r 1, ratio 1; a blurred copy: ratio well below 1; a noisy copy: ratio above 1;
    both lower the gradient correlation."""
    rng = np.random.default_rng(0)
    truth = ndimage.gaussian_filter(rng.normal(500, 100, (32, 32, 32)), 1.0)
    region = np.zeros(truth.shape, bool)
    region[4:-4, 4:-4, 4:-4] = True
    same = metrics.detail_scores(truth, truth, region)
    assert same["gradient_r"] == pytest.approx(1.0) and same["detail_ratio"] == pytest.approx(1.0)
    blurred = metrics.detail_scores(ndimage.gaussian_filter(truth, 1.5), truth, region)
    noisy = metrics.detail_scores(truth + rng.normal(0, 20, truth.shape), truth, region)
    assert blurred["detail_ratio"] < 0.6 and noisy["detail_ratio"] > 1.2
    assert blurred["gradient_r"] < 0.95 and noisy["gradient_r"] < 0.95
    # a contrast change alone (twice the image) moves neither
    scaled = metrics.detail_scores(2 * truth + 100, truth, region)
    assert scaled["detail_ratio"] == pytest.approx(1.0) and scaled["gradient_r"] == pytest.approx(1.0)
