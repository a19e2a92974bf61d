"""The paper's size run for real on this machine, through the project's `train` and `harmonize`
modules: a 1 mm 160x192x160 volume, 80x96x80 patches, the paper-size networks of
config/srpbs.yaml and config/srpbs.yaml + config/srpbs-fast.yaml.

    python benchmarks/paper_scale.py all > benchmarks/paper_scale.md

Each measurement runs in its own process (so its peak RSS, ru_maxrss, is its own) under a 22 GiB
address-space cap, on 2 torch threads; a run that does not fit is reported, not fatal.

* train-step: `harmodiff.train.train` for 2 steps (the paper's network: 1) on two 1 mm volumes
  (the MNI152 template at two contrasts), the recipe's training settings (batch as given, bf16 off:
  CPU), seconds of the second step from its loss.csv (the first pays for the first sample and the
  allocator). The sample is built in the loop (workers 0): ~3 s of it (benchmarks/sample_rate.md).
* harmonize: `harmodiff.harmonize.harmonize_array` on the 1 mm volume with the 27-patch grid:
  random weights (cost does not depend on them), the output checked finite, zero outside the brain,
  and exact fusion at this size checked separately (`fuse` of the volume's own 27 crops gives it back).
* Computed (no run): the activations a GPU training step at batch 5 keeps, with flash SDPA against
  the math path, and the sample rate an H200 needs (from the FLOPs).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

GRID = (160, 192, 160)
PATCH = (80, 96, 80)
CAP_GIB = 22
H200_TFLOPS = 790.0  # bf16 dense peak (benchmarks/model_cost.md)
SMALL = {"channels": [16, 32, 32, 64], "attention_levels": [False, False, True, False], "num_res_blocks": 1,
         "num_head_channels": 16, "context_dim": 64, "norm_num_groups": 8}  # the demo's network (config/config.yaml)


def recipe(name: str) -> tuple[dict, dict, dict]:
    """(model, train, harmonize) settings of config/srpbs.yaml (+ config/srpbs-fast.yaml for 'fast')."""
    from harmodiff.config import merge

    cfg = yaml.safe_load(open("config/srpbs.yaml"))
    if name == "fast":
        merge(cfg, yaml.safe_load(open("config/srpbs-fast.yaml")))
    return cfg["model"], cfg["train"], cfg["harmonize"]


def volume_1mm(log_gamma: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 template on the paper's working grid (1 mm, 160x192x160), median 500 in the brain."""
    from scipy import ndimage

    from harmodiff.intensity import median_normalize
    from harmodiff.templates import mni_images, working_grid

    images = mni_images()
    to_template = np.linalg.inv(images["t1"].affine) @ working_grid(1.0, GRID)
    t1, mask = (ndimage.affine_transform(np.asarray(images[k].dataobj, np.float32), to_template[:3, :3],
                                         to_template[:3, 3], output_shape=GRID, order=1) for k in ("t1", "mask"))
    brain = mask > 0.5
    image = median_normalize(t1, brain)
    if log_gamma:
        image = median_normalize(np.where(brain, (image / image.max()) ** np.exp(log_gamma), 0), brain)
    return image, brain


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train_step(recipe_name: str, batch: int, checkpointing: bool, self_attention: bool | None, steps: int) -> dict:
    from harmodiff import train as tr
    from harmodiff.model import ModelConfig

    model, train, _ = recipe(recipe_name)
    if self_attention is not None:
        model = {**model, "self_attention": self_attention}
    cfg = tr.TrainConfig.from_dict({**train, "steps": steps, "batch_size": batch, "bf16": False, "workers": 0,
                                    "checkpoint_every": 10, "activation_checkpointing": checkpointing})
    volumes = [tr.Volume(*volume_1mm(g), site) for g, site in ((0.0, "A"), (0.3, "B"))]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        tr.train(volumes, out, model_cfg=ModelConfig.from_dict(model), cfg=cfg, patch_shape=PATCH, progress=False)
        seconds = pd.read_csv(Path(out) / "loss.csv")["seconds"].to_numpy()
    return {"step s": float(seconds[-1] - seconds[-2]) if steps > 1 else float("nan"), "first step s": float(seconds[0]),
            "wall s": time.perf_counter() - t0, "peak RSS GiB": _peak_gib()}


