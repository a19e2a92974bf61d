"""The conditional 3-D denoiser (paper sections 2.4, 2.5 and 3.2) and the site-label map.

The network is MONAI's `DiffusionModelUNet`: 3 input channels [x_t, A, A_coarse], one output
(the predicted noise), residual blocks with GroupNorm and SiLU, a sinusoidal time embedding
with a 2-layer MLP, self- and cross-attention at the two middle levels. The site enters through
cross-attention as one token: a learnable embedding per site label, with index 0 reserved for
the null (unconditional) embedding used by classifier-free guidance.

Where MONAI fixes what the paper states otherwise, `HarmonizationUNet` replaces the part
(each only when the config asks, so models trained before keep their architecture):
`time_embed_dim` (MONAI: 4 x channels[0]; the paper: 512) swaps the time MLP and every residual
block's projection of it; `bottleneck_attention: false` drops the attention block MONAI always
puts in its middle block (the paper has attention at the two middle levels only);
`anatomy_tokens_per_side` adds A_coarse, encoded to n^3 tokens, to the cross-attention context
beside the site token (the paper's anatomy "via internal cross-attention").

Site labels are (site, log-gamma contrast level) pairs, as in the paper's augmentation: a
training volume whose contrast was changed by a log-gamma factor gets that pair's label. At
inference the target is (target site, 0).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harmodiff.config import AnatomyConfig, ModelConfig, TrainConfig
from harmodiff.io import InputError, atomic_path

NULL_LABEL = 0


class SiteLabels:
    """The map (site, log-gamma level) -> label index (1..n); 0 is the null label. The training sites
    are numbered in sorted order; `added` sites (learned later with the network frozen, `harmodiff.sites`)
    come after them in their own order, so that adding one leaves every trained label where it was."""

    def __init__(self, sites, levels, added=()):
        self.trained = sorted(dict.fromkeys(str(s) for s in sites))
        self.added = [str(s) for s in added]
        clash = sorted(set(self.trained) & set(self.added))
        if clash or len(set(self.added)) < len(self.added):
            raise ValueError(f"site names {clash or self.added} are given twice")
        self.sites = self.trained + self.added
        self.levels = [round(float(g), 6) for g in levels]
        if 0.0 not in self.levels:
            raise ValueError(f"contrast levels must include 0 (the target at inference), got {self.levels}")
        self._index = {(s, g): 1 + i * len(self.levels) + j
                       for i, s in enumerate(self.sites) for j, g in enumerate(self.levels)}

    def with_site(self, name: str) -> SiteLabels:
        """These labels and one more site after them (its labels: the last len(levels) indices)."""
        return SiteLabels(self.trained, self.levels, [*self.added, name])

    def __len__(self) -> int:
        return len(self._index)

    @property
    def num_embeddings(self) -> int:
        return len(self) + 1

    def index(self, site: str, level: float = 0.0) -> int:
        key = (str(site), round(float(level), 6))
        if key not in self._index:
            if str(site) not in self.sites:
                raise KeyError(f"unknown site {site!r}; known sites: {', '.join(self.sites)}")
            raise KeyError(f"unknown contrast level {level} for site {site!r}; known levels: {self.levels}")
        return self._index[key]

    def to_dict(self) -> dict:
        return {"sites": list(self.trained), "levels": list(self.levels),
                "index": [[s, g, i] for (s, g), i in self._index.items()]} | ({"added": self.added} if self.added else {})

    @classmethod
    def from_dict(cls, d: dict) -> SiteLabels:
        labels = cls(d["sites"], d["levels"], d.get("added", ()))
        saved = {(s, round(float(g), 6)): int(i) for s, g, i in d["index"]}
        if saved != labels._index:
            raise ValueError("site-label map in the checkpoint does not match its sites and levels")
        return labels


class NoSelfAttention(nn.Module):
    """Stands in for a transformer block's self-attention: adds nothing to the residual stream,
    so the block keeps only its cross-attention to the site token and its feed-forward layer."""

    def forward(self, x):
        return torch.zeros_like(x)


class NoAttention(nn.Module):
    """Stands in for the middle block's spatial transformer: passes the features through."""

    def forward(self, x, context=None):
        return x


