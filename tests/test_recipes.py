"""config/srpbs.yaml is the paper's recipe wherever the paper states it (section 3.2 and 2.4-2.6),
and config/srpbs-fast.yaml, merged on top of it, is the measured faster recipe: both read, built
at the paper's size on the meta device (no memory, no arithmetic) and costed."""

import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn

from conftest import ROOT
from harmodiff import config as hc
from harmodiff.model import NoAttention, NoSelfAttention, build_model, count_parameters, pass_flops
from harmodiff.diffusion import steps_run


def _workflow(*files) -> hc.WorkflowConfig:
    merged: dict = {}
    for name in files:
        hc.merge(merged, yaml.safe_load((ROOT / name).read_text()))
    return hc.WorkflowConfig.from_dict(merged)


def _paper_size(model_cfg):
    with torch.device("meta"):
        return build_model(model_cfg, 91)


def _attention_resolutions(model) -> dict[str, int]:
    """Transformer blocks per place in the U-Net; each has self-attention exactly when configured."""
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetTransformerBlock

    found = {}
    for name, block in model.unet.named_modules():
        if isinstance(block, DiffusionUNetTransformerBlock):
            place = ".".join(name.split(".")[:2])
            found[place] = found.get(place, 0) + 1
            assert isinstance(block.attn1, NoSelfAttention) != model.config.self_attention
    return found


def test_srpbs_yaml_is_the_papers_recipe():
    cfg = _workflow("config/srpbs.yaml")
    t, h, m = cfg.train, cfg.harmonize, cfg.model
    # section 2.4 / 3.2: the eps objective, Adam at a constant 1e-4 (AdamW without decay is Adam), batch 5,
    # 2,058 epochs of 1,000 volumes at one patch per volume = 411,600 steps; T = 1000; null 0.15 (2.5)
    assert (t.prediction, t.lr, t.weight_decay, t.warmup_steps, t.lr_decay, t.grad_clip, t.loss_weighting) == \
        ("eps", 1e-4, 0.0, 0, "none", 0.0, "none")
    assert (t.batch_size, t.steps, t.num_train_timesteps, t.null_prob, t.anatomy_log_gamma) == \
        (5, 2058 * 1000 // 5, 1000, 0.15, 0.5)
    # inference (2.6, 3.2, 4.1): deterministic DDIM, 50 steps from pure noise, CFG++ lambda 0.6
    assert (h.guidance, h.scale, h.steps, h.start_from, h.strength) == ("cfgpp", 0.6, 50, "noise", 1.0)
    assert tuple(cfg.grid.patch_shape) == (80, 96, 80) and cfg.grid.spacing == 1.0
    # the network (3.2): 512-d time MLP, 512-d site context, 64-d heads, self+cross attention at the
    # two middle resolutions and nowhere else
    assert (m.time_embed_dim, m.context_dim, m.num_head_channels, m.self_attention) == (512, 512, 64, True)
    model = _paper_size(m)
    mlp = [layer for layer in model.unet.time_embed if isinstance(layer, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in mlp] == [(64, 512), (512, 512)]
    assert isinstance(model.unet.middle_block.attention, NoAttention)
    places = _attention_resolutions(model)
    # down_blocks.1/.2 and their mirrors up_blocks.1/.2 (MONAI's up blocks run in reverse order)
    assert sorted(places) == ["down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2"]
    assert model.site_embedding.embedding_dim == 512
    assert count_parameters(model) == pytest.approx(78.5e6, rel=1e-3)
    text = (ROOT / "config/srpbs.yaml").read_text()
    for kept in ("ema_decay", "bf16:"):  # what the paper does not have is marked so, on its own line
        line = next(line for line in text.splitlines() if line.strip().startswith(kept))
        assert "NOT THE PAPER'S" in line, line


def test_srpbs_fast_yaml_departs_only_where_measured_and_costs_8x_less():
    paper = _workflow("config/srpbs.yaml")
    fast = _workflow("config/srpbs.yaml", "config/srpbs-fast.yaml")
    departed = {f"{section}.{k}" for section in ("model", "train", "harmonize")
                for k, v in getattr(fast, section).to_dict().items() if getattr(paper, section).to_dict()[k] != v}
    assert departed == {"model.self_attention", "model.time_embed_dim", "model.bottleneck_attention", "train.run",
                        "train.prediction", "train.warmup_steps", "train.lr_decay", "train.grad_clip",
                        "harmonize.start_from", "harmonize.steps", "harmonize.strength"}
    assert fast.cohort == paper.cohort and fast.grid == paper.grid and fast.anatomy == paper.anatomy

    def volume_flops(cfg):
        return 27 * steps_run(cfg.harmonize.steps, cfg.harmonize.strength) * 2 * pass_flops(cfg.model, (80, 96, 80))
    ratio = volume_flops(paper) / volume_flops(fast)
    assert ratio >= 8, ratio
    # the merged pair is a valid config for the command line too
    out = subprocess.run([sys.executable, "-m", "harmodiff.config", "check", "config/srpbs.yaml",
                          "config/srpbs-fast.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["model"]["self_attention"] is False
