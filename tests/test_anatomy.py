import numpy as np
import pytest
from scipy import ndimage

from harmodiff import anatomy as an


def _box_mask(shape, margin=3):
    m = np.zeros(shape, bool)
    m[margin:-margin, margin:-margin, margin:-margin] = True
    return m


@pytest.mark.parametrize("sigma,radius", [(0.1, 1), (0.33, 1), (0.34, 2), (1.0, 3), (1.5, 5), (2.0, 6)])
def test_kernel_radius_rule(sigma, radius):
    assert an.kernel_radius(sigma) == radius


def test_gaussian_uses_truncated_kernel_of_that_radius():
    # the response to a unit impulse is the kernel itself: its support is (2r + 1)^3
    x = np.zeros((21, 21, 21), np.float32)
    x[10, 10, 10] = 1
    for sigma in (0.5, 1.0, 1.7):
        r = an.kernel_radius(sigma)
        k = an.gaussian(x, sigma)
        support = np.argwhere(k > 0)
        assert support.min() == 10 - r and support.max() == 10 + r
        one_d = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        one_d /= one_d.sum()
        np.testing.assert_allclose(k[10, 10, 10 - r:10 + r + 1], one_d * one_d[r] ** 2, rtol=1e-5)


def test_gamma_perturb_zero_is_scaling_to_unit_interval():
    rng = np.random.default_rng(0)
    img = rng.uniform(100, 900, (12, 12, 12)).astype(np.float32)
    mask = _box_mask(img.shape, 2)
    out = an.gamma_perturb(img, mask, 0.0)
    lo, hi = img[mask].min(), img[mask].max()
    np.testing.assert_allclose(out[mask], (img[mask] - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    assert out[~mask].max() == 0
    assert out[mask].min() == 0 and out[mask].max() == pytest.approx(1.0)


def test_gamma_perturb_is_power_of_exp_log_gamma():
    img = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)
    mask = np.ones(img.shape, bool)
    for g in (-0.5, 0.3):
        np.testing.assert_allclose(an.gamma_perturb(img, mask, g), img ** np.exp(g), rtol=1e-5, atol=1e-6)


def test_gradient_of_linear_ramp_is_constant():
    x = np.arange(16, dtype=np.float32)[:, None, None] * 0.3 + np.arange(16)[None, :, None] * 0.4
    x = np.broadcast_to(x, (16, 16, 16)).copy()
    g = an.gradient_magnitude(x)
    np.testing.assert_allclose(g, 0.5, rtol=1e-5)  # |(0.3, 0.4, 0)| = 0.5, also at the borders


def test_high_frequency_of_constant_is_zero_and_of_ramp_interior_is_zero():
    c = np.full((12, 12, 12), 3.7, np.float32)
    assert np.abs(an.high_frequency(c, 1.0)).max() < 1e-5
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32)[:, None, None], (20, 20, 20)).copy()
    # a symmetric kernel leaves a linear function unchanged away from the borders
    assert np.abs(an.high_frequency(ramp, 1.0)[4:-4]).max() < 1e-4


def test_raw_anatomy_is_weighted_sum():
    rng = np.random.default_rng(1)
    x = ndimage.gaussian_filter(rng.normal(size=(16, 16, 16)), 1.5).astype(np.float32)
    for alpha in (0.0, 0.3, 1.0):
        expected = alpha * an.gradient_magnitude(x) + (1 - alpha) * an.high_frequency(x, 1.0)
        np.testing.assert_allclose(an.raw_anatomy(x, alpha=alpha, sigma=1.0), expected, rtol=1e-5, atol=1e-7)
    multi = an.raw_anatomy(x, terms=[("grad", 1.0, 0.5), ("grad", 2.0, 0.3), ("hf", 1.0, 0.2)])
    expected = (0.5 * an.gradient_magnitude(an.gaussian(x, 1.0)) + 0.3 * an.gradient_magnitude(an.gaussian(x, 2.0))
                + 0.2 * an.high_frequency(x, 1.0))
    np.testing.assert_allclose(multi, expected, rtol=1e-5, atol=1e-7)


