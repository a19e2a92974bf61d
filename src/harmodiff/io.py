"""NIfTI input/output with validation and atomic writes.

Every stage reads images through `load_image`, so bad input fails with one line naming the file
and the problem instead of a traceback from deep inside numpy or ANTs.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np


class InputError(ValueError):
    """A user-supplied file or value is unusable; the message names it and says why."""


def _read_nifti(path: Path):
    """nibabel's image of `path`. A .gz is decompressed here, whole and once: gzip's CRC sits at the
    end of the stream and a reader that stops after the voxels it needs never checks it, so a
    corrupted byte would give wrong voxels without a word; the image then reads from memory."""
    import gzip
    import zlib

    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return nib.load(str(path))
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


def load_image(path: str | os.PathLike, *, allow_empty: bool = False) -> nib.Nifti1Image:
    """Load a 3-D NIfTI image and check it is usable.

    Raises InputError for: a missing file, a truncated or corrupt file (a .gz is decompressed
    whole, so its checksum is verified), a file that is not NIfTI, a 4-D image (a singleton
    4th dimension is squeezed), NaN/inf voxels, an all-zero image, or no usable affine (qform and
    sform both unset, or a singular / non-finite matrix).
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
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: contains {n_bad} NaN/inf voxels")
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


def check_writable(paths) -> None:
    """InputError naming the first output that is not a regular file or a new path, or whose folder
    cannot be created or written, so a command fails before its work, not after it."""
    for path in (Path(p) for p in paths if p):
        refuse_non_regular_target(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe.", dir=path.parent)
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


@contextmanager
def outputs_together(paths, inputs=()) -> Iterator[None]:
    """Check every output first (not one of the `inputs` or their sidecars, a regular file or a new
    path, in a writable folder); inside the block each atomic write stays a temporary, and at its
    end all are renamed into place together: a command with several outputs leaves all of them or
    none."""
    global _PENDING
    check_outputs(paths, inputs)
    outer, _PENDING = _PENDING, []
    pending = _PENDING
    try:
        yield
        for tmp, final in pending:
            os.replace(tmp, final)
    finally:
        _PENDING = outer
        for tmp, _ in pending:
            if tmp.exists():
                tmp.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path` (inside
    `outputs_together`: at the end of that block, with the command's other outputs).

    A killed job leaves no half-written output that Snakemake or the user could take for a
    finished one. The file gets the mode a plain `open` would give (0666 less the umask), not
    mkstemp's 0600, so shared lab directories can read it.
    """
    path = Path(path)
    refuse_non_regular_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    deferred = False
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())
        if _PENDING is not None:
            _PENDING.append((tmp_path, path))
            deferred = True
        else:
            os.replace(tmp_path, path)
    finally:
        if not deferred and tmp_path.exists():
            tmp_path.unlink()


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
