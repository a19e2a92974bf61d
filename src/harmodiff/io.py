"""NIfTI input/output with validation and atomic writes.

Every stage reads images through `load_image`, so bad input fails with one line naming the file
and the problem instead of a traceback from deep inside numpy or ANTs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import nibabel as nib
import numpy as np


class InputError(ValueError):
    """A user-supplied file or value is unusable; the message names it and says why."""


# every table the workflow writes: no index, 6 significant digits
TABLE_FLOAT_FORMAT = "%.6g"


def table_text(df) -> str:
    """A DataFrame as the workflow writes every CSV table."""
    return df.to_csv(index=False, float_format=TABLE_FLOAT_FORMAT)


def write_table(df, path) -> None:
    write_text(table_text(df), path)


def one_line_errors(main):
    """A stage's CLI entry point: an InputError or ConfigError (a file or setting the user gave is
    unusable) becomes one `error: ...` line on stderr and exit status 2, not a traceback."""
    from harmodiff.config import ConfigError

    @functools.wraps(main)
    def cli(argv=None) -> int:
        try:
            return main(argv)
        except (InputError, ConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return cli


def _read_nifti(path: Path):
    """nibabel's image of `path`. A .gz is decompressed here, whole and once: gzip's CRC sits at the
    end of the stream and a reader that stops after the voxels it needs never checks it, so a
    corrupted byte would give wrong voxels without a word; the image then reads from memory."""
    import gzip
    import zlib

    header_only = _refuse_oversized(path)
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return header_only or nib.load(str(path))
    try:
        raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: voxel data unreadable, the file is truncated or corrupt "
                         f"({exc.__class__.__name__}: {exc})") from None
    header_size = int.from_bytes(raw[:4], "little")
    if header_size not in (348, 540):
        header_size = int.from_bytes(raw[:4], "big")
    kind = {348: nib.Nifti1Image, 540: nib.Nifti2Image}.get(header_size)
    if kind is None:
        raise ValueError(f"not a NIfTI-1 or NIfTI-2 header (sizeof_hdr {header_size})")
    return kind.from_bytes(raw)


def _what_stands_at(path: Path) -> str:
    """What a path that is not a regular file holds, in words."""
    if path.is_symlink() and not path.exists():
        return "a dangling symbolic link"
    for test, what in ((path.is_dir, "a directory"), (path.is_fifo, "a FIFO (named pipe)"),
                       (path.is_char_device, "a character device"), (path.is_block_device, "a block device"),
                       (path.is_socket, "a socket")):
        if test():
            return what
    return "something other than a regular file"


def not_a_file(path) -> str:
    """Why a path that should be an input file is not one, as an error's words."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return "file not found"
    return f"not a regular file ({_what_stands_at(path)})"


# the most voxels an input may hold (a 0.5 mm whole head, 512 x 512 x 400, has 105 M): a small .gz
# claiming 1200^3 voxels would otherwise be decompressed whole before numpy ran out of memory
MAX_VOXELS = 256 * 2**20


def _refuse_oversized(path: Path):
    """InputError when the header asks for more than MAX_VOXELS; else nibabel's image of the file
    with only its header read (None when nibabel cannot read it: load_image says why)."""
    try:
        image = nib.load(str(path))
    except Exception:
        return None
    shape = image.shape
    n = int(np.prod(shape, dtype=np.float64))
    if n > MAX_VOXELS:
        raise InputError(f"{path}: the header asks for {'x'.join(map(str, shape))} = {n:,} voxels, more than the "
                         f"{MAX_VOXELS:,} an input may have (a 0.5 mm whole head has ~105 M)")
    return image


def _header_scaling(img) -> str:
    """The header's scl_slope and scl_inter (nibabel moves them from the header to the data proxy)."""
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    return f"{float(slope):g}, scl_inter {float(inter):g}"


