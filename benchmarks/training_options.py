"""Training options against CPU minutes and the truth, on the phantom population; and what breaking
each part of the method does to the learnability test.

    python benchmarks/training_options.py [--steps N] > benchmarks/training_options.md

Every option trains the learnability test's tiny model (tests/test_learnability.py) on the 12
phantom subjects (harmodiff.phantom, sites A/B/C) for the same number of steps from the same
seed, then harmonizes the held-out subject from site B to site A (from noise, 10 DDIM steps,
CFG++ 0.6) and scores it against the subject rendered noise-free at A: SSIM, PSNR, MAE inside the
brain (brain-median-500 units), and WM error (median over voxels with WM > 0.9). Loss is the mean
of the last 10 % of steps in the run's own target (not comparable across targets). The ablations
harmonize with the default model while one part is broken on purpose. One run, 2 CPU threads:
compare minutes within the table, not with other machines.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harmodiff import harmonize as hz  # noqa: E402
from harmodiff import model as md  # noqa: E402
from harmodiff import phantom  # noqa: E402
from harmodiff import train as tr  # noqa: E402
from harmodiff.config import HarmonizeConfig  # noqa: E402
from harmodiff.diffusion import NoiseSchedule  # noqa: E402
from harmodiff.tables import markdown_table  # noqa: E402
from harmodiff.metrics import ssim_psnr  # noqa: E402
from harmodiff.model import ModelConfig  # noqa: E402
from test_learnability import HELD_OUT, MODEL, TRAIN  # noqa: E402

BASE = {"prediction": "eps", "lr": 1e-4, "warmup_steps": 0, "lr_decay": "none", "grad_clip": 0.0}
OPTIONS = {  # overrides of the learnability test's TrainConfig
    "eps, Adam 1e-4 constant (the paper's)": BASE,
    "eps, lr 2e-3 warm-up + decay + clip": {"prediction": "eps"},
    "eps + min-SNR-5, lr 2e-3 warm-up + decay + clip": {"prediction": "eps", "loss_weighting": "min_snr"},
    "v, lr 2e-3 warm-up + decay + clip": {"prediction": "v"},
    "v + min-SNR-5, lr 2e-3 warm-up + decay + clip": {"prediction": "v", "loss_weighting": "min_snr"},
    "x0, lr 2e-3 constant, no clip": {"lr_decay": "none", "warmup_steps": 0, "grad_clip": 0.0},
    "x0, lr 2e-3 warm-up + decay + clip (the test's)": {},
    "x0 + min-SNR-5, lr 2e-3 warm-up + decay + clip": {"loss_weighting": "min_snr"},
    "x0 as tested, no self-attention (site token only)": {"model": {"self_attention": False}},
}


def cohort():
    volumes = []
    for k in range(12):
        site = "ABC"[k // 4]
        maps, brain = phantom.subject_maps(k)
        volumes.append(tr.Volume(phantom.render(maps, brain, site, seed=k), brain, site))
    maps, brain = phantom.subject_maps(HELD_OUT)
    return volumes, maps, brain, phantom.render(maps, brain, "B", seed=HELD_OUT), phantom.render(maps, brain, "A", noise=0)


def scores(image, truth, brain, wm) -> dict:
    s, p = ssim_psnr(image, truth, brain, brain)
    return {"SSIM vs truth": s, "PSNR": p, "MAE": float(np.abs(image - truth)[brain].mean()),
            "WM error": float(np.median(image[wm]) - np.median(truth[wm]))}


def harmonize(ckpt, source, brain, target_site="A", **kw):
    model, record = md.load_model_for_inference(ckpt)
    settings = HarmonizeConfig(guidance="cfgpp", scale=0.6, steps=10, batch_size=27, start_from="noise", seed=0)
    return hz.harmonize_array(model, record, source, brain, target_site, replace(settings, **kw))[0]


@contextmanager
def broken(part: str):
    """One part of the method made wrong on purpose."""
    if part == "conditioning: the site label is ignored (every label -> null)":
        real = md.load_model_for_inference

        def null_labels(*a, **k):
            model, record = real(*a, **k)
            with torch.no_grad():
                model.site_embedding.weight[:] = model.site_embedding.weight[0]
            return model, record
        with mock.patch.object(md, "load_model_for_inference", null_labels):
            yield
    elif part == "noise schedule: sampling with a cosine schedule (trained linear)":
        from monai.networks.schedulers import DDPMScheduler

        cosine = NoiseSchedule(DDPMScheduler(num_train_timesteps=1000, schedule="cosine").alphas_cumprod.clone())
        with mock.patch.object(NoiseSchedule, "linear", lambda T=1000: cosine):
            yield
    elif part == "sampler: the x0 output read as eps":
        with mock.patch.object(NoiseSchedule, "eps_from_output", lambda self, out, x, t, p="eps": out):
            yield
    elif part == "fusion: each patch placed at its neighbour's position":
        real = hz.fuse
        with mock.patch.object(hz, "fuse", lambda patches, pos, shape, w: real(patches, pos[1:] + pos[:1], shape, w)):
            yield
    else:
        raise ValueError(part)


ABLATIONS = ["conditioning: the site label is ignored (every label -> null)",
             "noise schedule: sampling with a cosine schedule (trained linear)",
             "sampler: the x0 output read as eps", "fusion: each patch placed at its neighbour's position"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=TRAIN.steps)
    p.add_argument("--options", nargs="+", default=list(OPTIONS))
    p.add_argument("--workdir", default="/tmp/harmodiff_training_options")
    p.add_argument("--reuse", action="store_true", help="reuse models already trained in --workdir (minutes from their loss.csv)")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    volumes, maps, brain, source, truth = cohort()
    wm = maps[2] > 0.9
    rows = [{"option": "source at B (no harmonization)", "minutes": 0.0, "final loss": np.nan,
             **scores(source, truth, brain, wm)}]
    default_ckpt = None
    for name in a.options:
        overrides = dict(OPTIONS[name])
        model_cfg = ModelConfig.from_dict({**MODEL.to_dict(), **overrides.pop("model", {})})
        cfg = tr.TrainConfig(**{**TRAIN.__dict__, **overrides, "steps": a.steps, "checkpoint_every": a.steps})
        out = Path(a.workdir) / f"option{list(OPTIONS).index(name)}"
        if not (a.reuse and (out / "checkpoint.pt").is_file()):
            tr.train(volumes, out, model_cfg=model_cfg, cfg=cfg, patch_shape=(16, 16, 16), progress=False)
        log = pd.read_csv(out / "loss.csv")
        minutes, losses = float(log["seconds"].iloc[-1]) / 60, log["loss"].to_numpy()
        rows.append({"option": name, "minutes": minutes, "final loss": float(losses[-max(1, len(losses) // 10):].mean()),
                     **scores(harmonize(out / "checkpoint.pt", source, brain), truth, brain, wm)})
        print(rows[-1], file=sys.stderr, flush=True)
        if OPTIONS[name] == {}:
            default_ckpt = out / "checkpoint.pt"
    ablations = []
    if default_ckpt is not None:
        ablations.append({"harmonization": "as tested", **scores(harmonize(default_ckpt, source, brain), truth, brain, wm)})
        for part in ABLATIONS:
            with broken(part):
                ablations.append({"harmonization": part, **scores(harmonize(default_ckpt, source, brain), truth, brain, wm)})
            print(ablations[-1], file=sys.stderr, flush=True)
    print("# Training options vs the truth (phantom population, held-out subject B -> A)\n")
    print(f"Command: `python benchmarks/training_options.py --steps {a.steps}`. Tiny model "
          f"({', '.join(map(str, MODEL.channels))} channels), batch {TRAIN.batch_size}, 16^3 patches, {a.steps} steps, "
          "same seed; harmonized from noise, 10 DDIM steps, CFG++ 0.6. CPU, 2 threads, one run. WM error: "
          "harmonized minus true median WM intensity at A (the source's is "
          f"{np.median(source[wm]) - np.median(truth[wm]):.0f}).\n")
    print(markdown_table(pd.DataFrame(rows)))
    if ablations:
        print("\n## The learnability test's model with one part broken\n")
        print(markdown_table(pd.DataFrame(ablations)))


if __name__ == "__main__":
    main()
