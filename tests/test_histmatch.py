import numpy as np
import pytest
from scipy import stats

from harmodiff import histmatch
from harmodiff.io import InputError


def test_matched_brain_takes_the_reference_distribution_and_keeps_voxel_order():
    rng = np.random.default_rng(0)
    image = np.zeros((30, 30, 30), np.float32)
    mask = np.zeros_like(image, bool)
    mask[5:25, 5:25, 5:25] = True
    image[mask] = rng.normal(300, 40, mask.sum())
    refs = [rng.exponential(500, (20, 20, 20)).astype(np.float32) for _ in range(2)]
    ref_masks = [np.ones(r.shape, bool) for r in refs]
    reference = histmatch.reference_distribution(refs, ref_masks, n_quantiles=1024)
    out = histmatch.histogram_match(image, mask, reference)
    q = np.linspace(0.05, 0.95, 19)
    # the matched brain's quantiles are the exponential's, -500 ln(1 - q), up to sampling error
    np.testing.assert_allclose(np.quantile(out[mask], q), -500 * np.log(1 - q), rtol=0.06)
    assert stats.spearmanr(out[mask], image[mask]).statistic > 0.999  # a monotone map
    assert (out[~mask] == 0).all()


def test_each_reference_scan_weighs_the_same():
    small = np.full((4, 4, 4), 100.0, np.float32)
    large = np.full((40, 40, 40), 900.0, np.float32)
    ref = histmatch.reference_distribution([small, large], [np.ones(small.shape, bool), np.ones(large.shape, bool)],
                                           n_quantiles=64)
    assert len(ref) == 128 and (ref == 100).sum() == 64  # not 64 voxels against 64,000


def test_empty_inputs_are_clear_errors():
    with pytest.raises(InputError, match="no reference scans"):
        histmatch.reference_distribution([], [])
    with pytest.raises(InputError, match="mask is empty"):
        histmatch.histogram_match(np.ones((3, 3, 3)), np.zeros((3, 3, 3), bool), np.ones(5))


def test_cli_reports_unpaired_references(tmp_path, capsys):
    rc = histmatch.main(["--input", "a.nii.gz", "--mask", "m.nii.gz", "--reference-images", "r1.nii.gz",
                         "r2.nii.gz", "--reference-masks", "m1.nii.gz", "--output", str(tmp_path / "o.nii.gz")])
    assert rc == 2 and "must pair up" in capsys.readouterr().err
