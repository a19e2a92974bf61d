"""GPU timings of the two recipes at the paper's size: one training step (batch 5) and one
harmonization of a 1 mm volume (27 patches of 80x96x80, CFG++), under each speed option.

    python benchmarks/gpu_timing.py > benchmarks/gpu_timing.md            # on a GPU machine
    python benchmarks/gpu_timing.py --tiny                                # CPU smoke run (tiny sizes)

The recipes: `paper` is config/srpbs.yaml (self+cross attention, 50 DDIM steps from noise);
`fast` is config/srpbs-fast.yaml on top of it (cross-only attention, 10 of 20 steps from the
noised source). Random weights (timing does not depend on them), a random volume on the paper's
grid. Each row is timed after one warm-up call; harmonization rows run the real
`harmonize_array`; peak memory is torch.cuda.max_memory_allocated over the row. The FLOP bound is
the recipe's FLOPs (torch.utils.flop_counter) at --peak-tflops. `--tiny` swaps in a tiny network,
a 32x40x32 grid, 2 DDIM steps and fp32 (with and without channels-last) so the script itself is
tested on CPU.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
import yaml

from harmodiff.config import HarmonizeConfig
from harmodiff.diffusion import steps_run
from harmodiff.tables import markdown_table
from harmodiff.harmonize import harmonize_array
from harmodiff.patches import grid_positions
from harmodiff.model import ModelConfig, ModelRecord, SiteLabels, build_model, pass_flops

TINY = {"channels": [8, 16, 16, 16], "attention_levels": [False, False, True, False], "num_res_blocks": 1,
        "num_head_channels": 8, "context_dim": 16, "norm_num_groups": 8, "time_embed_dim": None,
        "bottleneck_attention": True}
H200_BF16_DENSE_TFLOPS = 790.0  # NVIDIA's H100/H200 SXM bf16 dense peak (the bound of benchmarks/model_cost.md)


def recipes(tiny: bool) -> dict[str, tuple[dict, dict]]:
    """name -> (model settings, harmonize settings) of config/srpbs.yaml and srpbs.yaml + srpbs-fast.yaml."""
    paper = yaml.safe_load(open("config/srpbs.yaml"))
    fast = yaml.safe_load(open("config/srpbs-fast.yaml"))
    out = {}
    for name, over in (("paper", {}), ("fast", fast)):
        model = {**paper["model"], **over.get("model", {})}
        sampling = {k: {**paper["harmonize"], **over.get("harmonize", {})}[k] for k in ("start_from", "steps", "strength")}
        if tiny:
            model = {**TINY, "self_attention": model["self_attention"]}
            sampling["steps"] = 2 if sampling["start_from"] == "noise" else 4
        out[name] = (model, sampling)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_seconds(model, patch, batch, device, bf16, channels_last, repeats):
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, *patch, device=device).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,), device=device)
    labels = torch.ones(batch, dtype=torch.long, device=device)

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, x, x, labels)
        loss = (out.float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                   help="the accelerator's dense bf16 peak, for the FLOP bound column")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    grid, patch = ((32, 40, 32), (16, 24, 16)) if a.tiny else ((160, 192, 160), (80, 96, 80))
    labels = SiteLabels(["A", "B"], [0.0])
    record = ModelRecord({"patch_shape": list(patch), "train": {"num_train_timesteps": 1000}, "anatomy": {}}, labels)
    rng = np.random.default_rng(0)
    image = np.zeros(grid, np.float32)
    mask = np.zeros(grid, bool)
    sl = tuple(slice(n // 8, n - n // 8) for n in grid)
    mask[sl] = True
    image[sl] = rng.uniform(200, 800, mask[sl].shape)
    rows = []
    for recipe, (model_settings, sampling) in recipes(a.tiny).items():
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_dict(model_settings), labels.num_embeddings)
        executed = steps_run(sampling["steps"], sampling["strength"])
        bound = len(grid_positions(grid, patch)) * executed * 2 * pass_flops(model.config, patch) / (a.peak_tflops * 1e12)
        for bf16, channels_last, compile_ in ((False, False, False), (True, False, False), (True, True, False),
                                              (True, True, True)):
            if a.tiny and (compile_ or bf16 != channels_last):
                # CPU smoke run: bf16 3-D convolutions and inductor take minutes on 2 cores (both paths are
                # tested in test_harmonize); the tiny run keeps fp32 and channels-last, bf16 off
                continue
            bf16 = bf16 and not a.tiny
            name = {"recipe": recipe, "self-attention": model.config.self_attention, "bf16": bf16,
                    "channels_last": channels_last, "compile": compile_}
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                net = torch.compile(model) if compile_ else model
                train_s = train_step_seconds(net, patch, 5, device, bf16, channels_last, repeats=1 if a.tiny else 5)
                train_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                model.eval()
                settings = HarmonizeConfig(guidance="cfgpp", scale=0.6, batch_size=4, bf16=bf16,
                                           channels_last=channels_last, compile=compile_, **sampling)
                harmonize_array(model, record, image, mask, "A", replace(settings, steps=1, strength=1.0),
                                device=a.device)
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                _, stats = harmonize_array(model, record, image, mask, "A", settings, device=a.device)
                sync(device)
                seconds = time.perf_counter() - t0
                rows.append({**name, "train step s (batch 5)": train_s, "train peak GiB": train_gib,
                             "harmonize s / volume": seconds, "FLOP bound s": bound,
                             "harmonize peak GiB": torch.cuda.max_memory_allocated(device) / 2**30
                             if device.type == "cuda" else float("nan"), "U-Net passes": stats["unet_passes"]})
            except Exception as exc:  # an OOM or a compile failure is a result, not a crash
                rows.append({**name, "train step s (batch 5)": f"failed: {type(exc).__name__}: {str(exc)[:80]}",
                             "train peak GiB": "", "harmonize s / volume": "", "FLOP bound s": bound,
                             "harmonize peak GiB": "", "U-Net passes": ""})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# GPU timings: {where}\n")
    print(f"Command: `python benchmarks/gpu_timing.py{' --tiny' if a.tiny else ''}`; grid {'x'.join(map(str, grid))}, "
          f"patches {'x'.join(map(str, patch))}, CFG++ (2 branches), random weights; FLOP bound at "
          f"{a.peak_tflops:g} TFLOP/s.\n")
    print(markdown_table(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
