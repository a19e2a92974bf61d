"""Harmonize one preprocessed scan to a target site (paper sections 2.6 and 2.7).

1. A (log-gamma 0) and A_coarse from the scan, as in training;
2. a dense patch grid with >= 50 % overlap;
3. one full-volume noise field drawn from the seed, cropped per patch, so overlapping patches
   start from the same noise where they overlap;
4. DDIM in batches of patches, the unconditional and conditional branches in one forward pass
   (the batch is doubled: null label for the first half, the target label for the second);
5. Hann-weighted fusion, back to intensities (brain median 500 scale), masked to the brain;
6. written on the working grid with the input's header; optionally also in native space.

Beyond the paper: `start_from="source"` starts DDIM from the source scan noised to an
intermediate step (`strength` of the schedule), which needs proportionally fewer U-Net passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from harmodiff import anatomy as anat
from harmodiff import sample as smp
from harmodiff.config import ConfigError, HarmonizeConfig, add_setting_options, load_settings
from harmodiff.diffusion import NoiseSchedule
from harmodiff.io import (InputError, file_sha256, json_sidecar, load_image, load_mask, one_line_errors,
                          outputs_together, save_image, write_json)
from harmodiff.antsio import to_native
from harmodiff.model import NULL_LABEL, ModelRecord
from harmodiff.patches import extract, fuse, grid_positions, hann_window
from harmodiff.intensity import MEDIAN_TARGET, from_model_units, to_model_units
from harmodiff.manifests import add_manifest_option


def match_source_stats(patch: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The authors' released post-processing: give a sampled patch the brain mean and standard
    deviation of the source patch, then clamp it to the source's brain range. Voxels outside
    `mask` are left as they are; a patch with no brain voxel is returned unchanged."""
    if not mask.any():
        return patch
    p, s = patch[mask].astype(np.float64), source[mask].astype(np.float64)
    scaled = (patch - p.mean()) / max(p.std(), 1e-8) * s.std() + s.mean()
    out = np.where(mask, np.clip(scaled, s.min(), s.max()), patch)
    return out.astype(patch.dtype)