class AnatomyTokens(nn.Module):
    """A_coarse -> n^3 context tokens: two strided convolutions, an adaptive average pool to an
    n x n x n grid, a linear map to the context width, plus a learned embedding of each token's
    grid position (cross-attention alone cannot tell the tokens apart by place)."""

    def __init__(self, per_side: int, context_dim: int, width: int = 32):
        super().__init__()
        self.encode = nn.Sequential(
            nn.Conv3d(1, width, 4, stride=4), nn.SiLU(), nn.Conv3d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(), nn.AdaptiveAvgPool3d(per_side))
        self.project = nn.Linear(2 * width, context_dim)
        self.position = nn.Parameter(torch.zeros(per_side ** 3, context_dim))

    def forward(self, coarse):
        tokens = self.encode(coarse).flatten(2).transpose(1, 2)  # (N, n^3, 2 width)
        return self.project(tokens) + self.position


def _checkpointed(forward):
    """forward recomputed in the backward pass instead of keeping its activations (training only)."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


class HarmonizationUNet(nn.Module):
    """eps_theta(x_t, t, A, A_coarse, site label)."""

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        if len(config.channels) != len(config.attention_levels):
            raise ValueError("model config: channels and attention_levels need the same length")
        bad = [c for c in config.channels if c % config.norm_num_groups]
        if bad:
            raise ValueError(f"model config: channels {bad} are not divisible by norm_num_groups={config.norm_num_groups}")
        self.config = config
        self.unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=3, out_channels=1, num_res_blocks=config.num_res_blocks,
            channels=tuple(config.channels), attention_levels=tuple(config.attention_levels),
            norm_num_groups=config.norm_num_groups, num_head_channels=config.num_head_channels,
            with_conditioning=True, cross_attention_dim=config.context_dim,
            use_flash_attention=config.use_flash_attention,
        )
        if not config.self_attention:
            from monai.networks.nets.diffusion_model_unet import DiffusionUNetTransformerBlock

            for block in self.unet.modules():
                if isinstance(block, DiffusionUNetTransformerBlock):
                    block.attn1 = NoSelfAttention()
        if not config.bottleneck_attention:
            self.unet.middle_block.attention = NoAttention()
        if config.time_embed_dim is not None and config.time_embed_dim != 4 * config.channels[0]:
            self._replace_time_mlp(config.time_embed_dim)
        self.site_embedding = nn.Embedding(num_labels, config.context_dim)
        self.anatomy_tokens = (AnatomyTokens(config.anatomy_tokens_per_side, config.context_dim)
                               if config.anatomy_tokens_per_side else None)

    def _replace_time_mlp(self, width: int) -> None:
        from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

        first = self.config.channels[0]  # MONAI's sinusoidal embedding has channels[0] features
        self.unet.time_embed = nn.Sequential(nn.Linear(first, width), nn.SiLU(), nn.Linear(width, width))
        for block in self.unet.modules():
            if isinstance(block, DiffusionUNetResnetBlock):
                block.time_emb_proj = nn.Linear(width, block.time_emb_proj.out_features)

    def use_activation_checkpointing(self) -> None:
        """Recompute each U-Net block's activations in the backward pass: a paper-size step at
        80x96x80 then fits in far less memory for about one more forward pass of time. The
        weights and their names are unchanged."""
        for block in [*self.unet.down_blocks, self.unet.middle_block, *self.unet.up_blocks]:
            block.forward = _checkpointed(block.forward)

    @property
    def downsampling(self) -> int:
        """Patch sides must be divisible by this (2 ** (levels - 1))."""
        return 2 ** (len(self.config.channels) - 1)

    def forward(self, x_t, timesteps, anatomy, coarse, labels):
        context = self.site_embedding(labels)[:, None, :]
        if self.anatomy_tokens is not None:
            context = torch.cat([context, self.anatomy_tokens(coarse).to(context.dtype)], dim=1)
        return self.unet(torch.cat([x_t, anatomy, coarse], dim=1), timesteps, context=context)


def build_model(config: ModelConfig | dict, num_labels: int) -> HarmonizationUNet:
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return HarmonizationUNet(config, num_labels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pass_flops(config: ModelConfig | dict, patch_shape, batch: int = 1, backward: bool = False) -> float:
    """FLOPs of one network pass over `batch` patches (forward, or forward + backward), counted by
    torch.utils.flop_counter on the meta device: no memory, no arithmetic, so the paper's size costs
    nothing to cost. A multiply-add counts 2."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(config, 91)
        x = torch.randn(batch, 1, *patch_shape)
        with FlopCounterMode(display=False) as counter:
            out = model(x, torch.full((batch,), 10), x, x, torch.ones(batch, dtype=torch.long))
            if backward:
                out.sum().backward()
    return counter.get_total_flops()


