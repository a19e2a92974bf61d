"""The paper's recipe against the project's fast recipe, one departure at a time, on the truth; and the
paper's two ambiguous points (A_coarse `local` vs `global`, anatomy in the cross-attention context).

    python benchmarks/recipes.py > benchmarks/recipes.md

Quality: every model is the learnability test's tiny network (tests/test_learnability.py) trained
on its 12 phantom subjects (sites A/B/C) for the same steps, batch and seed (equal training
compute: at this size attention over 64 tokens costs under 3 % of a pass), then the held-out
subject at site B is harmonized to A and scored against that subject rendered noise-free at A
(SSIM, PSNR, MAE inside the brain; GM and WM error: harmonized minus true median intensity over
voxels with GM or WM > 0.9, brain-median-500 units). "learnability checks" counts the test's own
assertions that hold (4: better than the source by 0.03 SSIM, sent to C is worse, WM near each
target, CFG++ lambda 0 != 1).

Cost: FLOPs at the paper's sizes (torch.utils.flop_counter on the meta device, a multiply-add is
2) of the recipe's network as config/srpbs.yaml or config/srpbs.yaml + config/srpbs-fast.yaml
build it: per harmonized 1 mm volume (27 patches of 80x96x80, two branches, the DDIM steps the
recipe runs) and per training step (batch 5, forward + backward).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from training_options import cohort, harmonize
from harmodiff import train as tr
from harmodiff.tables import markdown_table
from harmodiff.metrics import ssim_psnr
from harmodiff.model import ModelConfig, pass_flops
from harmodiff.diffusion import steps_run
from test_learnability import MODEL, TRAIN

PAPER_TRAIN = {"prediction": "eps", "lr": 1e-4, "warmup_steps": 0, "lr_decay": "none", "grad_clip": 0.0}
TRAININGS = {  # name: (TrainConfig overrides, ModelConfig overrides, AnatomyConfig overrides)
    "paper": (PAPER_TRAIN, {}, {}),
    "x0": ({}, {}, {}),  # the learnability test's recipe: x0, lr 2e-3, warm-up, decay, clipping
    "x0, cross-only": ({}, {"self_attention": False}, {}),
    "x0, A_coarse global": ({}, {}, {"coarse_mode": "global"}),
    "x0, anatomy tokens 2^3": ({}, {"anatomy_tokens_per_side": 2}, {}),
}
PAPER_SAMPLING = {"start_from": "noise", "steps": 50, "strength": 1.0}
FAST_SAMPLING = {"start_from": "source", "steps": 20, "strength": 0.5}
RECIPES = [  # (row, training, sampling, network at paper size: "paper" | "fast")
    ("paper's recipe (eps, Adam 1e-4 constant; self+cross; from noise, 50 steps)", "paper", PAPER_SAMPLING, "paper"),
    ("+ x0 target, lr 2e-3 with warm-up, decay, clipping", "x0", PAPER_SAMPLING, "paper"),
    ("+ cross-only attention (the authors' released network)", "x0, cross-only", PAPER_SAMPLING, "fast"),
    ("+ 20 DDIM steps from noise", "x0, cross-only", {**PAPER_SAMPLING, "steps": 20}, "fast"),
    ("+ from the source at strength 0.5 (10 of 20 steps): the fast recipe", "x0, cross-only", FAST_SAMPLING, "fast"),
    ("fast sampling on the self+cross x0 model", "x0", FAST_SAMPLING, "paper"),
    ("fast sampling on the paper-trained model", "paper", FAST_SAMPLING, "paper"),
]
AMBIGUOUS = [  # (row, training): both on the learnability test's recipe, sampled as the paper
    ("A_coarse local, anatomy by concatenation (the defaults)", "x0"),
    ("A_coarse global (the whole volume at patch size)", "x0, A_coarse global"),
    ("anatomy also in the cross-attention context (A_coarse as 2^3 tokens)", "x0, anatomy tokens 2^3"),
]
PATCHES_1MM = 27


def paper_networks() -> dict[str, ModelConfig]:
    paper = yaml.safe_load(open("config/srpbs.yaml"))["model"]
    fast = yaml.safe_load(open("config/srpbs-fast.yaml"))["model"]
    return {"paper": ModelConfig.from_dict(paper), "fast": ModelConfig.from_dict({**paper, **fast})}


def scores(image, truth, brain, maps) -> dict:
    s, p = ssim_psnr(image, truth, brain, brain)
    gm, wm = maps[1] > 0.9, maps[2] > 0.9
    return {"SSIM vs truth": s, "PSNR": p, "MAE": float(np.abs(image - truth)[brain].mean()),
            "GM error": float(np.median(image[gm]) - np.median(truth[gm])),
            "WM error": float(np.median(image[wm]) - np.median(truth[wm]))}


def learnability_checks(ckpt, source, brain, maps, sampling) -> int:
    """How many of tests/test_learnability.py's four assertions hold for this model and sampling."""
    from harmodiff import phantom

    truth_a = phantom.render(maps, brain, "A", noise=0)
    to_a = harmonize(ckpt, source, brain, **sampling)
    to_c = harmonize(ckpt, source, brain, target_site="C", **sampling)
    after = ssim_psnr(to_a, truth_a, brain, brain)[0]
    wm = maps[2] > 0.9
    near = all(abs(np.median(out[wm]) - np.median(phantom.render(maps, brain, site, noise=0)[wm]))
               < 0.35 * abs(np.median(phantom.render(maps, brain, site, noise=0)[wm]) - np.median(source[wm]))
               for out, site in ((to_a, "A"), (to_c, "C")))
    lam0 = harmonize(ckpt, source, brain, scale=0.0, **sampling)
    lam1 = harmonize(ckpt, source, brain, scale=1.0, **sampling)
    return sum([after > ssim_psnr(source, truth_a, brain, brain)[0] + 0.03,
                ssim_psnr(to_c, truth_a, brain, brain)[0] < after - 0.03, near,
                np.abs(lam1 - lam0)[brain].mean() > 20])


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=TRAIN.steps)
    p.add_argument("--workdir", default="/tmp/harmodiff_recipes")
    p.add_argument("--reuse", action="store_true", help="reuse models already trained in --workdir")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    volumes, maps, brain, source, truth = cohort()
    ckpts, minutes = {}, {}
    for name, (train_over, model_over, anatomy_over) in TRAININGS.items():
        out = Path(a.workdir) / name.replace(" ", "_").replace(",", "").replace("^", "")
        if not (a.reuse and (out / "checkpoint.pt").is_file()):
            tr.train(volumes, out, model_cfg=ModelConfig.from_dict({**MODEL.to_dict(), **model_over}),
                     cfg=tr.TrainConfig(**{**TRAIN.__dict__, **train_over, "steps": a.steps,
                                           "checkpoint_every": a.steps}),
                     patch_shape=(16, 16, 16), anatomy_cfg=anatomy_over or None, progress=False)
        ckpts[name] = out / "checkpoint.pt"
        minutes[name] = float(pd.read_csv(out / "loss.csv")["seconds"].iloc[-1]) / 60
        print(name, f"{minutes[name]:.1f} min", file=sys.stderr, flush=True)

    nets = paper_networks()
    forward = {k: pass_flops(c, (80, 96, 80)) for k, c in nets.items()}
    step_flops = {k: pass_flops(c, (80, 96, 80), batch=5, backward=True) for k, c in nets.items()}
    rows = [{"recipe": "source at B (no harmonization)", **scores(source, truth, brain, maps)}]
    for row, training, sampling, net in RECIPES:
        executed = steps_run(sampling["steps"], sampling["strength"])
        volume = PATCHES_1MM * executed * 2 * forward[net]
        rows.append({"recipe": row, "training minutes": minutes[training],
                     **scores(harmonize(ckpts[training], source, brain, **sampling), truth, brain, maps),
                     "learnability checks (of 4)": learnability_checks(ckpts[training], source, brain, maps, sampling),
                     "PFLOP / 1 mm volume": volume / 1e15, "TFLOP / training step": step_flops[net] / 1e12})
        print(rows[-1], file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    paper_volume = table["PFLOP / 1 mm volume"].iloc[1]
    table["FLOP ratio vs paper (volume)"] = paper_volume / table["PFLOP / 1 mm volume"]
    ambiguous = [{"reading": row, "training minutes": minutes[t],
                  **scores(harmonize(ckpts[t], source, brain, **PAPER_SAMPLING), truth, brain, maps),
                  "learnability checks (of 4)": learnability_checks(ckpts[t], source, brain, maps, PAPER_SAMPLING)}
                 for row, t in AMBIGUOUS]

    print("# The paper's recipe and the fast recipe, one departure at a time (phantom truth, paper-size FLOPs)\n")
    print(f"Command: `python benchmarks/recipes.py --steps {a.steps} > benchmarks/recipes.md` (CPU, 2 threads, one "
          f"run). Tiny network ({', '.join(map(str, MODEL.channels))} channels), batch {TRAIN.batch_size}, 16^3 "
          f"patches, {a.steps} steps, seed 0 for every training; held-out subject B -> A, CFG++ 0.6. FLOPs: "
          f"the paper-size network of config/srpbs.yaml ({forward['paper'] / 1e12:.2f} TFLOP a pass) or with "
          f"config/srpbs-fast.yaml on top ({forward['fast'] / 1e12:.2f} TFLOP), {PATCHES_1MM} patches x DDIM "
          "steps run x 2 branches a 1 mm volume; a training step is batch 5, forward + backward.\n")
    print(markdown_table(table))
    print("\n## The paper's ambiguous points (the learnability test's recipe, sampled as the paper: noise, 50 steps)\n")
    print(markdown_table(pd.DataFrame(ambiguous)))


if __name__ == "__main__":
    main()