@dataclass
class Conditioning:
    """What the denoiser is conditioned on for one scan: A and A_coarse on the working grid, and
    the target's site label."""

    anatomy: np.ndarray
    coarse: np.ndarray
    coarse_mode: str
    patch_shape: tuple[int, int, int]
    target_label: int

    def patches(self, corners, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, A_coarse) of the patches at `corners`, as (n, 1, *patch) tensors."""
        A_b = stack_patches(self.anatomy, corners, self.patch_shape).to(device)
        if self.coarse_mode == "global":  # one whole-volume map at patch shape, the same for every patch
            C_b = torch.from_numpy(self.coarse)[None, None].expand(len(corners), 1, *self.patch_shape).contiguous()
        else:
            C_b = stack_patches(self.coarse, corners, self.patch_shape)
        return A_b, C_b.to(device)


def stack_patches(volume, corners, patch_shape) -> torch.Tensor:
    return torch.stack([torch.as_tensor(extract(volume, c, patch_shape)) for c in corners])[:, None]


def conditioning(record: ModelRecord, image: np.ndarray, mask: np.ndarray, target_site: str,
                 anatomy: np.ndarray | None = None, coarse: np.ndarray | None = None) -> Conditioning:
    """The scan's conditioning under the checkpoint's settings: A and A_coarse as the anatomy stage
    wrote them, or computed here; the input must be on the training grid."""
    try:
        target = record.labels.index(target_site, 0.0)
    except KeyError as exc:
        raise InputError(str(exc).strip("'\"")) from None
    patch_shape = record.patch_shape
    trained_on = record.volume_shape
    if trained_on and tuple(trained_on) != tuple(image.shape):
        raise InputError(f"input grid {tuple(image.shape)} is not the grid the model was trained on "
                         f"{tuple(trained_on)} (preprocess it with the training config's grid)")
    if any(n < p for n, p in zip(image.shape, patch_shape)):
        raise InputError(f"input grid {tuple(image.shape)} is smaller than the model's patch {patch_shape}")
    settings = record.anatomy
    mode = settings.coarse_mode
    A = anat.anatomy_map_from_config(image, mask, settings) if anatomy is None else np.asarray(anatomy, np.float32)
    if coarse is None:
        coarse = anat.coarse_map(A, settings.coarse_factor, mode, patch_shape)
    expected = {"A": (A.shape, image.shape),
                "A_coarse": (coarse.shape, tuple(patch_shape) if mode == "global" else image.shape)}
    for name, (got, want) in expected.items():
        if tuple(got) != tuple(want):
            raise InputError(f"{name} has shape {tuple(got)}, expected {tuple(want)} (coarse mode {mode!r})")
    return Conditioning(A, np.asarray(coarse, np.float32), mode, patch_shape, target)


class GuidedDenoiser:
    """The U-Net as the sampler sees it: eps of the conditional branch (target label) and, under
    guidance, of the unconditional one (null label), run as one batch of 2n patches. The guidance
    maths itself is `sample.guided_noise`."""

    def __init__(self, model, record: ModelRecord, settings: HarmonizeConfig, device: str = "cpu"):
        self.device = torch.device(device)
        self.bf16 = settings.bf16
        self.memory_format = torch.channels_last_3d if settings.channels_last else torch.contiguous_format
        if settings.channels_last:
            model = model.to(memory_format=self.memory_format)
        self.model = torch.compile(model) if settings.compile else model
        self.branches = 1 if settings.guidance == "none" else 2
        self.prediction = record.prediction
        self.schedule = NoiseSchedule.linear(record.num_train_timesteps)
        self.seconds = 0.0  # time spent in the U-Net

    def eps_fn(self, A_b, C_b, target_label: int):
        """eps_fn(x_t, t) -> (eps_u or None, eps_c) for one batch of patches."""
        n, dev = len(A_b), self.device
        lab_c = torch.full((n,), target_label, dtype=torch.long, device=dev)
        lab_u = torch.full((n,), NULL_LABEL, dtype=torch.long, device=dev)
        fmt = lambda v: v.contiguous(memory_format=self.memory_format)  # noqa: E731

        def eps_fn(x, t):
            t0 = time.perf_counter()
            tt = torch.full((n * self.branches,), t, dtype=torch.long, device=dev)
            with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                if self.branches == 1:
                    eps_u, eps_c = None, self.model(fmt(x), tt, fmt(A_b), fmt(C_b), lab_c).float()
                else:
                    out = self.model(fmt(torch.cat([x, x])), tt, fmt(torch.cat([A_b, A_b])),
                                     fmt(torch.cat([C_b, C_b])), torch.cat([lab_u, lab_c])).float()
                    eps_u, eps_c = out[:n], out[n:]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            to_eps = self.schedule.eps_from_output
            return (None if eps_u is None else to_eps(eps_u, x, t, self.prediction), to_eps(eps_c, x, t, self.prediction))
        return eps_fn


def sample_volume(denoiser: GuidedDenoiser, cond: Conditioning, image: np.ndarray, mask: np.ndarray, positions,
                  settings: HarmonizeConfig, timesteps, seed: int, progress=None) -> np.ndarray:
    """Sample the patches at `positions` (settings.batch_size at a time) and fuse them with a Hann
    window; in model units. One noise field for the volume (from `seed`, the scan's), so overlapping
    patches start alike."""
    patch_shape = cond.patch_shape
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(int(seed)))
    source = torch.from_numpy(to_model_units(image, mask))
    dev = denoiser.device
    outputs = []
    for b in range(0, len(positions), settings.batch_size):
        corners = positions[b:b + settings.batch_size]
        A_b, C_b = cond.patches(corners, dev)
        x = stack_patches(noise, corners, patch_shape).to(dev)
        if settings.start_from == "source":
            x = denoiser.schedule.add_noise(stack_patches(source, corners, patch_shape).to(dev), x, timesteps[0])
        n = len(corners)
        x0 = smp.sample_ddim(denoiser.eps_fn(A_b, C_b, cond.target_label), x, denoiser.schedule, timesteps,
                             guidance=settings.guidance, scale=settings.scale,
                             progress=None if progress is None else (lambda k, n=n: progress(k * n)))
        sampled = x0[:, 0].float().cpu().numpy()
        if settings.match_source_stats:
            sampled = [match_source_stats(x, extract(source.numpy(), c, patch_shape), extract(mask, c, patch_shape))
                       for x, c in zip(sampled, corners)]
        outputs.extend(sampled)
    return fuse(outputs, positions, image.shape, hann_window(patch_shape))


# brain medians a preprocessed scan may have: exactly MEDIAN_TARGET after preprocessing; a little
# room for a scan written by another tool in the same units
PREPROCESSED_MEDIAN = (0.8 * MEDIAN_TARGET, 1.25 * MEDIAN_TARGET)


def harmonize_array(model, record: ModelRecord, image: np.ndarray, mask: np.ndarray, target_site: str,
                    settings: HarmonizeConfig, *, seed: int | None = None, device: str = "cpu",
                    anatomy: np.ndarray | None = None, coarse: np.ndarray | None = None, min_overlap: float = 0.5,
                    progress: bool = False) -> tuple[np.ndarray, dict]:
    """Harmonized image (brain-median-500 units, background 0) and timing statistics.

    `settings` is the harmonize section whole (guidance, steps, start, batch; `bf16`, `channels_last`
    and `compile` change only speed and rounding, tested within tolerance of fp32; `match_source_stats`
    applies `match_source_stats` to each sampled patch before fusion). `seed` is the scan's noise seed
    (`scan_seed`; settings.seed when not given). `anatomy` and `coarse` are A and A_coarse as the
    anatomy stage wrote them (computed here when not given)."""
    from tqdm import tqdm

    t_all = time.perf_counter()
    schedule_length = record.num_train_timesteps
    if not 1 <= settings.steps <= schedule_length:
        raise InputError(f"steps must be in 1..{schedule_length} (the model's noise schedule), got {settings.steps}")
    cond = conditioning(record, image, mask, target_site, anatomy, coarse)
    denoiser = GuidedDenoiser(model, record, settings, device)
    strength = settings.strength if settings.start_from == "source" else 1.0
    timesteps = denoiser.schedule.ddim_timesteps(settings.steps, strength)
    positions = grid_positions(image.shape, cond.patch_shape, min_overlap)
    passes = len(positions) * len(timesteps)
    with tqdm(total=passes, desc=f"harmonize -> {target_site}", disable=not progress) as bar:
        fused = sample_volume(denoiser, cond, image, mask, positions, settings, timesteps,
                              settings.seed if seed is None else seed, progress=bar.update)
    stats = {"patches": len(positions), "steps": len(timesteps), "unet_passes": passes * denoiser.branches,
             "unet_seconds": denoiser.seconds, "total_seconds": time.perf_counter() - t_all}
    return from_model_units(fused, mask), stats


def check_preprocessed(path, image: np.ndarray, mask: np.ndarray) -> None:
    """The input must be in preprocessed units (`intensity.median_normalize`: brain median 500,
    nothing negative): a raw or otherwise scaled scan would be read by the model as some other
    contrast and still come out brain-like."""
    if not mask.any():
        raise InputError(f"{path}: the brain mask is empty")
    brain = image[mask]
    median, low = float(np.median(brain)), float(brain.min())
    if low < 0 or not PREPROCESSED_MEDIAN[0] <= median <= PREPROCESSED_MEDIAN[1]:
        raise InputError(f"{path}: does not look preprocessed: brain median {median:.4g} and minimum {low:.4g}, "
                         f"but preprocessing gives a median of {MEDIAN_TARGET:g} and nothing negative "
                         "(run harmodiff.preprocess on the raw scan first)")


def check_voxel_size(path, zooms, trained_mm, checkpoint) -> None:
    """The input's voxels (`zooms`, mm) must be the training grid's (a same-shaped grid at another spacing
    would pass the shape check and be harmonized at the wrong scale)."""
    if not trained_mm:
        return  # checkpoints from before the voxel size was recorded
    zooms = [float(z) for z in zooms[:3]]
    if not np.allclose(zooms, trained_mm, atol=1e-3):
        raise InputError(f"{path}: voxels of {'x'.join(f'{z:g}' for z in zooms)} mm, but {checkpoint} was trained "
                         f"on {'x'.join(f'{z:g}' for z in trained_mm)} mm (preprocess it with the training grid)")


def provenance(args, settings: HarmonizeConfig, noise_seed: int, stats: dict) -> dict:
    """What a harmonized image was made from (the job's files, `args`) and with (one run's settings):
    the BIDS sidecar's content."""
    from harmodiff import __version__

    return {"harmodiff_version": __version__, "checkpoint": str(args.checkpoint),
            "checkpoint_sha256": file_sha256(args.checkpoint), "source": str(args.input),
            "target_site": args.target_site,
            "learned_site": None if not args.learned_site else {
                "path": str(args.learned_site), "sha256": file_sha256(args.learned_site)},
            "guidance": settings.guidance, "guidance_scale": settings.scale,
            "steps": settings.steps, "start_from": settings.start_from,
            "strength": settings.strength if settings.start_from == "source" else None,
            "seed": settings.seed, "noise_seed": noise_seed, "seed_key": args.seed_key,
            "unet_passes": stats["unet_passes"], "ema": not args.no_ema, "bf16": settings.bf16,
            "match_source_stats": settings.match_source_stats, "preprocessing": _preprocessing_record(args.input)}


def _preprocessing_record(image) -> dict | None:
    """The preprocessing's own record of the input (skull stripper, weights' sha256, self-check
    measures), from the JSON next to it, so a harmonized image names everything it came from."""
    sidecar = json_sidecar(image)
    try:
        return json.loads(sidecar.read_text()) if sidecar.is_file() else None
    except json.JSONDecodeError:
        raise InputError(f"{sidecar}: not valid JSON (the preprocessing record of {image})") from None


def scan_seed(seed: int, key: str) -> int:
    """The noise seed of one scan: a hash of the run seed and the scan's id, so every scan draws
    its own noise field (with one shared seed, two noisy outputs share one noise pattern and
    look alike across sites) and the same scan always draws the same one."""
    import hashlib

    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


RUN_COLUMNS = ("main_output", "output", "guidance", "scale", "seed")


def extra_runs(output: str, settings: HarmonizeConfig, runs: pd.DataFrame | None) -> list[tuple[str, HarmonizeConfig]]:
    """The job's harmonizations as (output, settings): its own, then each row of the runs manifest whose
    main_output is this job's output, the job's settings with that row's guidance, scale and seed (an
    empty value keeps the job's)."""
    jobs = [(output, settings)]
    rows = [] if runs is None else runs[runs["main_output"] == output].to_dict("records")
    where = "" if runs is None else runs.attrs.get("path", "runs manifest")
    for row in rows:
        try:
            changed = {k: kind(row[k]) for k, kind in (("guidance", str), ("scale", float), ("seed", int)) if row[k]}
        except ValueError:
            raise InputError(f"{where}: run {row['output']}: scale {row['scale']!r} must be a number and seed "
                             f"{row['seed']!r} an integer") from None
        try:  # replace checks the run's settings under the job's rules (a known guidance, finite scale, seed range)
            jobs.append((row["output"], dataclasses.replace(settings, **changed)))
        except ConfigError as exc:
            raise InputError(f"{where}: run {row['output']}: {exc}") from None
    outputs = [o for o, _ in jobs]
    if len(set(outputs)) < len(outputs):
        raise InputError(f"two harmonizations would write one file: {sorted(o for o in outputs if outputs.count(o) > 1)[0]}")
    return jobs


@one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.harmonize", description="Harmonize a scan to a target site.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="preprocessed scan (working grid)")
    p.add_argument("--mask", required=True)
    p.add_argument("--target-site", required=True)
    p.add_argument("--learned-site", help="a site learned for this checkpoint (harmodiff.sites learn): "
                   "--target-site may then name it")
    p.add_argument("--output", required=True)
    p.add_argument("--config", help="settings file (its harmonize section: the workflow's "
                   "results/config/harmonize.yaml, or a workflow config); the options below override it")
    add_setting_options(p, HarmonizeConfig)
    p.add_argument("--seed-key", help="a scan id: the noise seed becomes scan_seed(seed, key), one per scan")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--anatomy", help="A of the input as the anatomy stage wrote it (else computed here)")
    p.add_argument("--coarse", help="A_coarse of the input as the anatomy stage wrote it (with --anatomy)")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw weights instead of the EMA copy")
    p.add_argument("--native", action="store_true", help="also write the result in the scan's native space")
    p.add_argument("--native-reference", help="the raw scan (native grid), with --native")
    p.add_argument("--transform", help="the preprocessing's *_to_mni.mat, with --native")
    p.add_argument("--native-output", help="with --native")
    add_manifest_option(p, RUN_COLUMNS, option="--runs", required=False, may_be_empty=("guidance", "scale", "seed"),
                        help="more harmonizations of the scan under one model load (the guidance sweep, other run "
                        "seeds): the rows whose main_output is --output; an empty guidance, scale or seed is this job's")
    a = p.parse_args(argv)
    from harmodiff.model import load_model_for_inference
    from harmodiff.sites import LearnedSite, with_learned_site

        # the settings in force (file, then options), as the rest and the provenance read them; threads
        # only when given (else torch's default)
    settings = load_settings(HarmonizeConfig, a.config, a)
    if a.threads:
        torch.set_num_threads(a.threads)
    runs = extra_runs(a.output, settings, a.runs)
    outputs = [o for o, _ in runs]
    if a.native and not (a.native_reference and a.transform and a.native_output):
        raise InputError("--native needs --native-reference, --transform and --native-output")
    sidecars = [json_sidecar(o) for o in outputs]
    with outputs_together([*outputs, *sidecars, a.native_output if a.native else None],
                          inputs=[a.checkpoint, a.learned_site, a.input, a.mask, a.anatomy, a.coarse, a.native_reference,
                                  a.transform]):
        img = load_image(a.input)
        mask = load_mask(a.mask, like=img)
        image = np.asarray(img.dataobj, np.float32)
        check_preprocessed(a.input, image, mask)
        if bool(a.anatomy) != bool(a.coarse):
            raise InputError("--anatomy and --coarse go together")
        maps = {}
        if a.anatomy:
            maps = {"anatomy": np.asarray(load_image(a.anatomy).dataobj, np.float32),
                    "coarse": np.asarray(load_image(a.coarse).dataobj, np.float32)}
        model, record = load_model_for_inference(a.checkpoint, a.device, use_ema=not a.no_ema)
        if a.learned_site:
            model, record = with_learned_site(model, record, LearnedSite.load(a.learned_site, a.checkpoint))
        check_voxel_size(a.input, img.header.get_zooms(), record.voxel_mm, a.checkpoint)
        if a.anatomy:
            anat.check_settings(a.anatomy, record.anatomy, a.checkpoint)
        for k, (output, run) in enumerate(runs):
            seed = run.seed if a.seed_key is None else scan_seed(run.seed, a.seed_key)
            out, stats = harmonize_array(model, record, image, mask, a.target_site, run, seed=seed,
                                         device=a.device, progress=True, **maps)
            save_image(out, img.affine, output, header=img.header)
            write_json(provenance(a, run, seed, stats), json_sidecar(output))
            print(output, {k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()})
            if k == 0 and a.native:  # the main run only
                to_native(nib.Nifti1Image(out, img.affine, img.header), a.native_reference, a.transform,
                          a.native_output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