def load_image(path: str | os.PathLike, *, allow_empty: bool = False) -> nib.Nifti1Image:
    """Load a 3-D NIfTI image and check it is usable.

    Raises InputError for: a missing file or one that is not a regular file, a header asking for
    more than MAX_VOXELS, a truncated or corrupt file (a .gz is decompressed whole, so its
    checksum is verified), a file that is not NIfTI, a 4-D image (a singleton 4th dimension is
    squeezed), complex voxels, NaN/inf voxels or values that overflow float32 after the header's
    scaling, an all-zero image, or no usable affine (qform and sform both unset, or a singular /
    non-finite matrix).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {not_a_file(path)}")
    try:
        img = _read_nifti(path)
    except InputError:
        raise
    except Exception as exc:  # nibabel raises several types for non-NIfTI input
        raise InputError(f"{path}: not a readable NIfTI image ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        squeezed = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header)
        squeezed.header.set_qform(img.affine, code=int(img.header["qform_code"]))
        squeezed.header.set_sform(img.affine, code=int(img.header["sform_code"]))
        img = squeezed
        shape = img.shape
    if len(shape) != 3:
        raise InputError(f"{path}: expected a 3-D image, got shape {shape}")
    if min(shape) < 2:
        raise InputError(f"{path}: degenerate image shape {shape}")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # EOFError, BadGzipFile, zlib.error, short reads of a truncated file
        raise InputError(f"{path}: voxel data unreadable, the file is truncated or corrupt "
                         f"({exc.__class__.__name__}: {exc})") from None
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{path}: voxel type {data.dtype} is not numeric")
    if np.issubdtype(data.dtype, np.complexfloating):
        raise InputError(f"{path}: voxel type {data.dtype} is complex; a T1-weighted scan is a real-valued "
                         "magnitude image (taking the real part would lose data silently)")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: contains {n_bad} NaN/inf voxels")
    # every tool computes in float32: a value finite in float64 (scl_slope 1e38) would become inf there
    if np.issubdtype(data.dtype, np.floating) and data.size and np.abs(data).max() > np.finfo(np.float32).max:
        raise InputError(f"{path}: voxel values up to {float(np.abs(data).max()):.3g} (after scl_slope "
                         f"{_header_scaling(img)}) overflow float32, whose largest value is "
                         f"{float(np.finfo(np.float32).max):.3g}")
    if not allow_empty and not np.any(data):
        raise InputError(f"{path}: image is all zeros")
    header = img.header
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise InputError(f"{path}: no usable affine (qform and sform codes are both 0, so the "
                         "voxel-to-world orientation is unknown)")
    affine = img.affine
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise InputError(f"{path}: no usable affine (singular or non-finite voxel-to-world matrix)")
    return img


def load_mask(path: str | os.PathLike, like: nib.Nifti1Image | None = None) -> np.ndarray:
    """Load a binary brain mask (voxels > 0.5), checking it matches `like`'s grid."""
    img = load_image(path)
    if like is not None:
        if img.shape != like.shape or not np.allclose(img.affine, like.affine, atol=1e-3):
            raise InputError(
                f"{path}: mask grid {img.shape} does not match the image grid {like.shape} "
                "(shape or affine differ)"
            )
    return np.asarray(img.dataobj) > 0.5


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_image(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def refuse_overwriting_inputs(inputs, outputs) -> None:
    """InputError when an output path is one of the inputs or an input image's JSON sidecar (a
    BIDS dataset's scanner metadata, the preprocessing record a harmonization reads): same
    resolved path, or the same file through another name (same device and inode), so no command
    writes over what it reads."""
    ins = [Path(p) for p in inputs if p]
    ins += [json_sidecar(p) for p in ins if _is_image(p)]
    for out in (Path(p) for p in outputs if p):
        for src in ins:
            same = out.resolve() == src.resolve()
            if not same and out.exists() and src.exists():
                same = os.path.samefile(out, src)
            if same:
                raise InputError(f"{out}: refusing to overwrite the input {src}")


def refuse_non_regular_target(path) -> None:
    """InputError when an output path holds something other than a regular file (a directory, a
    FIFO, a device node: an atomic rename would replace /dev/null with a plain file)."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise InputError(f"{path}: refusing to write there: the path holds {_what_stands_at(path)} (an output "
                         "must be a regular file or a new path)")


_PENDING: list | None = None  # (temporary, final) renames held back by `outputs_together`


def _missing_folders(folder: Path) -> list[Path]:
    """The folders on `folder`'s path that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def check_writable(paths) -> None:
    """InputError naming the first output that is not a regular file or a new path, or whose folder
    cannot be made or written (probed in its nearest existing folder, which is left as it was: a
    command that fails leaves no empty folders), so a command fails before its work, not after it."""
    for path in (Path(p) for p in paths if p):
        refuse_non_regular_target(path)
        missing = _missing_folders(path.absolute().parent)
        folder = missing[-1].parent if missing else path.absolute().parent
        try:
            if not folder.is_dir():
                raise NotADirectoryError(20, f"{folder} is not a folder")
            fd, probe = tempfile.mkstemp(prefix=".probe.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise InputError(f"{path}: cannot write there ({exc.strerror or exc})") from None


def check_outputs(outputs, inputs=()) -> None:
    """Before a command's work: InputError naming the first output that is one of its inputs or an
    input image's sidecar, holds something other than a regular file, or sits in a folder that
    cannot be written."""
    refuse_overwriting_inputs(inputs, outputs)
    check_writable(outputs)


def check_outputs_or_exit(outputs, inputs=()) -> None:
    """`check_outputs` for a command's main: the error as one line on stderr and exit status 2."""
    import sys

    try:
        check_outputs(outputs, inputs)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it made (deepest first)."""
    made = _missing_folders(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return made


def _remove_if_empty(folders) -> None:
    for f in folders:
        try:
            f.rmdir()
        except OSError:
            pass  # not empty (another job's output) or already gone


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (Snakemake cancelling a job, SLURM's time limit) raises SystemExit inside the block,
    so the cleanup in `finally` runs and no temporary is left behind (SIGKILL cannot be caught)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_143(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, exit_143)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def outputs_together(paths, inputs=()) -> Iterator[None]:
    """Check every output first (not one of the `inputs` or their sidecars, a regular file or a new
    path, in a writable folder); inside the block each atomic write stays a temporary, and at its
    end all are renamed into place together: a command with several outputs leaves all of them or
    none (and, failing, no folder it made)."""
    global _PENDING
    check_outputs(paths, inputs)
    outer, _PENDING = _PENDING, []
    pending = _PENDING
    done = False
    try:
        with _terminate_as_exit():
            yield
            for tmp, final, _ in pending:
                os.replace(tmp, final)
            done = True
    finally:
        _PENDING = outer
        for tmp, _, made in pending:
            if tmp.exists():
                tmp.unlink()
            if not done:
                _remove_if_empty(made)


# what a failed write says: the disk, not the data
_WRITE_ERRNOS = {28: "no space left on the device", 122: "disk quota exceeded", 30: "read-only file system",
                 5: "input/output error"}


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path` (inside
    `outputs_together`: at the end of that block, with the command's other outputs).

    A killed job leaves no half-written output that Snakemake or the user could take for a
    finished one (SIGTERM removes the temporary too). The file gets the mode a plain `open`
    would give (0666 less the umask), not mkstemp's 0600, so shared lab directories can read it.
    A full disk or quota is one line naming the output.
    """
    path = Path(path)
    refuse_non_regular_target(path)
    made = _make_folders(path.parent)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())
    deferred = False
    try:
        with _terminate_as_exit():
            try:
                yield tmp_path
            except OSError as exc:
                if exc.errno in _WRITE_ERRNOS:
                    raise InputError(f"{path}: cannot write it: {_WRITE_ERRNOS[exc.errno]}") from None
                raise
            if _PENDING is not None:
                _PENDING.append((tmp_path, path, made))
                deferred = True
            else:
                os.replace(tmp_path, path)
    finally:
        if not deferred and tmp_path.exists():
            tmp_path.unlink()
            _remove_if_empty(made)


@contextmanager
def job_tempdir(prefix: str = "harmodiff-") -> Iterator[Path]:
    """A folder of this job's own under $TMPDIR that every temporary file inside the block goes to
    (Python's tempfile, so ANTsPy's registration warps and Atropos posteriors, and child processes
    through TMPDIR); removed with its content on success and on failure. Without it each
    preprocessing left ~22 MB in /tmp, ~200 GB over 10,000 scans on a node that is not ours."""
    import shutil

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    old_tempdir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(folder), str(folder)
    try:
        with _terminate_as_exit():
            yield folder
    finally:
        tempfile.tempdir = old_tempdir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        shutil.rmtree(folder, ignore_errors=True)


def save_image(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike,
               header: nib.Nifti1Header | None = None, dtype=np.float32) -> Path:
    """Write a NIfTI atomically (temp file then rename)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine, header)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(obj, path: str | os.PathLike) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)




def json_sidecar(path) -> Path:
    """The JSON file next to an image that records how it was made (x.nii.gz -> x.json)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".gz").removesuffix(".nii") + ".json")

def file_sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