def test_quantiles_land_on_minus_one_and_one():
    rng = np.random.default_rng(2)
    v = rng.gamma(2.0, size=(20, 20, 20)).astype(np.float32)
    mask = _box_mask(v.shape, 2)
    out = an.quantile_normalize(v, mask)
    lo, hi = np.percentile(v[mask], [0.5, 99.5])
    inside = mask & (v > lo) & (v < hi)
    np.testing.assert_allclose(out[inside], 2 * (v[inside] - lo) / (hi - lo) - 1, rtol=1e-4, atol=1e-5)
    assert out[mask].min() == -1 and out[mask].max() == 1
    assert (out[~mask] == -1).all()
    # 0.5 % of the brain is clipped at each end
    assert abs((out[mask] == 1).mean() - 0.005) < 0.002


def test_anatomy_map_invariant_to_global_affine_intensity_change():
    rng = np.random.default_rng(3)
    img = ndimage.gaussian_filter(rng.uniform(0, 1, (24, 24, 24)), 1).astype(np.float32)
    mask = _box_mask(img.shape, 3)
    a1 = an.anatomy_map(img * 100 + 5, mask)
    a2 = an.anatomy_map(img * 7 + 300, mask)
    np.testing.assert_allclose(a1, a2, atol=3e-4)  # float32 rounding, stretched by the interior's narrower range


def test_coarse_map_local_and_global():
    rng = np.random.default_rng(4)
    a = rng.uniform(-1, 1, (16, 20, 16)).astype(np.float32)
    local = an.coarse_map(a, 2, "local")
    assert local.shape == a.shape
    # downsampling by 2 with trilinear (align_corners=False) averages 2x2x2 blocks; a volume that
    # is constant within each block is reproduced in the block centres' neighbourhood
    blocks = np.kron(rng.uniform(-1, 1, (8, 10, 8)), np.ones((2, 2, 2))).astype(np.float32)
    small = an._trilinear(blocks, (8, 10, 8))
    np.testing.assert_allclose(small, blocks[::2, ::2, ::2], atol=1e-6)
    assert local.std() < a.std()  # it is a low-pass copy
    glob = an.coarse_map(a, 2, "global", patch_shape=(8, 10, 8))
    assert glob.shape == (8, 10, 8)
    np.testing.assert_allclose(an.coarse_patch(glob, (3, 3, 3), (8, 10, 8), "global"), glob)
    np.testing.assert_allclose(an.coarse_patch(local, (2, 4, 6), (8, 10, 8), "local"), local[2:10, 4:14, 6:14])


def test_normalizing_percentiles_leave_out_the_brain_rim():
    """With erosion e the -1/1 percentiles are those of the mask eroded e times: a bright rim
    (the brain-to-background step of a skull-stripped scan) no longer sets the scale."""
    rng = np.random.default_rng(4)
    v = rng.gamma(2.0, size=(24, 24, 24)).astype(np.float32)
    mask = _box_mask(v.shape, 2)
    inner = ndimage.binary_erosion(mask, iterations=2)
    rimmed = np.where(mask & ~inner, 50.0, v).astype(np.float32)  # the rim is 10x the interior
    out = an.quantile_normalize(rimmed, mask, erosion=2)
    lo, hi = np.percentile(v[inner], [0.5, 99.5])
    sel = inner & (v > lo) & (v < hi)
    np.testing.assert_allclose(out[sel], 2 * (v[sel] - lo) / (hi - lo) - 1, rtol=1e-4, atol=1e-5)
    assert (out[mask & ~inner] == 1).all() and (out[~mask] == -1).all()
    # without the erosion the rim sets the top of the scale and the interior collapses towards -1
    assert an.quantile_normalize(rimmed, mask)[inner].mean() < out[inner].mean() - 0.4
    # an erosion that leaves nothing falls back to the whole brain
    np.testing.assert_array_equal(an.quantile_normalize(v, mask, erosion=50), an.quantile_normalize(v, mask))
