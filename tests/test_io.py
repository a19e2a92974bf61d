import nibabel as nib
import numpy as np
import pytest

from harmodiff.io import InputError, atomic_path, load_image, save_image


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_valid_image_loads_and_singleton_4d_is_squeezed(tmp_path):
    img = load_image(_write(tmp_path / "a.nii.gz", np.ones((4, 5, 6, 1), np.float32)))
    assert img.shape == (4, 5, 6)


@pytest.mark.parametrize("name,data,affine,message", [
    ("4d.nii.gz", np.ones((4, 4, 4, 3), np.float32), None, "expected a 3-D image"),
    ("nan.nii.gz", np.where(np.eye(4)[:, :, None] > 0, np.nan, 1.0).repeat(4, 2).astype(np.float32), None, "NaN/inf"),
    ("zero.nii.gz", np.zeros((4, 4, 4), np.float32), None, "all zeros"),
])
def test_bad_images_name_file_and_problem(tmp_path, name, data, affine, message):
    path = _write(tmp_path / name, data, affine)
    with pytest.raises(InputError) as exc:
        load_image(path)
    assert str(path) in str(exc.value) and message in str(exc.value)


def test_image_without_usable_affine(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None)  # qform and sform codes 0
    path = tmp_path / "noaffine.nii"
    nib.save(img, str(path))

    message = "no usable affine"
    with pytest.raises(InputError) as exc:
        load_image(path)
    assert str(path) in str(exc.value) and message in str(exc.value)


def test_not_nifti_and_missing(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="not a readable NIfTI"):
        load_image(bad)
    with pytest.raises(InputError, match="file not found"):
        load_image(tmp_path / "nope.nii.gz")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    save_image(np.ones((3, 3, 3)), np.eye(4), target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
    np.testing.assert_array_equal(nib.load(str(target)).get_fdata(), 1.0)


def test_outputs_follow_the_umask_not_mkstemps_0600(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        save_image(np.ones((4, 4, 4)), np.eye(4), tmp_path / "a.nii.gz")
        os.umask(0o007)
        save_image(np.ones((4, 4, 4)), np.eye(4), tmp_path / "b.nii.gz")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.nii.gz").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.nii.gz").stat().st_mode) == 0o660


@pytest.mark.parametrize("module", ["anatomy", "harmonize"])
def test_commands_refuse_to_write_over_their_inputs(tmp_path, module, capsys):
    """--output equal to --input (by name, or through a hard link) is refused before anything is
    read or written, and the input is left byte-identical."""
    import importlib
    import os

    save_image(np.ones((8, 8, 8)), np.eye(4), tmp_path / "scan.nii.gz")
    save_image(np.ones((8, 8, 8)), np.eye(4), tmp_path / "mask.nii.gz")
    os.link(tmp_path / "scan.nii.gz", tmp_path / "alias.nii.gz")
    before = (tmp_path / "scan.nii.gz").read_bytes()
    main = importlib.import_module(f"harmodiff.{module}").main
    for out in ("scan.nii.gz", "alias.nii.gz", "./../" + tmp_path.name + "/scan.nii.gz"):
        common = ["--input", str(tmp_path / "scan.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"),
                  "--output", str(tmp_path / out)]
        extra = (["--coarse-output", str(tmp_path / "c.nii.gz")] if module == "anatomy" else
                 ["--checkpoint", str(tmp_path / "none.pt"), "--target-site", "X"])
        assert main(common + extra) == 2
        assert "refusing to overwrite the input" in capsys.readouterr().err
    assert (tmp_path / "scan.nii.gz").read_bytes() == before
    assert not (tmp_path / "c.nii.gz").exists()


@pytest.mark.parametrize("damage", ["truncate-gz", "truncate-raw", "flip-gz"])
def test_truncated_or_corrupt_files_are_one_line_errors(tmp_path, damage):
    """A file whose header reads but whose voxel data does not (a cut-off download, a flipped
    byte in the gzip stream) fails in load_image, naming the file, not with EOFError deep inside."""
    rng = np.random.default_rng(0)
    suffix = ".nii" if damage == "truncate-raw" else ".nii.gz"
    path = tmp_path / f"scan{suffix}"
    save_image(rng.normal(size=(20, 20, 20)), np.eye(4), path)
    raw = bytearray(path.read_bytes())
    if damage.startswith("truncate"):
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=rf"scan{suffix}: (voxel data unreadable|not a readable NIfTI)"):
        load_image(path)


