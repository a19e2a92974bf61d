"""The workflow configuration as typed sections: every setting's type, range, default and meaning
written once, here.

`WorkflowConfig.from_dict` validates a config (types, ranges, choices, unknown keys: one line
naming the key) and fills in every default; the JSON schema Snakemake validates with
(`workflow/schemas/config.schema.yaml`) and `config/README.md` are generated from these classes
(`python -m harmodiff.config schema|readme`), and a test checks the committed files match.

Defaults are what a run on real data should use (the paper's where it gives one);
config/config.yaml spells out the CPU-sized demo. A section left out of a config file takes
these defaults, never another file's values.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

GUIDANCES = ("none", "cfg", "cfgpp")
PREDICTIONS = ("eps", "v", "x0")
SKULLSTRIPS = ("ants", "hdbet")
REGISTRATIONS = ("affine", "rigid")


# what a key does besides setting its stage, as field metadata (`setting(..., roles=...)`); the
# workflow asks `keys_with_role` instead of keeping lists of names
ROLES = {
    "workflow": "read by the stage's rule, not by the stage: not recorded in a checkpoint",
    "per_job": "a job's own resource (from its rule): left out of the stage's settings file, so changing it "
               "reruns nothing",
    "speed": "changes how fast a run goes, not what it learns: a model trained with another value still "
             "counts as trained with these settings",
}


def setting(default, help: str, *, roles: tuple[str, ...] = (), **rules):
    """A config field: its default, one line of help, its ROLES, and rules (choices, minimum, maximum,
    exclusive_minimum, exclusive_maximum, min_items, items_minimum)."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}; known: {sorted(ROLES)}")
    metadata = {"help": help, **rules, **({"roles": tuple(roles)} if roles else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def required(help: str, **rules):
    """A config field with no default: the config must give it."""
    return field(metadata={"help": help, **rules})


def section(cls, help: str):
    return field(default_factory=cls, metadata={"help": help})


def _optional_of(hint):
    """X for a hint `X | None` (Optional[X]), else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)][0]
    return None


def keys_with_role(cls, role: str) -> tuple[str, ...]:
    """The fields of section `cls` that have `role` (ROLES)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {sorted(ROLES)}")
    return tuple(f.name for f in dataclasses.fields(cls) if role in f.metadata.get("roles", ()))


class ConfigError(ValueError):
    """A config value of the wrong type or range, or an unknown key; the message names it."""


# seeds go to numpy, torch and ANTs (a 32-bit seed): one bound for all of them
SEED_MAX = 2**32 - 1
# the longest noise schedule a config may ask for (the paper: 1,000); DDIM steps are at most the schedule's
MAX_TIMESTEPS = 100_000


# --- validation -------------------------------------------------------------------------------

def _kind(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "bool"
    if hint is int:
        return "int"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if _optional_of(hint) is not None:
        return f"{_kind(_optional_of(hint))} or null"
    if origin in (list, tuple):
        item = _kind(args[0])
        return f"a list of {'numbers' if item == 'a number' else item + 's' if not item.startswith('a ') else item[2:] + 's'}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return str(hint)


def _check(value, hint, rules: dict, where: str, nullable: bool = False):
    """value checked against hint and rules; lists come back as lists (tuples for tuple hints).
    nullable: the setting may also be null (said in a type error)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def fail(extra=""):
        raise ConfigError(f"{where} must be {_kind(hint)}{extra}{' or null' if nullable else ''}, got {value!r}")

    if _optional_of(hint) is not None:
        return None if value is None else _check(value, _optional_of(hint), rules, where, nullable=True)
    if dataclasses.is_dataclass(hint):
        return load_section(hint, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        return {str(k): _check(v, args[1], {}, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail()
        n = rules.get("length")
        if n is not None and len(value) != n:
            fail(f" of length {n}")
        if len(value) < rules.get("min_items", 0):
            fail(f" (at least {rules['min_items']})")
        item_rules = {k.removeprefix("items_"): v for k, v in rules.items() if k.startswith("items_")}
        items = [_check(v, args[0], item_rules, where) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if not isinstance(value, bool):
            fail()
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        value = float(value)
        if not math.isfinite(value):  # NaN passes every range check (all comparisons are false)
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
    elif hint is str:
        if not isinstance(value, str):
            fail()
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")
    lo, lo_open = (rules["exclusive_minimum"], True) if "exclusive_minimum" in rules else (rules.get("minimum"), False)
    hi, hi_open = (rules["exclusive_maximum"], True) if "exclusive_maximum" in rules else (rules.get("maximum"), False)
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (
            hi is not None and (value >= hi if hi_open else value > hi)):
        def show(bound):
            return f"{bound:,}" if isinstance(bound, int) else f"{bound:g}"

        if lo is not None and hi is not None:
            span = f"in {'(' if lo_open else '['}{show(lo)}, {show(hi)}{')' if hi_open else ']'}"
        elif lo is not None:
            span = f"{'>' if lo_open else '>='} {show(lo)}"
        else:
            span = f"{'<' if hi_open else '<='} {show(hi)}"
        raise ConfigError(f"{where} must be {span}, got {value!r}")
    return value


class Section:
    """A config section: every field is checked against its type and rules when it is made
    (directly or from a mapping), so no code downstream sees a wrong type."""

    where: typing.ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if dataclasses.is_dataclass(hint) and isinstance(value, hint):
                continue
            key = f"{self.where}.{f.name}" if self.where else f.name
            object.__setattr__(self, f.name, _check(value, hint, dict(f.metadata), key))
        self.check()

    def check(self) -> None:
        """Rules across fields (subclasses)."""

    @classmethod
    def from_dict(cls, d: dict | None):
        return load_section(cls, d, cls.where)

    @classmethod
    def of(cls, value):
        """value if it is this section already, else the section made from the mapping (None: defaults)."""
        return value if isinstance(value, cls) else cls.from_dict(value)

    def to_dict(self) -> dict:
        return to_dict(self)


def load_section(cls, data, where: str, ignore=()):
    """An instance of the dataclass `cls` from a config mapping (None: every default)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields and k not in ignore]
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    values = {}
    for k, v in data.items():
        if k in fields:
            hint = hints[k]
            key = f"{where}.{k}" if where else k
            values[k] = load_section(hint, v, key) if dataclasses.is_dataclass(hint) else v
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where + '.' if where else ''}{missing[0]} is required")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def to_dict(obj) -> dict:
    """A section as plain YAML-able data (tuples as lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(obj)


# --- the sections -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SyntheticCohort(Section):
    where: typing.ClassVar[str] = "cohort.synthetic"
    train_sites: int = setting(3, "sites of the training cohort (TRA, TRB, ...)", minimum=1)
    train_subjects_per_site: int = setting(2, "training subjects scanned at each training site", minimum=1)
    test_sites: int = setting(3, "sites every traveling subject is scanned at (TSA, TSB, ...)", minimum=1)
    test_subjects: int = setting(3, "traveling subjects (the test cohort)", minimum=1)
    new_sites: int = setting(0, "scanners outside the training sites (NSA, NSB, ...): their scans are target-only "
                             "(a target site's token is learned from them) and the traveling subjects' truth is "
                             "rendered at them", minimum=0)
    new_site_subjects: int = setting(4, "subjects scanned at each new site (its target-only scans)", minimum=1)
    seed: int = setting(0, "seed of the whole cohort (subjects, sites, noise)", minimum=0, maximum=SEED_MAX)
    render_spacing: float = setting(1.0, "mm; MNI grid the synthetic heads are rendered on", exclusive_minimum=0)
    native_spacing: tuple[float, float] = setting((1.8, 2.2), "mm; range of the scans' voxel sizes", length=2,
                                          items_exclusive_minimum=0)
    site_model: str = setting("contrast", "how a site renders a subject: contrast (three tissue intensities and a "
                              "power curve) | tissue (each voxel's T1 and proton density through an MPRAGE- or "
                              "SPGR-like signal equation at 1.5 or 3 T, with thicker slices; docs/decisions.md)",
                              choices=("contrast", "tissue"))
    ventricle_growth_mm: tuple[float, float] = setting(
        (0.0, 0.0), "a regional effect of age beside the cortical atrophy: the lateral ventricles grow by this "
        "range of mm (tissue that near them becomes CSF), linear in age from the youngest to the oldest; "
        "[0, 0]: none (the shipped model's cohort)", length=2, items_minimum=0)

    def check(self):
        lo, hi = self.native_spacing
        if lo > hi:
            raise ConfigError(f"cohort.synthetic.native_spacing must be [low, high] with low <= high, "
                              f"got {list(self.native_spacing)}")


@dataclass(frozen=True)
class BidsCohort(Section):
    where: typing.ClassVar[str] = "cohort.bids"
    root: str | None = setting(None, "the BIDS dataset's root folder")
    site_column: str = setting("site", "column of sub-*_sessions.tsv or participants.tsv naming the site")
    cohort: str = setting("test", "what the dataset's scans are used for (a study to harmonize: test)",
                          choices=("train", "test"))
    cohort_column: str | None = setting(None, "column of sub-*_sessions.tsv (per session) or participants.tsv (per "
                                        "subject) saying train, test or target (a scanner the model was not "
                                        "trained on); overrides `cohort`")
    training_sheet: str | None = setting(None, "scan sheet TSV of training scans added to the dataset's (not needed "
                                         "with train.pretrained)")


@dataclass(frozen=True)
class SrpbsCohort(Section):
    where: typing.ClassVar[str] = "cohort.srpbs"
    root: str | None = setting(None, "the traveling-subject release: sub-XX/ses-site<CODE>/anat/*_T1w.nii.gz")
    training_sheet: str | None = setting(None, "scan sheet TSV of the training cohort (cohort = train)")
    sites: list[str] | None = setting(None, "keep only these traveling-subject sites (null: all)")
    subjects: list[str] | None = setting(None, "keep only these traveling subjects, e.g. [sub-01] (null: all)")


@dataclass(frozen=True)
class CohortConfig(Section):
    where: typing.ClassVar[str] = "cohort"
    source: str = setting("synthetic", "where the scans come from: synthetic (rendered from MNI152, no data needed), "
                          "sheet (a scan sheet TSV), bids (a BIDS dataset), srpbs (the SRPBS release layout)",
                          choices=("synthetic", "sheet", "bids", "srpbs"))
    synthetic: SyntheticCohort = section(SyntheticCohort, "the synthetic traveling-subject cohort")
    sheet: str | None = setting(None, "source sheet: scans.tsv (columns scan_id subject site cohort path)")
    bids: BidsCohort = section(BidsCohort, "source bids")
    srpbs: SrpbsCohort = section(SrpbsCohort, "source srpbs")
    participants: list[str] | None = setting(None, "run only these subjects (as a BIDS app's --participant-label; "
                                             "null: all)")


@dataclass(frozen=True)
class GridConfig(Section):
    where: typing.ClassVar[str] = "grid"
    spacing: float = setting(1.0, "mm; the working grid's voxel size (the paper: 1 mm)", exclusive_minimum=0)
    shape: list[int] = setting([160, 192, 160], "voxels of the working grid in MNI space", length=3, items_minimum=2)
    patch_shape: list[int] = setting([80, 96, 80], "the diffusion model's patch (half of each side, as the paper); "
                                     "each side divisible by 2^(levels - 1)", length=3, items_minimum=2)


# HD-BET 2's model folder (release_2.0.0): the files its loader reads
HDBET_FILES = ("dataset.json", "plans.json", "fold_all/checkpoint_final.pth")


@dataclass(frozen=True)
class PreprocessConfig(Section):
    where: typing.ClassVar[str] = "preprocess"
    skullstrip: str = setting("ants", "ants (template-based, runs everywhere) | hdbet (HD-BET 2, needs weights at "
                              "hdbet_weights; the paper names no skull-stripping tool)", choices=SKULLSTRIPS)
    hdbet_weights: str = setting("resources/hd-bet", "HD-BET 2 model folder (dataset.json, plans.json, "
                                 "fold_all/checkpoint_final.pth); never downloaded")
    registration: str = setting("affine", "to MNI152: affine (the paper) | rigid", choices=REGISTRATIONS)
    seed: int = setting(0, "ANTs' random seed", minimum=0, maximum=2**31 - 1)
    threads: int = setting(1, "ANTs is reproducible only single-threaded: run scans in parallel", minimum=1,
                           roles=("per_job",))
    # self-checks: a scan failing one stops at preprocessing, naming the scan and the check
    brain_volume_ml: tuple[float, float] = setting((700.0, 2500.0), "plausible volume of the native brain mask "
                                                   "(ml; adults ~1,100-1,900)", length=2, items_minimum=0)
    min_template_correlation: float = setting(0.5, "correlation of the registered brain with the MNI152 brain "
                                              "(the demo's scans: 0.67-0.81)", minimum=-1, maximum=1)
    max_brain_at_border: float = setting(0.01, "largest fraction of the brain mask on the scan's outer voxel "
                                         "layer (a brain cut by the field of view)", minimum=0, maximum=1)

    def check(self):
        lo, hi = self.brain_volume_ml
        if lo > hi:
            raise ConfigError(f"preprocess.brain_volume_ml must be [low, high] with low <= high, got {[lo, hi]}")


@dataclass(frozen=True)
class AnatomyConfig(Section):
    where: typing.ClassVar[str] = "anatomy"
    alpha: float = setting(0.5, "A = alpha |grad I| + (1 - alpha) |I - Gauss_sigma(I)|", minimum=0, maximum=1)
    sigma: float = setting(1.0, "voxels; the Gaussian of the high-pass term", exclusive_minimum=0)
    coarse_factor: int = setting(2, "A_coarse is A downsampled by this factor", minimum=1)
    coarse_mode: str = setting("global", "global (the whole volume at the patch shape: context from outside the "
                               "patch; measured better, benchmarks/recipes.md) | local (A downsampled, cut at the "
                               "patch)", choices=("local", "global"))
    normalize_erosion: int = setting(2, "voxels of the brain rim left out of A's normalizing percentiles",
                                     minimum=0)


@dataclass(frozen=True)
class ModelConfig(Section):
    where: typing.ClassVar[str] = "model"
    """MONAI DiffusionModelUNet; the defaults are the authors' released widths."""
    channels: tuple[int, ...] = setting((64, 128, 256, 256), "channels per level", min_items=2, items_minimum=1)
    attention_levels: tuple[bool, ...] = setting((False, True, True, False), "self-attention at each level")
    num_res_blocks: int = setting(2, "residual blocks per level", minimum=1)
    num_head_channels: int = setting(64, "channels per attention head", minimum=1)
    context_dim: int = setting(512, "size of the site embedding the network attends to", minimum=1)
    norm_num_groups: int = setting(32, "GroupNorm groups (divides every channel count)", minimum=1)
    use_flash_attention: bool = setting(True, "torch SDPA; ~3.7x faster on CPU than MONAI's einsum path")
    self_attention: bool = setting(True, "False: attention blocks attend only to the site token (the authors' "
                                   "released network)")
    time_embed_dim: int | None = setting(None, "width of the time-embedding MLP; null: MONAI's 4 x channels[0] "
                                         "(the paper: 512)", exclusive_minimum=0)
    bottleneck_attention: bool = setting(True, "MONAI's attention block in the middle block, at the lowest "
                                         "resolution; the paper has attention at the two middle levels only (false)")
    anatomy_tokens_per_side: int = setting(0, "A_coarse also enters the cross-attention context as n^3 tokens "
                                           "beside the site token (the paper's anatomy cross-attention); 0: "
                                           "by concatenation only", minimum=0, maximum=4)

    def check(self):
        if len(self.attention_levels) != len(self.channels):
            raise ConfigError(f"model.attention_levels needs one entry per level of model.channels "
                              f"({len(self.channels)}), got {list(self.attention_levels)}")




@dataclass(frozen=True)
class TrainConfig(Section):
    where: typing.ClassVar[str] = "train"
    run: str = setting("diffusion", "name of the run: results/model/<run>/", roles=("workflow",))
    steps: int = setting(100000, "optimizer steps (the paper: 411,600, config/srpbs.yaml)",
                         exclusive_minimum=0)
    batch_size: int = setting(2, "patches per step (the paper: 5)", exclusive_minimum=0)
    lr: float = setting(1e-4, "AdamW learning rate (peak)", exclusive_minimum=0)
    num_train_timesteps: int = setting(1000, "DDPM noise steps", exclusive_minimum=0, maximum=MAX_TIMESTEPS)
    null_prob: float = setting(0.15, "fraction of samples trained with the null site label (for guidance)",
                               minimum=0, exclusive_maximum=1)
    anatomy_log_gamma: float = setting(0.5, "A is computed under a log-gamma contrast ~ U(-x, x)", minimum=0)
    contrast_levels: list[float] = setting([-0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4],
                                           "log-gamma levels of the site-contrast labels (must include 0)",
                                           min_items=1)
    spatial_augmentation: bool = setting(True, "TorchIO flips/affine/elastic per sample")
    ema_decay: float = setting(0.999, "EMA of the weights used for sampling", minimum=0, exclusive_maximum=1)
    checkpoint_every: int = setting(500, "steps between checkpoints (a killed run resumes from the last)",
                                    exclusive_minimum=0, roles=("speed",))
    seed: int = setting(0, "training seed", minimum=0, maximum=SEED_MAX)
    bf16: bool = setting(False, "bfloat16 autocast (GPU)")
    compile: bool = setting(False, "torch.compile the U-Net (pays off on long GPU runs)", roles=("speed",))
    activation_checkpointing: bool = setting(False, "recompute each U-Net block's activations in the backward "
                                             "pass (a paper-size step in far less memory, benchmarks/paper_scale.md)",
                                             roles=("speed",))
    prediction: str = setting("eps", "what the network outputs: eps (the paper) | v | x0 (learns fastest, "
                              "benchmarks/training_options.md)", choices=PREDICTIONS)
    loss_weighting: str = setting("none", "none | min_snr", choices=("none", "min_snr"))
    min_snr_gamma: float = setting(5.0, "gamma of min-SNR weighting", exclusive_minimum=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", minimum=0)
    warmup_steps: int = setting(0, "linear warm-up from 0 to lr", minimum=0)
    lr_decay: str = setting("none", "none | linear (to 0 at `steps`)", choices=("none", "linear"))
    grad_clip: float = setting(0.0, "max gradient norm; 0 = off", minimum=0)
    workers: int = setting(0, "sample-building processes (a GPU machine: several; benchmarks/sample_rate.md)",
                           minimum=0, roles=("speed",))
    crop_shape: list[int] | None = setting(None, "train on crops of this shape instead of the patch (nets "
                                           "without self-attention only); null = the patch", length=3,
                                           items_minimum=1)
    threads: int = setting(1, "CPU threads of the training job", minimum=1, roles=("workflow", "per_job"))
    pretrained: str | None = setting(None, "a model trained elsewhere with exactly these settings (checked), "
                                     "used instead of training; null: train here", roles=("workflow",))
    pretrained_sha256: str | None = setting(None, "the sha256 `pretrained` must have", roles=("workflow",))

    def check(self):
        if 0.0 not in [round(float(g), 6) for g in self.contrast_levels]:
            raise ConfigError(f"train.contrast_levels must include 0 (the target at inference), "
                              f"got {list(self.contrast_levels)}")

    def training_settings(self) -> dict:
        """The settings that shape the trained weights (what a checkpoint records)."""
        workflow = keys_with_role(type(self), "workflow")
        return {k: v for k, v in to_dict(self).items() if k not in workflow}


@dataclass(frozen=True)
class HarmonizeConfig(Section):
    where: typing.ClassVar[str] = "harmonize"
    guidance: str = setting("cfgpp", "none | cfg | cfgpp (the paper)", choices=GUIDANCES)
    scale: float = setting(0.6, "CFG w or CFG++ lambda (the paper: lambda 0.6)", minimum=0)
    steps: int = setting(50, "DDIM steps of the schedule (the paper: 50; at most train.num_train_timesteps)",
                         exclusive_minimum=0, maximum=MAX_TIMESTEPS)
    start_from: str = setting("noise", "noise (the paper) | source (the noised scan itself)",
                              choices=("noise", "source"))
    strength: float = setting(0.5, "start_from source: the fraction of the schedule run", exclusive_minimum=0,
                              maximum=1)
    batch_size: int = setting(4, "patches per forward pass (x2 for the guidance branches)", exclusive_minimum=0)
    seed: int = setting(0, "noise seed (each scan draws its own field from it)", minimum=0, maximum=SEED_MAX)
    threads: int = setting(1, "CPU threads of a harmonization job", minimum=1, roles=("per_job",))
    bf16: bool = setting(False, "GPU: bfloat16 autocast (same images within rounding)")
    channels_last: bool = setting(False, "channels-last 3-D memory format")
    compile: bool = setting(False, "torch.compile the U-Net")
    match_source_stats: bool = setting(False, "give each patch the source's mean/sd back (the authors' "
                                       "post-processing; off: it restores the source's contrast)")


@dataclass(frozen=True)
class LearnSiteConfig(Section):
    """A site the model was not trained on, its token fitted to its target-only scans with the network
    frozen (harmodiff.sites)."""

    where: typing.ClassVar[str] = "learn_site"
    steps: int = setting(300, "optimizer steps of the site token (the demo U-Net on 2 CPU cores: ~0.7 s a step)",
                         exclusive_minimum=0)
    lr: float = setting(0.05, "Adam learning rate of the token", exclusive_minimum=0)
    batch_size: int = setting(2, "training samples per step (patches of the site's scans)", exclusive_minimum=0)
    seed: int = setting(0, "seed of the samples drawn", minimum=0, maximum=SEED_MAX)
    threads: int = setting(2, "CPU threads of the learning job", minimum=1, roles=("per_job",))


@dataclass(frozen=True)
class ExternalMethod(Section):
    where: typing.ClassVar[str] = "evaluation.external"
    pattern: str = required("path of one scan's output; {scan_id}, {site}, {subject} are filled in")
    space: str = required("native (the raw scan's grid) | mni", choices=("native", "mni"))
    target: str = required("the site it harmonized to ('none' if not site-targeted)")


@dataclass(frozen=True)
class GuidanceSweep(Section):
    where: typing.ClassVar[str] = "evaluation.guidance_sweep"
    cfg: list[float] = setting([0.5, 1.0, 2.0, 4.0, 7.0], "CFG w values (Table 1)", items_minimum=0)
    cfgpp: list[float] = setting([0.2, 0.4, 0.6, 0.8, 1.0], "CFG++ lambda values (Table 1); the main setting "
                                 "is reused, not rerun", items_minimum=0)
    subjects: int | None = setting(None, "the first N traveling subjects (null: all)", minimum=1)
    seeds: list[int] = setting([], "the main setting again under these run seeds (spread of the truth scores)",
                               items_minimum=0, items_maximum=SEED_MAX)


@dataclass(frozen=True)
class EvaluationConfig(Section):
    where: typing.ClassVar[str] = "evaluation"
    segmentation: str = setting("atropos", "atropos (runs everywhere) | spm (the paper's; needs the MATLAB Runtime)",
                                choices=("atropos", "spm"))
    tissue_fractions: str = setting("posterior", "posterior (summed posteriors, as the paper) | unmix "
                                    "(partial-volume; docs/decisions.md)", choices=("posterior", "unmix"))
    reference_site: str | None = setting(None, "paired t-tests of each site against this one (SRPBS: KPM; "
                                         "null: the first test site)")
    leakage_folds: int = setting(5, "cross-validation folds of the site-leakage classifier", minimum=2)
    methods: list[str] = setting(["preprocessed", "diffusion", "histmatch", "combat"],
                                 "methods compared: preprocessed (none), diffusion (always run), histmatch, combat",
                                 items_choices=("preprocessed", "diffusion", "histmatch", "combat"))
    guidance_sweep: GuidanceSweep = section(GuidanceSweep, "Table 1: each setting harmonizes the sweep subjects again")
    external: dict[str, ExternalMethod] = setting({}, "NAME: {pattern, space, target} of a published method's "
                                                  "outputs to score alongside")
    figure_subject: str | None = setting(None, "subject of Figure 2 (null: the first test subject)")
    figure_sites: list[str] | None = setting(None, "Figure 2's columns, in order (null: every site the subject has)",
                                             min_items=1)


@dataclass(frozen=True)
class WorkflowConfig(Section):
    where: typing.ClassVar[str] = ""
    target_sites: list[str] = required("sites the test scans are harmonized to; each needs training scans, or "
                                       "target-only scans (cohort target) to learn its token from", min_items=1)
    cohort: CohortConfig = section(CohortConfig, "where the scans come from")
    grid: GridConfig = section(GridConfig, "the working grid (MNI space) and the model's patch")
    preprocess: PreprocessConfig = section(PreprocessConfig, "N4, skull strip, registration to MNI152")
    anatomy: AnatomyConfig = section(AnatomyConfig, "the anatomy map A and its coarse version")
    model: ModelConfig = section(ModelConfig, "the denoiser network")
    train: TrainConfig = section(TrainConfig, "training")
    harmonize: HarmonizeConfig = section(HarmonizeConfig, "sampling: DDIM with CFG / CFG++")
    learn_site: LearnSiteConfig = section(LearnSiteConfig, "a target site the model was not trained on: its token "
                                          "learned from its target-only scans")
    evaluation: EvaluationConfig = section(EvaluationConfig, "tables and figures")

    def check(self):
        if self.harmonize.steps > self.train.num_train_timesteps:
            raise ConfigError(f"harmonize.steps must be at most train.num_train_timesteps "
                              f"({self.train.num_train_timesteps}), got {self.harmonize.steps}")

    @classmethod
    def from_file(cls, path) -> WorkflowConfig:
        data = read_config_file(path)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

# --- settings files: what one stage's jobs read ------------------------------------------------

# the sections each stage's module reads from its --config file (the workflow writes them as
# results/config/<stage>.yaml; a workflow config file works too)
STAGE_SECTIONS = {"preprocess": ("grid", "preprocess"), "anatomy": ("grid", "anatomy"),
                  "harmonize": ("harmonize",), "train": ("grid", "anatomy", "model", "train"),
                  "synth": ("cohort.synthetic",), "learn_site": ("learn_site",)}


def section_at(data: dict, where: str):
    """The section at a dotted place of a config mapping (`cohort.synthetic`), or None."""
    for key in where.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def section_class(where: str) -> type:
    """The class of the workflow config's section at a dotted place."""
    cls = WorkflowConfig
    for key in where.split("."):
        cls = typing.get_type_hints(cls)[key]
    return cls


def read_config_file(path) -> dict:
    """The sections of a config file: a workflow config or a stage's settings file. Each section
    is validated by its class when it is read."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file is a mapping of sections, got {type(data).__name__}")
    return data


def load_settings(cls, path=None, given=None):
    """`cls`'s section of the config file at `path` (the class defaults without a file), with the
    options given on a command line on top: `given` is the parsed arguments, read by field name
    (an option left out is None), validated once by `cls`."""
    data = dict(section_at(read_config_file(path), cls.where) or {}) if path else {}
    for f in dataclasses.fields(cls):
        if getattr(given, f.name, None) is not None:
            data[f.name] = getattr(given, f.name)
    try:
        return cls.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def add_setting_options(parser: argparse.ArgumentParser, *sections, skip: tuple[str, ...] = ()) -> None:
    """One option per field of each section (`--patch-shape` for `patch_shape`), typed and with the
    choices and help of the field; a list field takes its items (a fixed count where the field has one).
    Every option defaults to None (not given), so that `load_settings` keeps the settings file's value;
    the field's own rules are checked there, once."""
    seen = set(skip)
    for cls in sections:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            hint = _optional_of(hints[f.name]) or hints[f.name]
            options = {"default": None, "help": f.metadata.get("help", "").replace("%", "%%")}
            if hint is bool:
                options["action"] = "store_true"
            elif typing.get_origin(hint) in (list, tuple):
                items = typing.get_args(hint)
                fixed = typing.get_origin(hint) is tuple and Ellipsis not in items
                options.update(type=items[0], nargs=len(items) if fixed else f.metadata.get("length", "+"))
            else:
                options["type"] = hint
            if "choices" in f.metadata and hint is not bool:
                options["choices"] = list(f.metadata["choices"])
            parser.add_argument("--" + f.name.replace("_", "-"), **options)


def settings_text(config: dict, stage: str) -> str:
    """The settings file of one stage (STAGE_SECTIONS) from a validated workflow config; a dotted
    section (`cohort.synthetic`) keeps its place (`cohort: {synthetic: ...}`)."""
    text: dict = {}
    for where in STAGE_SECTIONS[stage]:
        section = dict(section_at(config, where))
        if stage != "train":  # train-<run>.yaml keeps its keys as they were (its checkpoints record them)
            per_job = keys_with_role(section_class(where), "per_job")
            section = {k: v for k, v in section.items() if k not in per_job}
        *parents, name = where.split(".")
        place = text
        for parent in parents:
            place = place.setdefault(parent, {})
        place[name] = section
    return yaml.safe_dump(text, sort_keys=False)


# --- generated documents ----------------------------------------------------------------------

def _schema(hint, rules: dict) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _optional_of(hint) is not None:
        inner = _schema(_optional_of(hint), rules)
        inner["type"] = [inner["type"], "null"]
        return inner
    if dataclasses.is_dataclass(hint):
        return json_schema(hint)
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema(args[1], {})}
    if origin in (list, tuple):
        item_rules = {k.removeprefix("items_"): v for k, v in rules.items() if k.startswith("items_")}
        out = {"type": "array", "items": _schema(args[0], item_rules)}
        if "length" in rules:
            out["minItems"] = out["maxItems"] = rules["length"]
        elif "min_items" in rules:
            out["minItems"] = rules["min_items"]
        return out
    out = {"type": {bool: "boolean", int: "integer", float: "number", str: "string"}[hint]}
    for key, name in (("choices", "enum"), ("minimum", "minimum"), ("maximum", "maximum"),
                      ("exclusive_minimum", "exclusiveMinimum"), ("exclusive_maximum", "exclusiveMaximum")):
        if key in rules:
            out[name] = list(rules[key]) if key == "choices" else rules[key]
    return out


def json_schema(cls) -> dict:
    """The JSON schema (draft 2020-12 subset Snakemake validates with) of a config section."""
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        props[f.name] = {**_schema(hints[f.name], dict(f.metadata)), "description": f.metadata.get("help", "")}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    out = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    return out


def workflow_schema() -> dict:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "description": "harmodiff workflow configuration (generated by `python -m harmodiff.config schema` "
                           "from harmodiff/config.py; do not edit)", **json_schema(WorkflowConfig)}


