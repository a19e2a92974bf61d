import shutil
from dataclasses import replace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from harmodiff import harmonize as hz
from harmodiff.config import HarmonizeConfig
from harmodiff.io import InputError
from harmodiff.model import ModelRecord, SiteLabels, build_model
from harmodiff.patches import grid_positions, seam_ratio
from test_train import TINY, phantom

PATCH = (16, 16, 16)


def _model(seed=0, num_labels=3):
    torch.manual_seed(seed)
    model = build_model(TINY, num_labels)
    out_conv = [m for m in model.unet.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    torch.nn.init.normal_(out_conv.weight, std=0.05)  # MONAI zero-inits it: make eps non-trivial
    return model.eval()


CONFIG = {"patch_shape": list(PATCH), "train": {"num_train_timesteps": 1000}, "anatomy": {}}
# from the noised source at 40 % of the schedule: an untrained model keeps values finite there
FROM_SOURCE = HarmonizeConfig(steps=5, batch_size=36, seed=1, guidance="cfgpp", scale=0.6, start_from="source",
                              strength=0.4)


@pytest.fixture(scope="module")
def scan():
    v = phantom("A", 0, shape=(32, 40, 32))
    return v.image, v.mask


def test_same_seed_same_bytes_and_seed_matters(scan):
    image, mask = scan
    labels = SiteLabels(["A", "B"], [0.0])
    # from the noised source at 40 % of the schedule: an untrained model keeps values finite there
    settings = HarmonizeConfig(steps=5, batch_size=5, guidance="cfgpp", scale=0.6, start_from="source", strength=0.4)
    a, stats = hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image, mask, "B", settings, seed=1)
    b, _ = hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image, mask, "B", settings, seed=1)
    c, _ = hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image, mask, "B", settings, seed=2)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, c)
    n = len(grid_positions(image.shape, PATCH, 0.5))
    assert stats["patches"] == n == 36 and stats["unet_passes"] == n * 2 * 2
    assert (a[~mask] == 0).all() and a.min() >= 0


def test_batch_size_does_not_change_the_result(scan):
    image, mask = scan
    labels = SiteLabels(["A", "B"], [0.0])
    settings = HarmonizeConfig(steps=5, seed=3, start_from="source", strength=0.4)
    a, _ = hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image, mask, "A", replace(settings, batch_size=1))
    b, _ = hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image, mask, "A", replace(settings, batch_size=36))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-2)


def test_no_seams_across_patch_borders(scan):
    image, _ = scan
    mask = np.ones(image.shape, bool)
    labels = SiteLabels(["A", "B"], [0.0])
    out, _ = hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image, mask, "B",
                                HarmonizeConfig(steps=5, batch_size=36, seed=0, start_from="source", strength=0.4))
    positions = grid_positions(image.shape, PATCH, 0.5)
    ratio = seam_ratio(out, positions, PATCH)
    assert ratio < 1.15, ratio
    # the measurement does see seams: a volume made of independent constant-per-patch tiles has them
    tiles = np.zeros(image.shape)
    for c in grid_positions(image.shape, PATCH, 0.0):
        tiles[tuple(slice(a, a + p) for a, p in zip(c, PATCH))] = (c[0] // 16 + c[2] // 16) % 2  # checkerboard
    tiled = out + tiles * 3 * np.abs(np.diff(out, axis=0)).mean()
    assert seam_ratio(tiled, grid_positions(image.shape, PATCH, 0.0), PATCH) > 1.5


def test_unknown_target_site_lists_known_ones(scan):
    image, mask = scan
    labels = SiteLabels(["A", "B"], [0.0])
    with pytest.raises(InputError, match="unknown site 'Z'; known sites: A, B"):
        hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image, mask, "Z", HarmonizeConfig(steps=1))


def _saved_case(tmp_path, scan):
    """A checkpoint of the tiny model and the scan with its mask as files; the CLI arguments."""
    from harmodiff.model import save_checkpoint

    image, mask = scan
    labels = SiteLabels(["A", "B"], [0.0])
    model = _model()
    save_checkpoint(tmp_path / "ckpt.pt", {
        "model": model.state_dict(), "ema": model.state_dict(), "step": 1, "site_labels": labels.to_dict(),
        "config": {**CONFIG, "model": TINY.to_dict()}})
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-30, -40, -30]
    nib.save(nib.Nifti1Image(image, aff), str(tmp_path / "in.nii.gz"))
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), aff), str(tmp_path / "mask.nii.gz"))
    args = ["--checkpoint", str(tmp_path / "ckpt.pt"), "--input", str(tmp_path / "in.nii.gz"), "--mask",
            str(tmp_path / "mask.nii.gz"), "--target-site", "A", "--steps", "4", "--batch-size", "12", "--device", "cpu"]
    return args, aff


