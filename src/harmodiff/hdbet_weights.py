"""Small HD-BET 2 model folders trained here, in the layout HD-BET 2.0.1 loads.

HD-BET 2's real weights cannot be downloaded on these machines, so its code path (nnU-Net's
reading, reorientation, cropping, normalization, resampling, sliding-window prediction and the
export back onto the scan's grid) could otherwise never run. This module writes a model folder
HD-BET's own loader reads unchanged,

    <out>/dataset.json                 channels, labels (background, brain), file ending
    <out>/plans.json                   nnU-Net v2 plans: one 3d_fullres configuration
    <out>/fold_all/checkpoint_final.pth   trainer name, configuration, network_weights

with a small nnU-Net network (dynamic_network_architectures' PlainConvUNet, built by nnU-Net's
own `get_network_from_plans`), and trains it for a few hundred steps on scans whose brain masks
are known (the synthetic cohort's native-space truth). Each training case is prepared by
nnU-Net's own preprocessor with the same plans, so the network sees exactly what HD-BET's
prediction feeds it. The result is a coarse (4 mm) brain extractor, good enough for the
workflow's self-checks and for testing against the truth, not a substitute for the real weights.

    python -m harmodiff.hdbet_weights --cohort results/synthetic --out resources/hd-bet-tiny

Needs the `hd-bet` package (nnunetv2). Real weights: see README ("HD-BET weights").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from harmodiff.io import InputError, atomic_path, write_json

CONFIGURATION = "3d_fullres"
TRAINER = "nnUNetTrainer"


def dataset_json() -> dict:
    return {"channel_names": {"0": "T1"}, "labels": {"background": 0, "brain": 1}, "numTraining": 0,
            "file_ending": ".nii.gz"}


def plans(*, spacing: float = 4.0, patch_size=(64, 80, 64), features=(4, 8, 16)) -> dict:
    """nnU-Net v2 plans with one 3d_fullres configuration of a PlainConvUNet.

    The reader reorients every scan to RAS (and the writer back), so the network only ever sees
    one orientation; the patch covers a whole head at `spacing`, so prediction is one tile."""
    n = len(features)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": list(features),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    config = {
        "data_identifier": "harmodiff_tiny_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": list(patch_size), "median_image_size_in_voxels": list(patch_size),
        "spacing": [float(spacing)] * 3, "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": arch, "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset001_harmodiffTinyBET", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [float(spacing)] * 3,
        "original_median_shape_after_transp": list(patch_size),
        "image_reader_writer": "NibabelIOWithReorient", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2], "configurations": {CONFIGURATION: config},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": 0.0, "percentile_00_5": 0.0,
                  "percentile_99_5": 1.0, "std": 1.0}},
    }


def _network(plan: dict):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plan["configurations"][CONFIGURATION]["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  1, 2, allow_init=True, deep_supervision=False)


def _cases(scans, masks, plan: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each (scan, mask) pair through nnU-Net's own preprocessing, padded to the patch size."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plan)
    config = manager.get_configuration(CONFIGURATION)
    patch = np.array(config.patch_size)
    pre = DefaultPreprocessor(verbose=False)
    cases = []
    for scan, mask in zip(scans, masks):
        data, seg, _ = pre.run_case([str(scan)], str(mask), manager, config, dataset_json())
        shape = np.array(data.shape[1:])
        if (shape > patch).any():
            raise InputError(f"{scan}: {shape.tolist()} voxels at {config.spacing} mm exceed the patch {patch.tolist()}")
        lo = (patch - shape) // 2
        pad = [(0, 0)] + [(int(a), int(b)) for a, b in zip(lo, patch - shape - lo)]
        cases.append((np.pad(data, pad).astype(np.float32), np.pad(np.clip(seg, 0, 1), pad).astype(np.int64)))
    return cases


def train_tiny(scans, masks, out, *, steps: int = 300, seed: int = 0, lr: float = 3e-3, spacing: float = 4.0,
               patch_size=(64, 80, 64), features=(4, 8, 16), threads: int = 1, progress: bool = False) -> Path:
    """Train a small brain extractor on (scan, brain mask) NIfTI pairs; write an HD-BET 2 model folder."""
    import torch
    from tqdm import tqdm

    if len(scans) != len(masks) or not scans:
        raise InputError(f"need as many brain masks as scans (got {len(scans)} scans, {len(masks)} masks)")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    plan = plans(spacing=spacing, patch_size=patch_size, features=features)
    cases = _cases(scans, masks, plan)
    net = _network(plan)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    bar = tqdm(range(steps), disable=not progress, desc="tiny HD-BET", mininterval=5)
    for _ in bar:
        pick = rng.choice(len(cases), size=min(2, len(cases)), replace=False)
        x = torch.from_numpy(np.stack([cases[i][0] for i in pick]))
        y = torch.from_numpy(np.stack([cases[i][1][0] for i in pick]))
        logits = net(x)
        prob = logits.softmax(1)[:, 1]
        dice = 1 - (2 * (prob * y).sum() + 1) / (prob.sum() + y.sum() + 1)
        loss = torch.nn.functional.cross_entropy(logits, y) + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    out = Path(out)
    (out / "fold_all").mkdir(parents=True, exist_ok=True)
    write_json(dataset_json(), out / "dataset.json")
    write_json(plan, out / "plans.json")
    checkpoint = {"network_weights": net.state_dict(), "trainer_name": TRAINER,
                  "init_args": {"configuration": CONFIGURATION, "fold": "all"},
                  "inference_allowed_mirroring_axes": (0, 1, 2), "final_loss": loss.item()}
    with atomic_path(out / "fold_all" / "checkpoint_final.pth") as tmp:
        torch.save(checkpoint, tmp)
    return out


def cohort_pairs(cohort: Path, n: int | None = None) -> tuple[list[Path], list[Path]]:
    """(raw scans, native truth brain masks) of a synthetic cohort folder (harmodiff.synth's layout)."""
    import pandas as pd

    from harmodiff.synth import native_brain_mask

    sheet = Path(cohort) / "scans.tsv"
    if not sheet.is_file():
        raise InputError(f"{cohort}: not a synthetic cohort folder (no scans.tsv)")
    rows = pd.read_csv(sheet, sep="\t")
    rows = rows.head(n) if n else rows
    scans = [Path(cohort) / p for p in rows["path"]]
    masks = [native_brain_mask(cohort, s) for s in rows["scan_id"]]
    return scans, masks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.hdbet_weights", description=__doc__.split("\n")[0])
    p.add_argument("--cohort", required=True, type=Path, help="synthetic cohort folder (harmodiff.synth)")
    p.add_argument("--out", required=True, type=Path, help="model folder to write (HD-BET 2 layout)")
    p.add_argument("--scans", type=int, default=None, help="train on the first N scans of the sheet")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    try:
        scans, masks = cohort_pairs(a.cohort, a.scans)
        out = train_tiny(scans, masks, a.out, steps=a.steps, seed=a.seed, threads=a.threads,
                         progress=True)
    except InputError as e:
        p.exit(2, f"error: {e}\n")
    print(json.dumps({"out": str(out), "scans": len(scans)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
