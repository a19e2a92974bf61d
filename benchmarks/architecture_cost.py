"""FLOPs of one U-Net forward pass with and without spatial self-attention.

    python benchmarks/architecture_cost.py > benchmarks/architecture_cost.md

Counted by `torch.utils.flop_counter` on the meta device (no arithmetic is run, so the paper-size
network costs nothing to measure here); a multiply-add counts 2. `self_attention: false` is the
authors' released design: the attention blocks attend only to the site token.
"""

import pandas as pd
import torch
import yaml

from harmodiff.tables import markdown_table
from harmodiff.model import ModelConfig, build_model, count_parameters, pass_flops

NETWORKS = {"paper (config/srpbs.yaml)": ("config/srpbs.yaml", (80, 96, 80)),
            "demo (config/config.yaml)": ("config/config.yaml", (40, 48, 40))}


def forward_flops(cfg: ModelConfig, patch) -> tuple[float, int]:
    with torch.device("meta"):
        params = count_parameters(build_model(cfg, 91))
    return pass_flops(cfg, patch), params


def main() -> None:
    rows = []
    for name, (path, patch) in NETWORKS.items():
        base = yaml.safe_load(open(path))["model"]
        for self_attention in (True, False):
            cfg = ModelConfig.from_dict({**base, "self_attention": self_attention})
            flops, params = forward_flops(cfg, patch)
            rows.append({"network": name, "patch": "x".join(map(str, patch)), "self-attention": self_attention,
                         "parameters (M)": params / 1e6, "forward TFLOP / patch": flops / 1e12})
    df = pd.DataFrame(rows)
    df["vs self-attention"] = [r["forward TFLOP / patch"] / df[(df.network == r["network"]) & df["self-attention"]][
        "forward TFLOP / patch"].iloc[0] for _, r in df.iterrows()]
    print("# U-Net forward cost with and without spatial self-attention\n")
    print("Command: `python benchmarks/architecture_cost.py > benchmarks/architecture_cost.md` "
          "(torch.utils.flop_counter on the meta device; a multiply-add counts 2).\n")
    print(markdown_table(df))


if __name__ == "__main__":
    main()
