import nibabel as nib
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


def test_cli_reports_a_reference_without_its_mask(tmp_path, capsys):
    (tmp_path / "refs.tsv").write_text("image\tmask\nr1.nii.gz\tm1.nii.gz\nr2.nii.gz\t\n")
    with pytest.raises(SystemExit) as exit_info:
        histmatch.main(["reference", "--manifest", str(tmp_path / "refs.tsv"), "--output", str(tmp_path / "ref.npy")])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'refs.tsv'}: line 3: empty 'mask'" in capsys.readouterr().err
    assert not (tmp_path / "ref.npy").exists()


def test_cli_reference_then_match_equals_the_function(tmp_path, capsys):
    """The two-step CLI (pool once, match each scan) gives what the functions give in one go."""
    rng = np.random.default_rng(3)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = {}
    for name, scale in (("r1", 1.0), ("r2", 1.5), ("scan", 3.0)):
        data = rng.gamma(2.0, 100.0 * scale, (12, 12, 12)).astype(np.float32)
        mask = np.zeros(data.shape, bool)
        mask[2:10, 2:10, 2:10] = True
        nib.save(nib.Nifti1Image(data, aff), str(tmp_path / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), aff), str(tmp_path / f"{name}_mask.nii.gz"))
        paths[name] = (data, mask)
    ref = str(tmp_path / "ref.npy")
    (tmp_path / "refs.tsv").write_text("image\tmask\n" + "".join(
        f"{tmp_path / n}.nii.gz\t{tmp_path / n}_mask.nii.gz\n" for n in ("r1", "r2")))
    assert histmatch.main(["reference", "--manifest", str(tmp_path / "refs.tsv"), "--output", ref]) == 0
    out = str(tmp_path / "out.nii.gz")
    assert histmatch.main(["match", "--input", str(tmp_path / "scan.nii.gz"), "--mask",
                           str(tmp_path / "scan_mask.nii.gz"), "--reference", ref, "--output", out]) == 0
    expected = histmatch.histogram_match(*paths["scan"], histmatch.reference_distribution(
        [paths["r1"][0], paths["r2"][0]], [paths["r1"][1], paths["r2"][1]]))
    np.testing.assert_allclose(nib.load(out).get_fdata(), expected, rtol=1e-6)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    assert histmatch.main(["match", "--input", str(tmp_path / "scan.nii.gz"), "--mask",
                           str(tmp_path / "scan_mask.nii.gz"), "--reference", str(tmp_path / "bad.npy"),
                           "--output", out]) == 2
    assert "bad.npy: not a reference distribution" in capsys.readouterr().err