def test_cli_writes_input_header_and_start_from_source_uses_fewer_passes(tmp_path, scan, capsys):
    image, mask = scan
    args, aff = _saved_case(tmp_path, scan)
    assert hz.main([*args, "--output", str(tmp_path / "out.nii.gz")]) == 0
    out = nib.load(str(tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(out.affine, aff)
    assert out.shape == image.shape
    assert hz.main([*args, "--output", str(tmp_path / "src.nii.gz"), "--start-from", "source", "--strength", "0.5"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert "'unet_passes': 288" in printed[0] and "'unet_passes': 144" in printed[1]  # 36 patches x 4 (2) steps x 2
    assert hz.main([*args, "--output", str(tmp_path / "x.nii.gz"), "--target-site", "Q"]) == 2
    assert "known sites: A, B" in capsys.readouterr().err
    # the anatomy stage's files (its CLI, default settings = the checkpoint's, the model's patch for the
    # global A_coarse) give the same image
    from harmodiff import anatomy

    patch = ["--patch-shape", *map(str, PATCH)]
    assert anatomy.main(["--input", str(tmp_path / "in.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"), *patch,
                         "--output", str(tmp_path / "A.nii.gz"), "--coarse-output", str(tmp_path / "Ac.nii.gz")]) == 0
    maps = ["--anatomy", str(tmp_path / "A.nii.gz"), "--coarse", str(tmp_path / "Ac.nii.gz")]
    assert hz.main([*args, *maps, "--output", str(tmp_path / "files.nii.gz")]) == 0
    np.testing.assert_allclose(nib.load(str(tmp_path / "files.nii.gz")).get_fdata(), out.get_fdata(), atol=1e-3)
    # ... and A from another scan changes it (the files are really read)
    nib.save(nib.Nifti1Image(np.flip(nib.load(str(tmp_path / "A.nii.gz")).get_fdata(), 0).astype(np.float32), aff),
             str(tmp_path / "A_flip.nii.gz"))
    assert hz.main([*args, "--anatomy", str(tmp_path / "A_flip.nii.gz"), "--coarse", str(tmp_path / "Ac.nii.gz"),
                    "--output", str(tmp_path / "flip.nii.gz")]) == 0
    assert np.abs(nib.load(str(tmp_path / "flip.nii.gz")).get_fdata() - out.get_fdata()).max() > 1
    assert hz.main([*args, "--anatomy", str(tmp_path / "A.nii.gz"), "--output", str(tmp_path / "y.nii.gz")]) == 2
    # A made with other settings than the model's: refused, naming both values
    assert anatomy.main(["--input", str(tmp_path / "in.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"),
                         "--output", str(tmp_path / "A2.nii.gz"), "--coarse-output", str(tmp_path / "Ac2.nii.gz"),
                         "--alpha", "0.3", *patch]) == 0
    capsys.readouterr()
    assert hz.main([*args, "--anatomy", str(tmp_path / "A2.nii.gz"), "--coarse", str(tmp_path / "Ac2.nii.gz"),
                    "--output", str(tmp_path / "z.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "A2.nii.gz was made with anatomy alpha 0.3 (the model: 0.5)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "z.nii.gz").exists()
    # the settings as the workflow passes them, in a --config file; an option given beside it wins
    import json

    import yaml

    (tmp_path / "anatomy.yaml").write_text(yaml.safe_dump({"grid": {"patch_shape": list(PATCH)},
                                                           "anatomy": {"alpha": 0.3}}))
    assert anatomy.main(["--config", str(tmp_path / "anatomy.yaml"), "--input", str(tmp_path / "in.nii.gz"),
                         "--mask", str(tmp_path / "mask.nii.gz"), "--output", str(tmp_path / "A3.nii.gz"),
                         "--coarse-output", str(tmp_path / "Ac3.nii.gz")]) == 0
    np.testing.assert_array_equal(nib.load(str(tmp_path / "A3.nii.gz")).get_fdata(),
                                  nib.load(str(tmp_path / "A2.nii.gz")).get_fdata())
    assert json.loads((tmp_path / "A3.json").read_text())["anatomy"]["alpha"] == 0.3
    settings = tmp_path / "harmonize.yaml"
    settings.write_text(yaml.safe_dump({"harmonize": {"guidance": "cfg", "scale": 1.5, "steps": 2, "batch_size": 12,
                                                      "start_from": "source", "strength": 0.5}}))
    job = [*args[:8], "--device", "cpu", "--config", str(settings), *maps]  # no --steps, --batch-size
    capsys.readouterr()
    assert hz.main([*job, "--output", str(tmp_path / "c1.nii.gz")]) == 0
    assert "'unet_passes': 72" in capsys.readouterr().out  # 36 patches x 1 step (2 x 0.5) x 2 branches
    made = json.loads((tmp_path / "c1.json").read_text())
    assert (made["guidance"], made["guidance_scale"], made["steps"], made["start_from"]) == ("cfg", 1.5, 2, "source")
    assert hz.main([*job, "--scale", "2.5", "--output", str(tmp_path / "c2.nii.gz")]) == 0
    made = json.loads((tmp_path / "c2.json").read_text())
    assert (made["guidance"], made["guidance_scale"]) == ("cfg", 2.5)
    settings.write_text("harmonize:\n  scael: 1.0\n")
    capsys.readouterr()
    assert hz.main([*job, "--output", str(tmp_path / "c3.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {settings}: harmonize: unknown key 'scael' (known: " + err.split("(known: ")[1]
    assert not (tmp_path / "c3.nii.gz").exists()


def test_one_job_with_runs_writes_what_a_job_per_setting_writes(tmp_path, scan):
    """The workflow's sweep subjects: the main setting plus the runs manifest's settings in one process
    equal one process per setting, file for file, and each sidecar records its own setting; the rows
    of another job's output are not this job's."""
    import json

    args, _ = _saved_case(tmp_path, scan)
    # from the noised source (an untrained model's output from pure noise is not finite)
    job = [*args, "--steps", "4", "--start-from", "source", "--strength", "0.5", "--seed-key", "scan-1"]
    main = str(tmp_path / "main.nii.gz")
    runs = _runs(tmp_path / "runs.tsv", [(main, tmp_path / "cfg.nii.gz", "cfg", "2", ""),
                                         (main, tmp_path / "seed3.nii.gz", "", "", "3"),
                                         (tmp_path / "other.nii.gz", tmp_path / "not_mine.nii.gz", "cfg", "1", "")])
    assert hz.main([*job, "--output", main, "--runs", runs]) == 0
    assert not (tmp_path / "not_mine.nii.gz").exists()
    alone = {"main": [], "cfg": ["--guidance", "cfg", "--scale", "2"], "seed3": ["--seed", "3"]}
    for name, options in alone.items():
        assert hz.main([*job, *options, "--output", str(tmp_path / f"{name}_alone.nii.gz")]) == 0
        together, single = (np.asarray(nib.load(str(tmp_path / f)).dataobj) for f in (f"{name}.nii.gz",
                                                                                       f"{name}_alone.nii.gz"))
        np.testing.assert_array_equal(together, single)
        made, made_alone = (json.loads((tmp_path / f).read_text()) for f in (f"{name}.json", f"{name}_alone.json"))
        assert made == made_alone | {"source": made["source"]}
    made = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in alone}
    assert [(m["guidance"], m["guidance_scale"], m["seed"]) for m in made.values()] == [
        ("cfgpp", 0.6, 0), ("cfg", 2.0, 0), ("cfgpp", 0.6, 3)]
    assert made["seed3"]["noise_seed"] == hz.scan_seed(3, "scan-1") != made["main"]["noise_seed"]
    # another seed, another image (MONAI zero-initialises the transformers' output projections, so
    # an untrained U-Net ignores the site label, and with it the guidance setting)
    main, seed3 = (nib.load(str(tmp_path / f"{n}.nii.gz")).get_fdata() for n in ("main", "seed3"))
    assert np.isfinite(main).all() and main.max() > 100 and np.abs(main - seed3).max() > 1
    # a bad run is refused before anything is written
    m2 = str(tmp_path / "m2.nii.gz")
    for row in [(m2, tmp_path / "r.nii.gz", "cfg+", "1", ""), (m2, m2, "cfg", "1", ""),
                (m2, tmp_path / "r.nii.gz", "", "x", "")]:
        assert hz.main([*job, "--output", m2, "--runs", _runs(tmp_path / "bad.tsv", [row])]) == 2
    assert not list(tmp_path.glob("m2*")) and not list(tmp_path.glob("r.*"))


def _runs(path, rows) -> str:
    """A runs manifest (main_output, output, guidance, scale, seed) with these rows."""
    pd.DataFrame([[str(v) for v in row] for row in rows], columns=hz.RUN_COLUMNS).to_csv(path, sep="\t", index=False)
    return str(path)


def test_native_output_follows_the_inverse_of_the_saved_transform(tmp_path):
    import ants
    from scipy import ndimage

    # a blob at RAS (10, -20, 5) on a 2 mm MNI-like grid
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-40, -60, -40]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (40, 50, 40)], indexing="ij"), -1) @ aff[:3, :3].T + aff[:3, 3]
    p = np.array([10.0, -20.0, 5.0])
    blob = np.exp(-np.sum((grid - p) ** 2, -1) / (2 * 4.0 ** 2)).astype(np.float32) * 100
    nib.save(nib.Nifti1Image(blob, aff), str(tmp_path / "harm.nii.gz"))
    # native grid: 1.5 mm, axes permuted (so the resampling really goes through world space)
    naff = np.zeros((4, 4))
    naff[0, 1], naff[1, 2], naff[2, 0], naff[3, 3] = 1.5, 1.5, 1.5, 1
    naff[:3, 3] = [-60, -80, -60]
    nib.save(nib.Nifti1Image(np.ones((80, 80, 100), np.float32), naff), str(tmp_path / "raw.nii.gz"))
    # the preprocessing transform maps MNI points to native points; here a shift d (ANTs uses LPS)
    d_ras = np.array([6.0, -4.0, 8.0])
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    translation=tuple(np.diag([-1.0, -1.0, 1.0]) @ d_ras))
    ants.write_transform(tx, str(tmp_path / "to_mni.mat"))
    hz.to_native(tmp_path / "harm.nii.gz", tmp_path / "raw.nii.gz", tmp_path / "to_mni.mat", tmp_path / "native.nii.gz")
    out = nib.load(str(tmp_path / "native.nii.gz"))
    com_vox = np.array(ndimage.center_of_mass(out.get_fdata()))
    com_world = out.affine[:3, :3] @ com_vox + out.affine[:3, 3]
    np.testing.assert_allclose(com_world, p + d_ras, atol=0.5)


def test_bf16_and_channels_last_match_fp32(scan):
    """bfloat16 autocast keeps ~3 significant digits per U-Net pass: the harmonized image stays
    within 0.3 % (mean) of the fp32 one, > 50x closer than a model with other weights gets
    (measured: 0.67 vs 186 in brain-median-500 units). Channels-last changes only the memory
    layout: equal to fp32 up to summation order."""
    image, mask = scan
    labels = SiteLabels(["A", "B"], [0.0])
    settings = FROM_SOURCE
    ref, _ = hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image, mask, "B", settings)
    bf16, _ = hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image, mask, "B", replace(settings, bf16=True))
    layout, _ = hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image, mask, "B", replace(settings, channels_last=True))
    other, _ = hz.harmonize_array(_model(seed=1), ModelRecord(CONFIG, labels), image, mask, "B", settings)
    diff_bf16 = np.abs(bf16 - ref)[mask]
    assert diff_bf16.mean() < 0.003 * ref[mask].mean() and diff_bf16.max() < 0.03 * ref[mask].mean()
    assert diff_bf16.mean() > 0  # autocast really ran in bf16
    assert np.abs(other - ref)[mask].mean() > 50 * diff_bf16.mean()
    np.testing.assert_allclose(layout, ref, atol=0.05)


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compiled_model_matches_eager(scan):
    """torch.compile (inductor; ~1 min to compile the tiny U-Net on 2 cores) fuses kernels but
    computes the same thing: equal to eager up to float summation order (measured max 5e-4)."""
    image, mask = scan
    labels = SiteLabels(["A", "B"], [0.0])
    settings = FROM_SOURCE
    ref, _ = hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image, mask, "B", settings)
    compiled, _ = hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image, mask, "B", replace(settings, compile=True))
    np.testing.assert_allclose(compiled, ref, atol=0.05)


