"""Preprocessing of one raw T1 scan onto the working grid (paper section 3.1, steps i-v).

skull strip -> N4 bias correction -> affine registration to the MNI152 brain -> resampling onto
the working grid (which crops/pads to its shape) -> median normalization.

Outputs: the normalized brain, its brain mask (uint8), the ANTs affine (.mat) and a QC PNG.
The .mat is ANTs' forward transform of `ants.registration(fixed=MNI, moving=scan)`: with
`ants.apply_transforms(fixed=MNI-space image, moving=scan, transformlist=[mat])` it brings the
scan into MNI space, and with `fixed=native scan, moving=MNI-space image, whichtoinvert=[True]`
it brings a working-grid result back to the native scan.

Intensities on disk: the brain median is MEDIAN_TARGET (500), background 0, nothing negative.
The network later sees x / 500 - 1 (see `to_model_units`): brain median 0, background -1.

Skull stripping backends:
* `ants` (default, runs everywhere): the scan is registered to the nilearn MNI152 brain template
  (rigid, affine, then a short SyN; metric restricted to the dilated template brain) and the template's
  brain mask is pulled back onto the scan (see `skullstrip_ants`).
* `hdbet`: HD-BET 2 with weights from a local folder (they cannot be downloaded here).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from harmodiff.intensity import median_normalize
from harmodiff.antsio import _ants, set_threads, to_ants
from harmodiff.io import (InputError, atomic_path, file_sha256, job_tempdir, json_sidecar, load_image, one_line_errors,
                          outputs_together, save_image, write_json)
from harmodiff.config import HDBET_FILES, REGISTRATIONS, GridConfig, PreprocessConfig, add_setting_options, load_settings
from harmodiff.templates import mni_images, working_grid



def _seed(seed: int) -> None:
    # antspyx appends "--random-seed" to every registration call when this is set. antsRegistration
    # takes seed 0 to mean "seed from the clock" (ANTs PR #599), so our seed s is passed as s + 1.
    # Mattes MI sums over threads in a varying order: with more than one ITK thread the result
    # still varies run to run (measured: affine parameters differ by up to 0.2); single-threaded
    # with a seed, it is byte-identical.
    _ants().config._random_seed = int(seed) + 1


def _template(name: str, spacing: float | None = None):
    """A template image as ANTs image, optionally resampled to a coarser isotropic spacing."""
    ants = _ants()
    img = to_ants(mni_images()[name])
    if spacing and spacing > 1.2:
        img = ants.resample_image(img, (spacing, spacing, spacing), use_voxels=False, interp_type=0)
    return img


def _largest_component_filled(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    keep = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(keep)


# --------------------------------------------------------------------------------------------
# steps


def skullstrip_ants(image, *, seed: int = 0):
    """Brain mask (ANTs image, 0/1) of a head scan, the scan->MNI linear transform found on the way,
    and which linear stage that is ("affine", or "rigid" where the affine fitted worse).

    The scan is registered to the MNI brain template (rigid, affine, then a short SyN) with the metric
    restricted to the template brain dilated by ~6 mm, so the scalp and skull of the scan, which
    the brain-only template lacks, do not pull the fit outwards. The template mask is then
    pulled back onto the scan through the inverse transforms and cleaned (largest connected
    component, holes filled).
    """
    ants = _ants()
    _seed(seed)
    spacing = float(np.mean(image.spacing))
    template = _template("t1", spacing)
    mask = _template("mask", spacing)
    dilated = ndimage.binary_dilation(mask.numpy() > 0.5, iterations=max(1, int(round(6.0 / spacing))))
    metric_mask = mask.new_image_like(dilated.astype(np.float32))
    # Rigid first: an affine started from the centres of mass can scale the template brain up
    # onto the whole head when the scan's GM/WM contrast is low. Both linear stages sample every
    # voxel of the metric mask: at 4-6x shrink a 4 mm scan has only a few hundred there, and ANTs'
    # default 20% random sample of them left synthetic 4 mm scans in wrong minima (rigid: template
    # correlation 0.14 -> 0.67; affine: mask Dice 0.81 -> 0.97 against the truth, 2,779 ml for 1,873).
    rigid = ants.registration(fixed=template, moving=image, type_of_transform="Rigid", mask=metric_mask,
                              aff_iterations=(500, 250, 100, 0), aff_shrink_factors=(6, 4, 2, 1),
                              aff_smoothing_sigmas=(3, 2, 1, 0), aff_random_sampling_rate=1.0)
    aff = ants.registration(fixed=template, moving=image, type_of_transform="Affine", mask=metric_mask,
                            initial_transform=rigid["fwdtransforms"], aff_iterations=(250, 100, 50),
                            aff_shrink_factors=(4, 2, 1), aff_smoothing_sigmas=(2, 1, 0),
                            aff_random_sampling_rate=1.0)
    # The affine can still grow the template brain onto the scalp from a good rigid start (one
    # synthetic 4 mm scan: scales 1.18-1.28, template correlation 0.76 -> 0.34, and the run's
    # self-check then failed). Keep it only where it fits the template brain at least as well.
    template_brain = mask.numpy() > 0.5
    stages = {"rigid": rigid, "affine": aff}
    fit = {name: template_correlation(ants.apply_transforms(fixed=template, moving=image,
                                                             transformlist=reg["fwdtransforms"]).numpy(),
                                      template.numpy(), template_brain)
           for name, reg in stages.items()}
    linear_stage = "affine" if fit["affine"] >= fit["rigid"] else "rigid"
    linear = stages[linear_stage]
    syn = ants.registration(fixed=template, moving=image, type_of_transform="SyNOnly", mask=metric_mask,
                            initial_transform=linear["fwdtransforms"], reg_iterations=(40, 20, 0))
    warped = ants.apply_transforms(fixed=image, moving=mask, transformlist=syn["invtransforms"],
                                   whichtoinvert=[True, False], interpolator="linear")
    brain = _largest_component_filled(warped.numpy() > 0.5)
    return image.new_image_like(brain.astype(np.float32)), linear["fwdtransforms"][0], linear_stage


def hdbet_weights_sha256(weights) -> str:
    """One sha256 over an HD-BET model folder's three files (names and contents, in order), so the
    provenance names the exact weights a mask came from."""
    import hashlib

    h = hashlib.sha256()
    for name in HDBET_FILES:
        h.update(f"{name}:{file_sha256(Path(weights) / name)}\n".encode())
    return h.hexdigest()


def skullstrip_hdbet(path: Path, weights: Path, *, device: str = "cpu", threads: int | None = None):
    """Brain mask (ANTs image, 0/1, on the scan's own grid) from HD-BET 2 with the model folder
    `weights` (never downloaded). HD-BET (nnU-Net) reads the scan, predicts at the model's spacing
    and writes the mask back onto the scan's grid; that the mask's grid is the scan's is checked."""
    weights = Path(weights)
    missing = [n for n in HDBET_FILES if not (weights / n).is_file()]
    if missing:
        raise InputError(
            f"{weights}: HD-BET weights not found (missing {', '.join(missing)}). HD-BET 2.0.1 weights "
            "cannot be downloaded here; copy the release_2.0.0 folder (dataset.json, plans.json, "
            "fold_all/checkpoint_final.pth) to this path, or use --skullstrip ants"
        )
    try:
        from HD_BET import hd_bet_prediction
    except ImportError:
        raise InputError("HD-BET is not installed: pip install hd-bet==2.0.1") from None
    import torch

    # HD-BET reads its folder from this module global (default ~/hd-bet_params/release_2.0.0)
    hd_bet_prediction.folder_with_parameter_files = str(weights)
    try:
        predictor = hd_bet_prediction.get_hdbet_predictor(use_tta=False, device=torch.device(device), verbose=False)
    except Exception as exc:  # nnU-Net raises KeyError/RuntimeError/UnpicklingError on a foreign folder
        raise InputError(f"{weights}: not an HD-BET 2 model folder HD-BET can load ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if threads:
        torch.set_num_threads(threads)  # HD-BET sets os.cpu_count() threads on CPU, past the job's share
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "brain.nii.gz"
        hd_bet_prediction.hdbet_predict(str(path), str(out), predictor, keep_brain_mask=True,
                                        compute_brain_extracted_image=False)
        # nnU-Net appends the model's file_ending to the name HD-BET gives it: with a dataset.json
        # saying ".nii.gz" (nnU-Net's usual) the mask is brain_bet.nii.gz.nii.gz
        found = sorted(Path(tmp).glob("brain_bet.nii.gz*"))
        if len(found) != 1:
            raise InputError(f"{path}: HD-BET wrote no brain mask (found {[f.name for f in Path(tmp).iterdir()]})")
        mask_img = nib.load(found[0])
        mask = np.asarray(mask_img.dataobj) > 0.5
    scan = nib.load(path)
    if mask.shape != scan.shape[:3] or not np.allclose(mask_img.affine, scan.affine, atol=1e-3):
        raise InputError(f"{path}: HD-BET's mask is not on the scan's grid (shape {mask.shape} vs {scan.shape[:3]})")
    return to_ants(nib.Nifti1Image(mask.astype(np.float32), scan.affine))


def n4(image, mask, *, shrink_factor: int | None = None):
    """N4 bias-field correction inside a slightly dilated brain mask.

    The field is smooth, so N4 is fitted on a ~4 mm grid (shrink factor from the voxel size).
    """
    ants = _ants()
    if shrink_factor is None:
        shrink_factor = max(1, int(round(4.0 / float(np.mean(image.spacing)))))
    dil = ndimage.binary_dilation(mask.numpy() > 0.5, iterations=2)
    weight = mask.new_image_like(dil.astype(np.float32))
    clipped = image.new_image_like(np.clip(image.numpy(), 0, None).astype(np.float32))
    return ants.n4_bias_field_correction(clipped, mask=weight, shrink_factor=shrink_factor,
                                         convergence={"iters": [50, 50, 30], "tol": 1e-6})


def register_to_mni(brain, *, kind: str = "affine", seed: int = 0, spacing: float = 1.0,
                    initial_transform: str | None = None):
    """Register a skull-stripped brain to the MNI152 brain template; returns the ANTs .mat path.

    `initial_transform` (e.g. the skull stripper's affine) starts the optimizer near the answer,
    so fewer iterations are needed; without it ANTs starts from the centres of mass.
    """
    if kind not in REGISTRATIONS:
        raise ValueError(f"registration must be one of {REGISTRATIONS}, got {kind!r}")
    ants = _ants()
    _seed(seed)
    template = _template("t1", max(spacing, float(np.mean(brain.spacing))))
    if initial_transform is not None and kind == "affine":
        iters, shrink, sigmas = (200, 100, 50), (4, 2, 1), (2, 1, 0)
    else:
        iters, shrink, sigmas = (1000, 500, 250, 50), (6, 4, 2, 1), (3, 2, 1, 0)
    reg = ants.registration(fixed=template, moving=brain, type_of_transform="Affine" if kind == "affine" else "Rigid",
                            initial_transform=[initial_transform] if initial_transform and kind == "affine" else None,
                            aff_iterations=iters, aff_shrink_factors=shrink, aff_smoothing_sigmas=sigmas)
    return reg["fwdtransforms"][0]


def working_reference(spacing: float, shape):
    """An ANTs image with the working grid's geometry (ANTs stores LPS, nibabel RAS)."""
    affine = working_grid(spacing, shape)
    ref = nib.Nifti1Image(np.zeros(tuple(int(s) for s in shape), np.float32), affine)
    return to_ants(ref), affine


def resample_to_grid(image, transform: str, reference, *, interpolator: str = "linear"):
    return _ants().apply_transforms(fixed=reference, moving=image, transformlist=[transform],
                                    interpolator=interpolator)


def qc_png(data: np.ndarray, mask: np.ndarray, path: Path, title: str = "") -> None:
    """Three orthogonal central slices with the brain-mask outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = [int(round(c)) for c in ndimage.center_of_mass(mask)] if mask.any() else [s // 2 for s in data.shape]
    vmax = float(np.percentile(data[mask], 99.5)) if mask.any() else float(data.max() or 1)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for ax, axis, name in zip(axes, range(3), ("sagittal", "coronal", "axial")):
        sl = np.take(data, centre[axis], axis=axis).T
        ms = np.take(mask, centre[axis], axis=axis).T.astype(float)
        ax.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=vmax)
        ax.contour(ms, levels=[0.5], colors="r", linewidths=0.7)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def template_correlation(moved: np.ndarray, template: np.ndarray, inside: np.ndarray) -> float:
    """Pearson correlation of a registered image with the template over `inside` (0 if either is flat)."""
    a, b = moved[inside].astype(np.float64), template[inside].astype(np.float64)
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0


def self_checks(native_mask: np.ndarray, voxel_ml: float, moved: np.ndarray, template: np.ndarray,
                settings: PreprocessConfig) -> tuple[dict, list[str]]:
    """The preprocessing's own QC: (measures, failed checks). Brain volume of the native mask;
    Pearson correlation of the registered brain with the template inside the template's brain;
    fraction of the native mask on the scan's outermost voxel layer; thresholds from `settings`."""
    brain_volume_ml = settings.brain_volume_ml
    min_template_correlation = settings.min_template_correlation
    max_brain_at_border = settings.max_brain_at_border
    volume = float(native_mask.sum()) * voxel_ml
    corr = template_correlation(moved, template, template > 0)
    border = np.zeros(native_mask.shape, bool)
    for axis in range(3):
        border[(slice(None),) * axis + (0,)] = border[(slice(None),) * axis + (-1,)] = True
    at_border = float((native_mask & border).sum() / max(native_mask.sum(), 1))
    measures = {"brain_volume_ml": round(volume, 1), "template_correlation": round(corr, 4),
                "brain_at_border": round(at_border, 5)}
    failed = []
    lo, hi = brain_volume_ml
    if not lo <= volume <= hi:
        failed.append(f"brain volume {volume:.0f} ml is outside {lo:g}-{hi:g} ml (preprocess.brain_volume_ml)")
    if corr < min_template_correlation:
        failed.append(f"correlation with the MNI152 brain after registration {corr:.2f} < "
                      f"{min_template_correlation:g} (preprocess.min_template_correlation)")
    if at_border > max_brain_at_border:
        failed.append(f"{at_border:.1%} of the brain mask lies on the field of view's edge > "
                      f"{max_brain_at_border:.1%} (preprocess.max_brain_at_border)")
    return measures, failed


# --------------------------------------------------------------------------------------------
# the whole stage


@dataclass(frozen=True)
class PreprocessPaths:
    """One scan's preprocessing: the raw scan and what is written from it (transform and QC optional)."""

    input: str | Path
    output: str | Path
    mask_output: str | Path
    transform_output: str | Path | None = None
    qc_output: str | Path | None = None


def preprocess(paths: PreprocessPaths, grid: GridConfig, settings: PreprocessConfig, *, device: str = "cpu"):
    """Preprocess one raw scan onto `grid` under `settings`; writes the outputs atomically (with
    `self_checks`' measures in a JSON next to the image) and returns (image, mask, affine). A failed
    self-check writes nothing and names the scan and the check. `device` runs HD-BET."""
    input_path, output, qc_output = Path(paths.input), paths.output, paths.qc_output
    skullstrip, hdbet_weights, seed = settings.skullstrip, settings.hdbet_weights, settings.seed
    outputs = [Path(p) for p in (output, json_sidecar(output), paths.mask_output, paths.transform_output, qc_output)
               if p]
    # every output checked first (not an input or its sidecar, a regular file or new path, a writable folder);
    # all of them or none
    with outputs_together(outputs, inputs=[input_path, hdbet_weights]), job_tempdir("harmodiff-preprocess-"):
        raw = load_image(input_path)
        image = to_ants(raw)
        initial, provenance = None, {"source": str(input_path), "skullstrip": skullstrip,
                                     "registration": settings.registration}
        if skullstrip == "ants":
            brain_mask, initial, provenance["skullstrip_linear_stage"] = skullstrip_ants(image, seed=seed)
        else:
            brain_mask = skullstrip_hdbet(input_path, hdbet_weights, device=device, threads=settings.threads)
            provenance["hdbet_weights"] = str(hdbet_weights)
            provenance["hdbet_weights_sha256"] = hdbet_weights_sha256(hdbet_weights)
        if brain_mask.numpy().sum() == 0:
            raise InputError(f"{input_path}: skull stripping found no brain")
        corrected = n4(image, brain_mask)
        brain = corrected * brain_mask
        transform = register_to_mni(brain, kind=settings.registration, seed=seed, spacing=grid.spacing,
                                    initial_transform=initial)
        reference, affine = working_reference(grid.spacing, grid.shape)
        moved = resample_to_grid(brain, transform, reference).numpy()
        moved_mask = resample_to_grid(brain_mask, transform, reference).numpy() > 0.5
        moved_mask = _largest_component_filled(moved_mask)
        template = _ants().resample_image_to_target(_template("t1"), reference, interp_type="linear")
        measures, failed = self_checks(brain_mask.numpy() > 0.5, float(np.prod(brain_mask.spacing)) / 1000.0, moved,
                                       template.numpy(), settings)
        if failed:
            raise InputError(f"{input_path}: preprocessing failed its self-check: {'; '.join(failed)}")
        normalized = median_normalize(moved, moved_mask)
        save_image(normalized, affine, output)
        save_image(moved_mask, affine, paths.mask_output, dtype=np.uint8)
        write_json({**provenance, **measures}, json_sidecar(output))
        if paths.transform_output:
            with atomic_path(paths.transform_output) as tmp:
                shutil.copyfile(transform, tmp)
        if qc_output:
            qc_png(normalized, moved_mask, Path(qc_output), title=input_path.name)
    return normalized, moved_mask, affine


@one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.preprocess", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="raw T1 NIfTI (any orientation and voxel size)")
    p.add_argument("--output", required=True, help="normalized brain on the working grid (.nii.gz)")
    p.add_argument("--mask-output", required=True, help="brain mask on the working grid (.nii.gz)")
    p.add_argument("--transform-output", help="ANTs affine scan->MNI (.mat)")
    p.add_argument("--qc-output", help="QC PNG")
    p.add_argument("--config", help="settings file (its grid and preprocess sections: the workflow's "
                   "results/config/preprocess.yaml, or a workflow config); the options below override it")
    add_setting_options(p, GridConfig, PreprocessConfig, skip=("patch_shape",))
    p.add_argument("--device", default="cpu", help="device for HD-BET")
    a = p.parse_args(argv)
    grid, pre = load_settings(GridConfig, a.config, a), load_settings(PreprocessConfig, a.config, a)
    set_threads(pre.threads)
    preprocess(PreprocessPaths(a.input, a.output, a.mask_output, a.transform_output, a.qc_output), grid, pre,
               device=a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