def harmonize(network: str, steps: int, strength: float, batch_size: int) -> dict:
    from harmodiff.config import HarmonizeConfig
    from harmodiff.harmonize import harmonize_array
    from harmodiff.model import ModelConfig, ModelRecord, SiteLabels, build_model
    from harmodiff.patches import grid_positions

    model_settings = SMALL if network == "small" else recipe(network)[0]
    image, brain = volume_1mm()
    labels = SiteLabels(["A", "B"], [0.0])
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(model_settings), labels.num_embeddings).eval()
    record = ModelRecord({"patch_shape": list(PATCH), "train": {"num_train_timesteps": 1000, "prediction": "x0"},
                          "anatomy": {}}, labels, volume_shape=tuple(GRID), voxel_mm=(1.0,) * 3)
    t0 = time.perf_counter()
    settings = HarmonizeConfig(guidance="cfgpp", scale=0.6, steps=steps, start_from="source" if strength < 1 else "noise",
                               strength=strength, batch_size=batch_size, seed=0)
    out, stats = harmonize_array(model, record, image, brain, "A", settings)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "patches": len(grid_positions(GRID, PATCH)), "U-Net passes": stats["unet_passes"],
            "patches per forward": 2 * batch_size, "finite": bool(np.isfinite(out).all()),
            "zero outside the brain": bool((out[~brain] == 0).all()), "peak RSS GiB": _peak_gib()}


def exact_fusion() -> dict:
    """fuse() of a 1 mm volume's own 27 crops returns it (Hann weights, border floor): max error."""
    from harmodiff.patches import fuse, grid_positions, hann_window

    image, _ = volume_1mm()
    positions = grid_positions(GRID, PATCH)
    crops = [image[tuple(slice(p, p + s) for p, s in zip(pos, PATCH))] for pos in positions]
    fused = fuse(crops, positions, GRID, hann_window(PATCH))
    return {"patches": len(positions), "max |fused - volume|": float(np.abs(fused - image).max())}