# checkpoints

HASHED = ("model", "ema")  # the weights a checkpoint's content hash covers


def weights_sha256(state_dict: dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save atomically, with a content hash of the weights verified by `load_checkpoint`."""
    state = {**state, "sha256": {k: weights_sha256(state[k]) for k in HASHED if isinstance(state.get(k), dict)}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with `weights_only=True` (no arbitrary pickled code) and verify the
    content hash of its weights (stored by `save_checkpoint`; checkpoints written before hashes
    were stored load unverified)."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: refused: it holds pickled Python objects beyond tensors and plain "
                         "containers, which a checkpoint never needs (loaded with weights_only=True)") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise InputError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {first})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("sha256"), dict):
        for key, digest in ckpt["sha256"].items():
            if not isinstance(ckpt.get(key), dict) or weights_sha256(ckpt[key]) != digest:
                raise InputError(f"{path}: damaged: the '{key}' weights do not match the content hash "
                                 "stored when it was saved")
    return ckpt


def require_harmodiff_checkpoint(ckpt, path) -> dict:
    if not isinstance(ckpt, dict) or not {"model", "config", "site_labels"} <= set(ckpt):
        keys = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(f"{path}: not a harmodiff model (needs model, config and site_labels; has {keys})")
    return ckpt


# the training grid a checkpoint records beside its config (harmonize checks inputs against them)
GRID_KEYS = ("volume_shape", "voxel_mm")


@dataclass(frozen=True)
class ModelRecord:
    """What a checkpoint carries besides its weights: the settings it was trained with (`config`: the
    model, train and anatomy sections and the patch shape, as training recorded them), its site labels,
    and the working grid it was trained on (None in checkpoints from before it was recorded)."""

    config: dict
    labels: SiteLabels
    volume_shape: tuple[int, ...] | None = None
    voxel_mm: tuple[float, ...] | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> ModelRecord:
        grid = {k: tuple(ckpt[k]) for k in GRID_KEYS if k in ckpt}
        return cls(dict(ckpt["config"]), SiteLabels.from_dict(ckpt["site_labels"]), **grid)

    def to_checkpoint(self) -> dict:
        """The record's entries of a checkpoint (what `from_checkpoint` reads back)."""
        grid = {k: list(getattr(self, k)) for k in GRID_KEYS if getattr(self, k) is not None}
        return {"config": self.config, "site_labels": self.labels.to_dict(), **grid}

    @property
    def patch_shape(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.config["patch_shape"])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config["train"]["num_train_timesteps"])

    @property
    def prediction(self) -> str:
        """What the network outputs (eps, v or x0; records from before the option: the class default)."""
        return TrainConfig.of(self.config["train"]).prediction

    @property
    def anatomy(self) -> AnatomyConfig:
        return AnatomyConfig.of(self.config.get("anatomy"))


def load_model_for_inference(path, device="cpu", use_ema: bool = True) -> tuple[nn.Module, ModelRecord]:
    """(model in eval mode, its ModelRecord) from a checkpoint."""
    ckpt = require_harmodiff_checkpoint(load_checkpoint(path, map_location=device), path)
    record = ModelRecord.from_checkpoint(ckpt)
    model = build_model(record.config["model"], record.labels.num_embeddings)
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise InputError(f"{path}: its weights do not fit the model its config describes "
                         f"({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), record