def readme() -> str:
    """config/README.md: every key, its type, default and meaning."""
    lines = ["# Configuration", "",
             "Every key the workflow reads, generated from `src/harmodiff/config.py` by "
             "`python -m harmodiff.config readme > config/README.md` (a test keeps it current).",
             "A key or section left out takes the default below (what a run on real data should use); "
             "`config/config.yaml` is the CPU-sized demo, `config/test.yaml` the tiny test run, "
             "`config/srpbs.yaml` the paper's SRPBS setup.", "",
             "Run with your own file: `snakemake --profile workflow/profiles/default --configfile my.yaml` "
             "(without `--configfile`, `config/config.yaml` is used).", ""]

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        rows, sections = [], []
        for f in dataclasses.fields(cls):
            hint, key = hints[f.name], f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hint):
                sections += [("section", key, f.metadata.get("help", ""), None), *walk(hint, key + ".")]
                continue
            default = (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            default = "required" if default is dataclasses.MISSING else yaml.safe_dump(
                to_dict(default) if not isinstance(default, tuple) else list(default),
                default_flow_style=True).strip().removesuffix("...").strip()
            rule = ""
            if "choices" in f.metadata:
                rule = " (one of: " + ", ".join(map(str, f.metadata["choices"])) + ")"
            if f.metadata.get("roles"):
                rule += " [" + "; ".join(ROLES[r].split(":")[0] for r in f.metadata["roles"]) + "]"
            rows.append((_kind(hint), key, f.metadata.get("help", "") + rule, default))
        return rows + sections

    for kind, key, help_text, default in walk(WorkflowConfig, ""):
        if kind == "section":
            lines += ["", f"## `{key}`", "", help_text[0].upper() + help_text[1:] + ".", "",
                      "| key | type | default | meaning |", "|---|---|---|---|"]
        else:
            if not lines[-1].startswith("|"):
                lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
            lines.append(f"| `{key}` | {kind} | `{default}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.config", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("schema", help="print the workflow's JSON schema (YAML)")
    sub.add_parser("readme", help="print config/README.md")
    check = sub.add_parser("check", help="validate config files (merged in order) and print the full config")
    check.add_argument("files", nargs="+")
    a = p.parse_args(argv)
    if a.cmd == "schema":
        print(yaml.safe_dump(workflow_schema(), sort_keys=False, width=120), end="")
    elif a.cmd == "readme":
        print(readme(), end="")
    else:
        merged: dict = {}
        try:
            for path in a.files:
                merge(merged, yaml.safe_load(Path(path).read_text()) or {})
            print(yaml.safe_dump(WorkflowConfig.from_dict(merged).to_dict(), sort_keys=False), end="")
        except (ConfigError, OSError, yaml.YAMLError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def merge(base: dict, update: dict) -> dict:
    """base updated by update, mappings merged key by key (as Snakemake merges config files)."""
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


if __name__ == "__main__":
    raise SystemExit(main())