def test_scan_seeds_are_stable_and_differ_between_scans():
    assert hz.scan_seed(0, "sub-01_ses-A") == hz.scan_seed(0, "sub-01_ses-A")
    seeds = {hz.scan_seed(s, f"sub-{i:02d}") for s in (0, 1) for i in range(50)}
    assert len(seeds) == 100


def test_match_source_stats_gives_the_source_brain_mean_sd_and_range():
    rng = np.random.default_rng(0)
    source, patch = rng.normal(0.2, 0.3, (8, 8, 8)), rng.normal(-0.5, 0.05, (8, 8, 8))
    mask = np.zeros((8, 8, 8), bool)
    mask[2:6] = True
    out = hz.match_source_stats(patch, source, mask)
    s = source[mask]
    assert out[mask].min() >= s.min() and out[mask].max() <= s.max()
    assert out[mask].mean() == pytest.approx(s.mean(), abs=0.01) and out[mask].std() == pytest.approx(s.std(), rel=0.03)
    np.testing.assert_array_equal(out[~mask], patch[~mask])
    np.testing.assert_array_equal(hz.match_source_stats(patch, source, np.zeros_like(mask)), patch)


def test_gpu_timing_script_runs_at_a_tiny_size(capsys):
    """The GPU benchmark is ready for a lent GPU: its tiny CPU run fills every row."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks/gpu_timing.py"
    spec = importlib.util.spec_from_file_location("gpu_timing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--tiny", "--device", "cpu"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| paper", "| fast"))]
    assert len(table) == 4 and not any("failed" in line for line in table)
    # patches x 2 steps run x 2 branches: the paper's 2 steps from noise, the fast recipe's 2 of 4 from the source
    passes = len(grid_positions((32, 40, 32), (16, 24, 16))) * 2 * 2
    assert all(line.rstrip(" |").endswith(f"| {passes}") for line in table)
    assert [line.split("|")[2].strip() for line in table] == ["True", "True", "False", "False"]  # self-attention


def test_an_input_off_the_training_grid_is_a_one_line_error(scan):
    image, mask = scan
    labels = SiteLabels(["A", "B"], [0.0])
    with pytest.raises(InputError, match=r"input grid \(32, 40, 32\) is not the grid the model was trained on "
                                         r"\(40, 48, 40\)"):
        hz.harmonize_array(_model(), ModelRecord(CONFIG, labels, volume_shape=(40, 48, 40)), image, mask, "A",
                           HarmonizeConfig(steps=1))
    with pytest.raises(InputError, match=r"input grid \(8, 40, 32\) is smaller than the model's patch"):
        hz.harmonize_array(_model(), ModelRecord(CONFIG, labels), image[:8], mask[:8], "A", HarmonizeConfig(steps=1))


def test_an_input_at_another_voxel_size_is_refused_naming_both(tmp_path, scan, capsys):
    """Same shape, other spacing: the shape check passes, the recorded training voxel size does not."""
    from harmodiff.model import save_checkpoint

    image, mask = scan
    model = _model()
    save_checkpoint(tmp_path / "ckpt.pt", {
        "model": model.state_dict(), "step": 1, "site_labels": SiteLabels(["A", "B"], [0.0]).to_dict(),
        "config": {**CONFIG, "model": TINY.to_dict()}, "volume_shape": list(image.shape), "voxel_mm": [2.0, 2.0, 2.0]})
    for mm in (2.0, 3.0):
        aff = np.diag([mm, mm, mm, 1.0])
        nib.save(nib.Nifti1Image(image, aff), str(tmp_path / f"in{mm:g}.nii.gz"))
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), aff), str(tmp_path / f"mask{mm:g}.nii.gz"))
    args = ["--checkpoint", str(tmp_path / "ckpt.pt"), "--target-site", "A", "--steps", "1", "--device", "cpu"]
    assert hz.main([*args, "--input", str(tmp_path / "in2.nii.gz"), "--mask", str(tmp_path / "mask2.nii.gz"),
                    "--output", str(tmp_path / "ok.nii.gz")]) == 0
    capsys.readouterr()
    assert hz.main([*args, "--input", str(tmp_path / "in3.nii.gz"), "--mask", str(tmp_path / "mask3.nii.gz"),
                    "--output", str(tmp_path / "no.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "in3.nii.gz: voxels of 3x3x3 mm, but" in err and "trained on 2x2x2 mm" in err and "\n" not in err
    assert not (tmp_path / "no.nii.gz").exists()