def test_outputs_are_written_together_or_not_at_all(tmp_path):
    from harmodiff.io import outputs_together

    a, b = tmp_path / "a.nii.gz", tmp_path / "sub" / "b.nii.gz"
    save_image(np.full((4, 4, 4), 7.0), np.eye(4), a)  # an older result
    before = a.read_bytes()
    with pytest.raises(RuntimeError, match="killed half way"):
        with outputs_together([a, b]):
            save_image(np.ones((4, 4, 4)), np.eye(4), a)
            assert a.read_bytes() == before  # held back until the block ends
            raise RuntimeError("killed half way")
    assert a.read_bytes() == before and not b.exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.nii.gz"]  # no temporaries
    with outputs_together([a, b]):
        save_image(np.ones((4, 4, 4)), np.eye(4), a)
        save_image(np.ones((4, 4, 4)), np.eye(4), b)
    assert np.asarray(nib.load(a).dataobj).max() == 1 and b.exists()


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path, capsys):
    """The output's folder cannot be made (a file sits where it should be): the command stops
    with one line naming the output before it reads its input (here: a missing one)."""
    from harmodiff import anatomy

    (tmp_path / "blocked").write_text("a file, not a folder")
    code = anatomy.main(["--input", str(tmp_path / "missing.nii.gz"), "--mask", str(tmp_path / "m.nii.gz"),
                         "--output", str(tmp_path / "blocked/A.nii.gz"), "--coarse-output", str(tmp_path / "c.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "blocked/A.nii.gz: cannot write there" in err and "missing" not in err


def test_an_input_images_sidecar_is_an_input_too(tmp_path, capsys):
    """A BIDS scan's JSON (scanner metadata) and a preprocessed scan's record are inputs: an output
    whose own sidecar would land on them is refused before any work, and they are left as they were."""
    from harmodiff import harmonize, preprocess

    bids = tmp_path / "bids"
    save_image(np.ones((8, 8, 8)), np.eye(4), bids / "sub-01_T1w.nii")
    (bids / "sub-01_T1w.json").write_text('{"MagneticFieldStrength": 3}')
    code = preprocess.main(["--input", str(bids / "sub-01_T1w.nii"), "--output", str(bids / "sub-01_T1w.nii.gz"),
                            "--mask-output", str(tmp_path / "m.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "sub-01_T1w.json: refusing to overwrite the input" in err
    assert (bids / "sub-01_T1w.json").read_text() == '{"MagneticFieldStrength": 3}'
    assert not (bids / "sub-01_T1w.nii.gz").exists() and not (tmp_path / "m.nii.gz").exists()

    save_image(np.ones((8, 8, 8)), np.eye(4), tmp_path / "in/X.nii.gz")
    (tmp_path / "in/X.json").write_text('{"skullstrip": "ants"}')
    code = harmonize.main(["--checkpoint", str(tmp_path / "none.pt"), "--input", str(tmp_path / "in/X.nii.gz"),
                           "--mask", str(tmp_path / "in/X.nii.gz"), "--target-site", "A",
                           "--output", str(tmp_path / "in/X.nii")])
    assert code == 2 and "X.json: refusing to overwrite the input" in capsys.readouterr().err
    assert (tmp_path / "in/X.json").read_text() == '{"skullstrip": "ants"}'


def _special_targets(tmp_path):
    """(path, what) of outputs that are no regular file: a folder, a FIFO, a device node when this
    user may make one (a copy of /dev/null: character device 1, 3)."""
    import os

    targets = [(tmp_path / "folder.png", "a directory"), (tmp_path / "pipe.mat", "a FIFO")]
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "pipe.mat")
    try:
        os.mknod(tmp_path / "null.tsv", 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))
        targets.append((tmp_path / "null.tsv", "a character device"))
    except PermissionError:
        pass
    return targets


def test_an_output_that_is_no_regular_file_is_refused_before_any_work(tmp_path, capsys):
    """--qc-output, --transform-output or a sheet builder's -o at a device node, FIFO or folder: one
    line naming it, before the input is even read (here: a missing input, never reported), and
    the node is still what it was (an atomic rename would have made /dev/null a plain file)."""
    import stat

    from harmodiff import preprocess, scans

    targets = _special_targets(tmp_path)
    for target, what in targets:
        for flag in ("--qc-output", "--transform-output"):
            code = preprocess.main(["--input", str(tmp_path / "missing.nii.gz"), "--output", str(tmp_path / "p.nii.gz"),
                                    "--mask-output", str(tmp_path / "m.nii.gz"), flag, str(target)])
            err = capsys.readouterr().err
            assert code == 2 and f"{target}: refusing to write there: the path holds {what}" in err, err
            assert "missing" not in err
    _nii = save_image(np.ones((4, 4, 4)), np.eye(4), tmp_path / "ds/sub-01/anat/sub-01_T1w.nii.gz")
    (tmp_path / "ds/participants.tsv").write_text("participant_id\tsite\nsub-01\tA\n")
    for target, what in targets:
        with pytest.raises(SystemExit):
            scans.main(["bids", str(tmp_path / "ds"), "-o", str(target)])
        assert f"the path holds {what}" in capsys.readouterr().err
    from harmodiff import evaluate, figures

    for target, what in targets:  # the table and figure commands too, before they read anything
        for main, argv in ((figures.main, ["loss", "--loss", str(tmp_path / "missing.csv"), "--output", str(target)]),
                           (evaluate.main, ["ttests", "--ratios", str(tmp_path / "missing.csv"), "--reference", "A",
                                            "--output", str(target)])):
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and f"the path holds {what}" in err and "missing" not in err
    kinds = {what: target for target, what in targets}
    assert stat.S_ISFIFO((tmp_path / "pipe.mat").stat().st_mode) and (tmp_path / "folder.png").is_dir()
    if "a character device" in kinds:
        assert stat.S_ISCHR(kinds["a character device"].stat().st_mode)
    assert not (tmp_path / "p.nii.gz").exists()