def activation_memory(batch: int = 5) -> list[dict]:
    """What autograd keeps for the backward pass of one training step at `batch` (fp32), counted on
    the meta device with saved_tensors_hooks. There SDPA runs its math path, which keeps every
    (tokens x tokens) score matrix; flash / memory-efficient SDPA (CUDA, and torch's CPU flash
    kernel) keeps only O(tokens) per head instead, so the flash figure is the total less those."""
    from harmodiff.model import ModelConfig, build_model

    rows = []
    for name in ("paper", "fast"):
        model_settings = recipe(name)[0]
        tokens = {int(np.prod(np.array(PATCH) // 2 ** level)) for level in range(len(model_settings["channels"]))}
        kept = {"all": 0, "scores": 0}

        def pack(t, kept=kept, tokens=tokens):
            size = t.numel() * t.element_size()
            kept["all"] += size
            if t.dim() >= 2 and t.shape[-1] == t.shape[-2] and t.shape[-1] in tokens:
                kept["scores"] += size
            return t
        with torch.device("meta"):
            model = build_model(ModelConfig.from_dict(model_settings), 91)
            x = torch.randn(batch, 1, *PATCH)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(x, torch.full((batch,), 10), x, x, torch.ones(batch, dtype=torch.long))
        rows.append({"recipe": name, "batch": batch, "math path GiB (fp32)": kept["all"] / 2**30,
                     "of which score matrices GiB": kept["scores"] / 2**30,
                     "flash SDPA GiB (fp32)": (kept["all"] - kept["scores"]) / 2**30,
                     "flash SDPA GiB (bf16 autocast, ~half)": (kept["all"] - kept["scores"]) / 2**31})
    return rows


def child(argv: list[str]) -> dict:
    """Run one measurement in a fresh process under the address-space cap; its JSON or its failure."""
    cap = CAP_GIB * 2**30
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1][:160]
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"result": f"failed (exit {proc.returncode}): {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


TRAIN_RUNS = [  # (recipe, batch, activation checkpointing, steps): the paper's self+cross step once (~15 min)
    ("fast", 1, False, 2), ("fast", 1, True, 2), ("paper", 1, True, 1),
]
HARMONIZE_RUNS = [  # (network, DDIM steps, strength, patches per batch)
    ("small", 4, 0.5, 4),
]


def main_all(a) -> None:
    from harmodiff.tables import markdown_table
    from harmodiff.model import pass_flops
    from harmodiff.diffusion import steps_run

    train_rows = []
    for name, batch, ckpt, steps in TRAIN_RUNS:
        argv = ["train-step", "--recipe", name, "--batch", str(batch), "--steps", str(steps)] + \
            (["--checkpointing"] if ckpt else [])
        result = child(argv)
        model = recipe(name)[0]
        train_rows.append({"recipe": name, "self-attention": model["self_attention"], "batch": batch,
                           "activation checkpointing": ckpt, **result})
        print(train_rows[-1], file=sys.stderr, flush=True)
    harmonize_rows = []
    for network, steps, strength, batch_size in HARMONIZE_RUNS:
        result = child(["harmonize", "--network", network, "--steps", str(steps), "--strength", str(strength),
                        "--batch-size", str(batch_size)])
        harmonize_rows.append({"network": network, "DDIM schedule": steps, "strength": strength, **result})
        print(harmonize_rows[-1], file=sys.stderr, flush=True)
    fusion = child(["fusion"])
    cost = []
    for name in ("paper", "fast"):
        model, train, sampling = recipe(name)
        fwd = pass_flops(model, PATCH)
        step = pass_flops(model, PATCH, batch=5, backward=True)
        executed = steps_run(sampling["steps"], sampling["strength"])
        volume = 27 * executed * 2 * fwd
        cost.append({"recipe": name, "forward TFLOP / patch": fwd / 1e12, "training step TFLOP (batch 5)": step / 1e12,
                     "H200 step s at peak": step / (H200_TFLOPS * 1e12),
                     "samples / s the H200 needs at peak": 5 / (step / (H200_TFLOPS * 1e12)),
                     "... at 40 % of peak": 0.4 * 5 / (step / (H200_TFLOPS * 1e12)),
                     "PFLOP / 1 mm volume": volume / 1e15, "H200 s / volume at peak": volume / (H200_TFLOPS * 1e12)})
    print("# The paper's size on this machine (2 cores, 24 GiB, CPU)\n")
    print("Command: `python benchmarks/paper_scale.py all > benchmarks/paper_scale.md` (one run; each row a fresh "
          f"process with a {CAP_GIB} GiB address-space cap, 2 torch threads). 1 mm grid "
          f"{'x'.join(map(str, GRID))}, patches {'x'.join(map(str, PATCH))}.\n")
    print("## One training step, through `harmodiff.train.train`\n")
    print(markdown_table(pd.DataFrame(train_rows)))
    print("\n## Harmonization of a 1 mm volume, through `harmodiff.harmonize.harmonize_array`\n")
    print(markdown_table(pd.DataFrame(harmonize_rows)))
    print(f"\nExact fusion at this size: the {fusion.get('patches')} crops of the 1 mm volume fused with the Hann "
          f"weights give it back to {fusion.get('max |fused - volume|', float('nan')):.2e} (max abs, brain median 500).\n")
    print("## Computed: FLOPs (torch.utils.flop_counter, meta device) and what an H200 needs\n")
    print(markdown_table(pd.DataFrame(cost)))
    print("\n## Computed: activations a batch-5 training step keeps for its backward pass\n")
    print(markdown_table(pd.DataFrame(activation_memory())))


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("all")
    t = sub.add_parser("train-step")
    t.add_argument("--recipe", choices=("paper", "fast"), required=True)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--checkpointing", action="store_true")
    t.add_argument("--self-attention", choices=("true", "false"))
    t.add_argument("--steps", type=int, default=2)
    h = sub.add_parser("harmonize")
    h.add_argument("--network", choices=("small", "paper", "fast"), required=True)
    h.add_argument("--steps", type=int, default=1)
    h.add_argument("--strength", type=float, default=1.0)
    h.add_argument("--batch-size", type=int, default=4)
    sub.add_parser("fusion")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    if a.cmd == "all":
        main_all(a)
        return
    if a.cmd == "train-step":
        sa = None if a.self_attention is None else a.self_attention == "true"
        result = train_step(a.recipe, a.batch, a.checkpointing, sa, a.steps)
    elif a.cmd == "harmonize":
        result = harmonize(a.network, a.steps, a.strength, a.batch_size)
    else:
        result = exact_fusion()
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
