"""Model and sampler costs on this machine (CPU), printed as Markdown tables.

    python benchmarks/model_cost.py > benchmarks/model_cost.md

1. Parameters, forward FLOPs of one patch (torch FlopCounterMode on the meta device), training
   step seconds (forward + backward + Adam) and peak memory (max RSS of a fresh subprocess,
   capped at 18 GiB so an out-of-memory is reported, not suffered) for the demo and the
   paper-size network.
2. Harmonization at the demo grid (80x96x80, 27 patches of 40x48x40): U-Net passes per second
   for (a) naive: one patch per pass, conditional and unconditional as separate passes, and
   (b) batched: both branches in one pass, 4 patches per pass; their ratio; the share of time
   spent outside the U-Net; and the FLOP lower bound of a paper-size volume at 790 TFLOP/s.
"""

import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

DEMO = dict(channels=(16, 32, 32, 64), num_res_blocks=1, num_head_channels=16, context_dim=512, norm_num_groups=16)
PAPER = dict(channels=(64, 128, 256, 256), num_res_blocks=2, num_head_channels=64, context_dim=512, norm_num_groups=32)
SIZES = {"demo": (DEMO, (40, 48, 40), 2), "paper": (PAPER, (80, 96, 80), 1)}


def _model(cfg, device="cpu"):
    from harmodiff.model import ModelConfig, build_model

    return build_model(ModelConfig(**cfg), 91).to(device)


def forward_flops(cfg, patch) -> float:
    from harmodiff.model import pass_flops

    return float(pass_flops(cfg, patch))


def train_step_child(name):
    """Run in a subprocess: seconds per training step and peak RSS."""
    cfg, patch, batch = SIZES[name]
    torch.set_num_threads(2)
    model = _model(cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.randn(batch, 1, *patch)
    t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(0))
    lab = torch.ones(batch, dtype=torch.long)
    times = []
    for _ in range(3 if name == "demo" else 1):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x, t, x, x, lab), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"seconds": float(np.median(times[1:] or times)), "peak_gib": rss,
                      "params": sum(p.numel() for p in model.parameters())}))


def train_step(name):
    cap = 18 * 1024**3
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap})); "
            f"import sys; sys.path.insert(0, 'benchmarks'); import model_cost; model_cost.train_step_child('{name}')")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "peak_gib": None, "error": "did not finish one step in 10 minutes"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"seconds": None, "peak_gib": None, "error": tail[:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sampler_bench(steps=2):
    from harmodiff import harmonize as hz
    from harmodiff.config import HarmonizeConfig
    from harmodiff.model import ModelRecord, SiteLabels
    from harmodiff.patches import grid_positions

    torch.set_num_threads(2)
    cfg, patch, _ = SIZES["demo"]
    model = _model(cfg).eval()
    labels = SiteLabels([f"S{i}" for i in range(10)], [round(-0.4 + 0.1 * i, 1) for i in range(9)])
    zz = np.meshgrid(*[np.linspace(-1, 1, n) for n in (80, 96, 80)], indexing="ij")
    r = np.sqrt(sum(z * z for z in zz))
    mask = r < 0.9
    image = np.where(mask, 500 + 200 * np.cos(8 * r), 0).astype(np.float32)
    record = ModelRecord({"patch_shape": list(patch), "train": {"num_train_timesteps": 1000}, "anatomy": {}}, labels)
    # (b) batched, through the real harmonize path
    _, stats = hz.harmonize_array(model, record, image, mask, "S0",
                                     HarmonizeConfig(steps=steps, batch_size=4))
    batched_pps = stats["unet_passes"] / stats["unet_seconds"]
    outside = 1 - stats["unet_seconds"] / stats["total_seconds"]
    # (a) naive: one patch, cond and uncond as two separate passes
    positions = grid_positions((80, 96, 80), patch, 0.5)
    x = torch.randn(1, 1, *patch)
    lab_c, lab_u = torch.ones(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    n_naive = 6
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n_naive // 2):
            tt = torch.full((1,), 500)
            model(x, tt, x, x, lab_u)
            model(x, tt, x, x, lab_c)
    naive_pps = n_naive / (time.perf_counter() - t0)
    per_volume_passes = len(positions) * 50 * 2
    return {"patches": len(positions), "naive_pps": naive_pps, "batched_pps": batched_pps,
            "ratio": batched_pps / naive_pps, "outside_share": outside,
            "naive_s_per_volume_50": per_volume_passes / naive_pps,
            "batched_s_per_volume_50": per_volume_passes / batched_pps}


def main():
    print("# Model and sampler cost (CPU, 2 threads, this machine)\n")
    print("Command: `python benchmarks/model_cost.py > benchmarks/model_cost.md`\n")
    print("| network | patch | batch | parameters | forward GFLOP / patch | train step s | peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    flops = {}
    for name, (cfg, patch, batch) in SIZES.items():
        flops[name] = forward_flops(cfg, patch)
        res = train_step(name)
        params = sum(p.numel() for p in _model(cfg, "meta").parameters())
        sec = f"{res['seconds']:.2f}" if res.get("seconds") else f"failed: {res.get('error')}"
        mem = f"{res['peak_gib']:.1f}" if res.get("peak_gib") else "-"
        print(f"| {name} {cfg['channels']} | {'x'.join(map(str, patch))} | {batch} | {params / 1e6:.1f} M | "
              f"{flops[name] / 1e9:.0f} | {sec} | {mem} |")
    s = sampler_bench()
    print("\n## Harmonization sampler at the demo grid (80x96x80, demo network)\n")
    print("| mode | U-Net passes / s | s per volume at 50 steps |")
    print("|---|---:|---:|")
    print(f"| (a) naive: 1 patch, cond and uncond separate | {s['naive_pps']:.2f} | {s['naive_s_per_volume_50']:.0f} |")
    print(f"| (b) batched: cond+uncond in one pass, 4 patches | {s['batched_pps']:.2f} | {s['batched_s_per_volume_50']:.0f} |")
    print(f"\nRatio (b)/(a): **{s['ratio']:.2f}x**. Share of harmonization time outside the U-Net "
          f"(anatomy map, patch planning, noise, fusion; file I/O not included): **{100 * s['outside_share']:.1f} %**.")
    passes = 27 * 50 * 2
    bound = passes * flops["paper"] / 790e12
    print(f"\nPaper size: one forward pass of an 80x96x80 patch is {flops['paper'] / 1e12:.2f} TFLOP; a 1 mm volume "
          f"takes 27 patches x 50 steps x 2 branches = {passes} passes = {passes * flops['paper'] / 1e15:.2f} PFLOP, "
          f"so at 790 TFLOP/s (bf16 dense peak) no implementation can harmonize it in less than **{bound:.1f} s**. "
          "No GPU was lent in this session: no measured GPU figure yet.")


if __name__ == "__main__":
    main()
