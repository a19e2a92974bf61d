"""What harmodiff.model replaces in MONAI's U-Net where the paper says otherwise (time MLP width,
bottleneck attention, anatomy tokens in the cross-attention context), activation checkpointing,
and old checkpoints keeping their architecture."""

import pytest
import torch
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, DiffusionUNetTransformerBlock
from torch import nn

from harmodiff import model as md
from harmodiff import train as tr
from harmodiff.model import ModelConfig, NoAttention, build_model, count_parameters

TINY = dict(channels=(8, 16, 16), attention_levels=(False, True, True), num_res_blocks=1, num_head_channels=8,
            context_dim=16, norm_num_groups=8)


def _randomized(model):
    """MONAI zero-initialises output convolutions and attention projections: give every weight a value
    so that each part of the network reaches the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)
    return model.eval()


def _inputs(batch=2, side=16):
    torch.manual_seed(2)
    x = torch.randn(batch, 1, side, side, side)
    return x, torch.tensor([10, 600][:batch]), x * 0.5, x * 0.25, torch.tensor([1, 2][:batch])


def test_time_mlp_has_the_configured_width_everywhere():
    model = build_model(ModelConfig(**TINY, time_embed_dim=48), 3)
    linears = [m for m in model.unet.time_embed if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 48), (48, 48)]
    resnets = [m for m in model.unet.modules() if isinstance(m, DiffusionUNetResnetBlock)]
    assert resnets and all(m.time_emb_proj.in_features == 48 for m in resnets)
    default = build_model(ModelConfig(**TINY), 3)
    assert default.unet.time_embed[0].out_features == 4 * 8  # MONAI's own width when not configured
    # parameters: the MLP (8*48+48 + 48*48+48 vs 8*32+32 + 32*32+32) and every projection's input (48 vs 32)
    extra = (8 * 48 + 48 + 48 * 48 + 48) - (8 * 32 + 32 + 32 * 32 + 32) + sum(16 * m.time_emb_proj.out_features
                                                                             for m in resnets)
    assert count_parameters(model) - count_parameters(default) == extra
    model = _randomized(model)
    x, t, a, c, y = _inputs()
    with torch.no_grad():  # the time still reaches the output through the wider MLP
        assert (model(x, t, a, c, y) - model(x, t + 200, a, c, y)).abs().max() > 1e-3


def test_without_bottleneck_attention_the_middle_block_is_two_residual_blocks():
    model = _randomized(build_model(ModelConfig(**TINY, bottleneck_attention=False), 3))
    mid = model.unet.middle_block
    assert isinstance(mid.attention, NoAttention)
    assert not any(isinstance(m, DiffusionUNetTransformerBlock) for m in mid.modules())
    seen = {}
    mid.register_forward_hook(lambda m, args, kwargs, out: seen.update(inp=kwargs, out=out), with_kwargs=True)
    x, t, a, c, y = _inputs()
    with torch.no_grad():
        model(x, t, a, c, y)
        h, temb = seen["inp"]["hidden_states"], seen["inp"]["temb"]
        torch.testing.assert_close(seen["out"], mid.resnet_2(mid.resnet_1(h, temb), temb))
    with_attention = build_model(ModelConfig(**TINY), 3)
    assert count_parameters(with_attention) > count_parameters(model)


def test_anatomy_tokens_join_the_site_token_in_the_context():
    model = _randomized(build_model(ModelConfig(**TINY, anatomy_tokens_per_side=2), 3))
    contexts = []
    for block in model.unet.modules():
        if isinstance(block, DiffusionUNetTransformerBlock):
            block.register_forward_hook(lambda m, args, kwargs, out: contexts.append(kwargs["context"]),
                                        with_kwargs=True)
    x, t, a, c, y = _inputs()
    with torch.no_grad():
        out = model(x, t, a, c, y)
        site = model.site_embedding(y)[:, None, :]
        tokens = model.anatomy_tokens(c)
    assert contexts and all(ctx.shape == (2, 1 + 8, 16) for ctx in contexts)
    torch.testing.assert_close(contexts[0], torch.cat([site, tokens], dim=1))
    # the tokens carry A_coarse: another coarse map changes the output, and each token has its own place
    with torch.no_grad():
        assert (out - model(x, t, a, c.flip(2), y)).abs().max() > 1e-3
    assert model.anatomy_tokens.position.shape == (8, 16)
    # and they learn: a loss reaches the encoder
    model.train()
    model(x, t, a, c, y).square().mean().backward()
    assert model.anatomy_tokens.encode[0].weight.grad.abs().sum() > 0


def _volumes():
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for site in "AB":
        img = (500 + 80 * rng.normal(size=(16, 16, 16))).astype(np.float32)
        out.append(tr.Volume(img, np.ones(img.shape, bool), site))
    return out


def _saved_bytes(model) -> int:
    """Bytes autograd keeps for the backward pass of one forward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    x, t, a, c, y = _inputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, t, a, c, y).sum().backward()
    return sum(saved)


def test_activation_checkpointing_keeps_less_and_trains_the_same_weights(tmp_path):
    model = build_model(ModelConfig(**TINY), 3)
    plain = _saved_bytes(model)
    model.use_activation_checkpointing()
    assert _saved_bytes(model) < plain / 3
    cfg = dict(steps=3, batch_size=2, lr=1e-3, checkpoint_every=10, contrast_levels=[0.0], spatial_augmentation=False)
    states = []
    for flag in (False, True):
        out = tmp_path / str(flag)
        tr.train(_volumes(), out, model_cfg=ModelConfig(**TINY), cfg=tr.TrainConfig(**cfg, activation_checkpointing=flag),
                 patch_shape=(16, 16, 16), progress=False)
        states.append(torch.load(out / "checkpoint.pt", weights_only=True))
    for key in ("model", "ema"):
        assert states[0][key].keys() == states[1][key].keys()
        for name in states[0][key]:
            torch.testing.assert_close(states[0][key][name], states[1][key][name], rtol=1e-5, atol=1e-6)


def test_a_model_recorded_before_a_setting_existed_has_its_default():
    wanted = tr.config_record(ModelConfig(**TINY), tr.TrainConfig(), (16, 16, 16), None)
    saved = {**wanted, "model": {k: v for k, v in wanted["model"].items()
                                 if k not in ("time_embed_dim", "bottleneck_attention", "anatomy_tokens_per_side")}}
    assert tr.record_differences(saved, wanted) == []
    paper = tr.config_record(ModelConfig(**TINY, bottleneck_attention=False), tr.TrainConfig(), (16, 16, 16), None)
    assert tr.record_differences(saved, paper) == ["model.bottleneck_attention: True -> False"]
    # and the shipped demo model, exported before these settings, builds with MONAI's architecture
    model, record = md.load_model_for_inference("resources/demo-model/checkpoint.pt")
    assert "bottleneck_attention" not in record.config["model"]
    assert not isinstance(model.unet.middle_block.attention, NoAttention) and model.anatomy_tokens is None


@pytest.mark.parametrize("key, value, message", [
    ("time_embed_dim", 0, "model.time_embed_dim"),
    ("anatomy_tokens_per_side", 9, "model.anatomy_tokens_per_side"),
])
def test_new_model_settings_are_range_checked(key, value, message):
    from harmodiff.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({key: value})
