import numpy as np
import pytest

from harmodiff import patches as P


def test_paper_grid_has_three_positions_per_axis():
    pos = P.grid_positions((160, 192, 160), (80, 96, 80), 0.5)
    assert len(pos) == 27
    assert sorted({p[0] for p in pos}) == [0, 40, 80]
    assert sorted({p[1] for p in pos}) == [0, 48, 96]


@pytest.mark.parametrize("vol,patch,overlap", [
    ((80, 96, 80), (40, 48, 40), 0.5), ((37, 50, 23), (16, 20, 10), 0.5),
    ((61, 61, 61), (20, 32, 17), 0.6), ((20, 20, 20), (20, 7, 9), 0.25),
])
def test_grid_covers_every_voxel_with_required_overlap(vol, patch, overlap):
    pos = P.grid_positions(vol, patch, overlap)
    cover = np.zeros(vol, int)
    for c in pos:
        cover[tuple(slice(a, a + p) for a, p in zip(c, patch))] += 1
    assert cover.min() >= 1
    for axis in range(3):
        starts = sorted({c[axis] for c in pos})
        assert starts[0] == 0 and starts[-1] + patch[axis] == vol[axis]
        for a, b in zip(starts, starts[1:]):
            assert (patch[axis] - (b - a)) >= overlap * patch[axis] - 1e-9


def test_hann_window_separable_symmetric_positive():
    w = P.hann_window((8, 10, 6), floor=1e-3)
    wx, wy, wz = (P.hann_1d(n, 1e-3) for n in (8, 10, 6))
    np.testing.assert_allclose(w, np.einsum("i,j,k->ijk", wx, wy, wz), rtol=1e-6)
    for axis in range(3):
        np.testing.assert_allclose(w, np.flip(w, axis=axis), rtol=1e-6)
    assert w.min() > 0
    # the formula: floor + (1 - floor) sin^2(pi (i + 1/2) / n)
    i = np.arange(8)
    np.testing.assert_allclose(wx, 1e-3 + (1 - 1e-3) * np.sin(np.pi * (i + 0.5) / 8) ** 2)


@pytest.mark.parametrize("vol,patch", [((32, 40, 24), (16, 20, 12)), ((33, 41, 25), (16, 20, 12)),
                                       ((19, 23, 29), (8, 9, 10))])
def test_fuse_reconstructs_volume(vol, patch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=vol).astype(np.float32)
    pos = P.grid_positions(vol, patch, 0.5)
    patches = [P.extract(x, c, patch) for c in pos]
    y = P.fuse(patches, pos, vol, P.hann_window(patch))
    np.testing.assert_allclose(y, x, atol=1e-6)


def test_fuse_is_the_weighted_average():
    vol, patch = (6, 4, 4), (4, 4, 4)
    pos = [(0, 0, 0), (2, 0, 0)]
    w = P.hann_window(patch)
    a, b = np.full(patch, 1.0), np.full(patch, 3.0)
    y = P.fuse([a, b], pos, vol, w)
    # voxel (3,1,2) is covered by both: patch-local (3,1,2) and (1,1,2)
    wa, wb = w[3, 1, 2], w[1, 1, 2]
    assert y[3, 1, 2] == pytest.approx((wa * 1 + wb * 3) / (wa + wb), rel=1e-6)
    assert y[0, 1, 2] == pytest.approx(1.0) and y[5, 1, 2] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="covered by no patch"):
        P.fuse([a], [(0, 0, 0)], vol, w)


def test_random_patch_stays_inside_and_overlaps_bbox_uniformly():
    rng = np.random.default_rng(0)
    vol, patch = (40, 48, 40), (20, 24, 20)
    bbox = (np.array([25, 5, 10]), np.array([35, 20, 30]))
    corners = np.array([P.random_patch(vol, patch, bbox, rng) for _ in range(4000)])
    assert (corners >= 0).all() and (corners + patch <= vol).all()
    assert ((corners <= bbox[1]) & (corners + np.array(patch) - 1 >= bbox[0])).all()
    # x: allowed corners 6..20 (15 values), each about 1/15 of the draws
    counts = np.bincount(corners[:, 0], minlength=21)[6:21]
    assert counts.min() > 0 and counts.max() / counts.min() < 1.6
    assert corners[:, 0].min() == 6 and corners[:, 0].max() == 20


def test_patch_larger_than_volume_is_an_error():
    with pytest.raises(ValueError, match="larger than the volume"):
        P.grid_positions((10, 10, 10), (12, 4, 4))
