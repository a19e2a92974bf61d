"""Training of the conditional denoiser (paper sections 2.4, 2.5, 3.1 augmentation, 3.2).

Each training sample is drawn as the paper describes:
1. a training volume (preprocessed, brain median 500) is picked uniformly;
2. optionally one or two random spatial transforms (affine perturbation, elastic deformation,
   left-right flip; TorchIO) are applied to it and its mask;
3. a log-gamma contrast level g is drawn from `contrast_levels` and applied (TorchIO `Gamma` on
   the brain scaled to [0, 1], then median-normalized again); the site label becomes (site, g);
4. A is computed from the augmented volume under a random log-gamma u ~ U(-0.5, 0.5) (the
   paper's anatomy perturbation) and A_coarse from A;
5. a patch corner is drawn (`patches.random_patch`, overlapping the brain bounding box), and
   x0, A, A_coarse are cut there; with probability `null_prob` the label is the null label.

Loss: MSE against the prediction target (`prediction`: eps as in the paper, v or x0; the noise
schedule and its formulas are `harmodiff.diffusion.NoiseSchedule`), optionally weighted per sample
by min-SNR-gamma. Optimizer: AdamW with a linear warm-up
and an optional linear decay (the learning rate is a pure function of the step, so a resumed run
follows the same schedule), optional gradient-norm clipping. An EMA copy of the weights is kept
for sampling.

Samples are built by a `torch.utils.data` pipeline (`TrainingSamples`, `workers` processes):
sample building (full-volume deformation, anatomy map) runs beside the U-Net.

Determinism: every random draw of sample i at step s comes from generators seeded by
(seed, s, i), so a resumed run draws exactly what an uninterrupted run would, and a
data-parallel run with W processes of batch B draws exactly the samples of one process with
batch W*B (process r takes samples r*B .. r*B + B - 1 of each step).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harmodiff import anatomy as anat
from harmodiff.config import AnatomyConfig, GridConfig, TrainConfig, keys_with_role, read_config_file
from harmodiff.diffusion import NoiseSchedule
from harmodiff.io import InputError, atomic_path, file_sha256, load_image, load_mask, write_text, one_line_errors
from harmodiff.manifests import add_manifest_option
from harmodiff.plotting import plot_loss
from harmodiff.model import (NULL_LABEL, ModelConfig, ModelRecord, SiteLabels, build_model, load_checkpoint,
                             require_harmodiff_checkpoint, save_checkpoint)
from harmodiff.patches import brain_bbox, extract, random_patch
from harmodiff.intensity import median_normalize, to_model_units

CHECKPOINT = "checkpoint.pt"


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate at (0-based) `step`: linear warm-up over `warmup_steps`, then constant or a
    linear decay that reaches 0 at `steps`."""
    lr = cfg.lr
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "linear":
        span = max(1, cfg.steps - cfg.warmup_steps)
        return lr * max(0.0, 1.0 - (step - cfg.warmup_steps) / span)
    return lr


@dataclass
class Volume:
    image: np.ndarray   # brain median 500, background 0
    mask: np.ndarray
    site: str
    name: str = ""
    voxel_mm: tuple[float, float, float] | None = None  # the working grid's voxel size


# --------------------------------------------------------------------------------------------
# samples


def _torch_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**62))


def spatial_augment(vol: Volume, rng: np.random.Generator) -> Volume:
    """One or two of (affine perturbation, elastic deformation, left-right flip), via TorchIO."""
    import torchio as tio

    choices = {
        "affine": lambda: tio.RandomAffine(scales=0.05, degrees=5, translation=2, image_interpolation="linear"),
        "elastic": lambda: tio.RandomElasticDeformation(num_control_points=6, max_displacement=3),
        "flip": lambda: tio.Flip(axes=(0,)),  # axis 0 of the RAS working grid is left-right
    }
    names = list(choices)
    picked = rng.choice(names, size=int(rng.integers(1, 3)), replace=False)
    transform = tio.Compose([choices[n]() for n in sorted(picked, key=names.index)])
    torch.manual_seed(_torch_seed(rng))  # TorchIO draws its parameters from torch's global RNG
    subject = tio.Subject(
        image=tio.ScalarImage(tensor=torch.from_numpy(vol.image[None].astype(np.float32))),
        mask=tio.LabelMap(tensor=torch.from_numpy(vol.mask[None].astype(np.uint8))),
    )
    out = transform(subject)
    mask = out["mask"].data[0].numpy() > 0
    image = np.where(mask, np.clip(out["image"].data[0].numpy(), 0, None), 0.0).astype(np.float32)
    return Volume(image, mask, vol.site, vol.name, vol.voxel_mm)


def contrast_augment(image: np.ndarray, mask: np.ndarray, log_gamma: float) -> np.ndarray:
    """The paper's contrast augmentation: brain / max raised to exp(log_gamma) (TorchIO Gamma),
    then median-normalized again (brain median 500)."""
    if log_gamma == 0.0:
        return image
    import torchio as tio

    peak = float(image[mask].max())
    scaled = torch.from_numpy((np.clip(image, 0, None) / peak)[None].astype(np.float32))
    gamma = tio.Gamma(gamma=math.exp(log_gamma))
    out = gamma(tio.ScalarImage(tensor=scaled)).data[0].numpy()
    return median_normalize(out, mask)


def training_shape(cfg: TrainConfig, patch_shape) -> tuple[int, ...]:
    """The shape of the training samples: `crop_shape` when set, else the inference patch."""
    shape = tuple(int(p) for p in (cfg.crop_shape or patch_shape))
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"train config: crop_shape must be three positive sides, got {cfg.crop_shape!r}")
    return shape


@dataclass(frozen=True, eq=False)
class SampleSpec:
    """What every training sample is drawn from: the volumes, their site labels, the training
    settings, the inference patch (A_coarse `global` is at its shape; a sample has
    `training_shape(train, patch_shape)`) and the anatomy settings."""

    volumes: tuple[Volume, ...]
    labels: SiteLabels
    train: TrainConfig
    patch_shape: tuple[int, int, int]
    anatomy: AnatomyConfig

    @classmethod
    def of(cls, volumes, train: TrainConfig, patch_shape, anatomy=None) -> SampleSpec:
        """The spec of a training run: site labels from the volumes' sites and `train.contrast_levels`."""
        return cls(tuple(volumes), SiteLabels(sorted({v.site for v in volumes}), train.contrast_levels), train,
                   tuple(int(p) for p in patch_shape), AnatomyConfig.of(anatomy))


def make_sample(spec: SampleSpec, step: int, index: int):
    """Sample `index` of training step `step`: (x0, A, A_coarse, label, t, noise) as arrays."""
    cfg, anatomy_cfg = spec.train, spec.anatomy
    crop = training_shape(cfg, spec.patch_shape)
    rng = np.random.default_rng([cfg.seed, step, index])
    vol = spec.volumes[int(rng.integers(len(spec.volumes)))]
    if cfg.spatial_augmentation:
        vol = spatial_augment(vol, rng)
    level = float(rng.choice(cfg.contrast_levels))
    image = contrast_augment(vol.image, vol.mask, level)
    u = float(rng.uniform(-cfg.anatomy_log_gamma, cfg.anatomy_log_gamma))
    A = anat.anatomy_map_from_config(image, vol.mask, anatomy_cfg, log_gamma=u)
    mode = anatomy_cfg.coarse_mode
    coarse = anat.coarse_map(A, anatomy_cfg.coarse_factor, mode, spec.patch_shape)
    corner = random_patch(image.shape, crop, brain_bbox(vol.mask), rng)
    x0 = to_model_units(extract(image, corner, crop), extract(vol.mask, corner, crop))
    label = NULL_LABEL if rng.random() < cfg.null_prob else spec.labels.index(vol.site, level)
    gen = torch.Generator().manual_seed(_torch_seed(rng))
    t = int(torch.randint(0, cfg.num_train_timesteps, (1,), generator=gen))
    noise = torch.randn((1, *crop), generator=gen)
    return (x0[None], extract(A, corner, crop)[None],
            anat.coarse_patch(coarse, corner, crop, mode)[None], label, t, noise)


class TrainingSamples(torch.utils.data.Dataset):
    """Sample (step, index) of the training stream as a Dataset item, so a DataLoader's workers
    can build them. Item k of step s is `make_sample(spec, s, k)`: the draws depend only on
    (seed, step, index), whichever process builds them."""

    def __init__(self, spec: SampleSpec):
        self.spec = spec

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, key):
        step, index = key
        return make_sample(self.spec, step, index)


class StepBatches(torch.utils.data.Sampler):
    """Batches of (step, index) keys for steps start..end-1 (indices of this rank)."""

    def __init__(self, start: int, end: int, indices):
        self.start, self.end, self.indices = start, end, list(indices)

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self):
        for step in range(self.start, self.end):
            yield [(step, i) for i in self.indices]


def collate(samples):
    x0 = torch.from_numpy(np.stack([s[0] for s in samples]))
    A = torch.from_numpy(np.stack([s[1] for s in samples]))
    coarse = torch.from_numpy(np.stack([s[2] for s in samples]))
    label = torch.tensor([s[3] for s in samples], dtype=torch.long)
    t = torch.tensor([s[4] for s in samples], dtype=torch.long)
    noise = torch.stack([s[5] for s in samples])
    return x0, A, coarse, label, t, noise


def make_batch(spec: SampleSpec, step: int, indices):
    return collate([make_sample(spec, step, i) for i in indices])


def batches(spec: SampleSpec, start: int, end: int, indices):
    """The training batches of steps start..end-1, built by `spec.train.workers` DataLoader processes."""
    workers = spec.train.workers
    loader = torch.utils.data.DataLoader(
        TrainingSamples(spec), batch_sampler=StepBatches(start, end, indices), collate_fn=collate,
        num_workers=workers, persistent_workers=False, prefetch_factor=4 if workers else None)
    return iter(loader)


# --------------------------------------------------------------------------------------------
# checkpoints


def _ema(model, decay):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _ema_weights(ema) -> dict:
    return {k.removeprefix("module."): v for k, v in ema.state_dict().items() if k != "n_averaged"}


# --------------------------------------------------------------------------------------------
# training


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def diffusion_loss(net, schedule, cfg: TrainConfig, batch, device) -> torch.Tensor:
    """The training loss of one batch (`collate`'s tuple): the network's output on the noised x0 against
    the target `cfg.prediction` names, weighted per timestep as `cfg.loss_weighting` says."""
    x0, A, coarse, label, t, noise = (v.to(device) for v in batch)
    x_t = schedule.add_noise(x0, noise, t)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
        pred = net(x_t, t, A, coarse, label)
    per_sample = ((pred.float() - schedule.target(cfg.prediction, x0, noise, t)) ** 2).flatten(1).mean(1)
    return (schedule.loss_weight(cfg.prediction, cfg.loss_weighting, t, cfg.min_snr_gamma) * per_sample).mean()


class Trainer:
    """One training run in `output_dir`: the network, optimizer and EMA built from the settings,
    resumed from the run's checkpoint when it was made with the same settings and data (else that
    checkpoint is set aside and the run restarts), stepped, and saved (checkpoint.pt, loss.csv,
    site_labels.json) every `checkpoint_every` steps and at the end."""

    def __init__(self, spec: SampleSpec, model_cfg: ModelConfig, output_dir, device: str = "cpu"):
        cfg = spec.train
        if cfg.crop_shape and (spec.anatomy.coarse_mode == "global" or model_cfg.self_attention):
            raise InputError("train.crop_shape needs a convolutional net: model.self_attention false and "
                             "anatomy.coarse_mode local (self-attention and a global A_coarse see the whole patch)")
        self.spec, self.cfg, self.device = spec, cfg, device
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = _dist()
        torch.manual_seed(cfg.seed)
        self.model = build_model(model_cfg, spec.labels.num_embeddings).to(device)
        for name, shape in (("patch shape", spec.patch_shape), ("train.crop_shape", training_shape(cfg, spec.patch_shape))):
            if any(p % self.model.downsampling for p in shape):
                raise InputError(f"{name} {shape}: every side must be divisible by {self.model.downsampling} "
                                 f"(2^(levels-1) for {len(model_cfg.channels)} levels)")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = _ema(self.model, cfg.ema_decay)
        self.schedule = NoiseSchedule.linear(cfg.num_train_timesteps)
        first = spec.volumes[0]  # the working grid the model is trained on, recorded for harmonize's checks
        self.record = ModelRecord(config_record(model_cfg, cfg, spec.patch_shape, spec.anatomy), spec.labels,
                                  tuple(int(n) for n in first.image.shape),
                                  tuple(first.voxel_mm) if first.voxel_mm else None)
        self.data = data_fingerprint(spec.volumes)
        self.checkpoint_path, self.loss_csv = self.out / CHECKPOINT, self.out / "loss.csv"
        self.step, self.rows = 0, []
        if self.rank == 0:
            for stale in [*self.out.glob(".checkpoint.*.pt"), *self.out.glob(".loss.*.csv"),
                          *self.out.glob(".loss.*.png")]:
                stale.unlink(missing_ok=True)  # temporaries of a write that was killed

    def resume_or_restart(self) -> None:
        """Continue from the run's checkpoint, or set it aside (and start at step 0) when it was made
        with other settings, data or site labels."""
        if not self.checkpoint_path.is_file():
            return
        state = load_checkpoint(self.checkpoint_path, map_location=self.device)
        changed = record_differences(state.get("config") or {}, self.record.config)
        if state.get("data") not in (None, self.data):
            changed.append("the training data (images, masks or sites)")
        if SiteLabels.from_dict(state["site_labels"]).to_dict() != self.record.labels.to_dict():
            changed.append("the site labels")
        if changed:
            aside = set_aside(self.out) if self.rank == 0 else None
            print(f"train: {self.checkpoint_path} was made with other settings or data ({'; '.join(changed)}): "
                  f"moved to {aside}, starting a fresh run", file=sys.stderr)
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema_state"])
        self.step = int(state["step"])
        if state.get("loss_rows") is not None:  # the log as the checkpoint saw it (loss.csv may lag by one write)
            self.rows = [dict(r) for r in state["loss_rows"]]
        elif self.step > 0 and self.loss_csv.is_file():
            with open(self.loss_csv) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.step]

    def save(self, step: int) -> None:
        if self.rank != 0:
            return
        save_checkpoint(self.checkpoint_path, {
            "model": self.model.state_dict(), "ema": _ema_weights(self.ema), "ema_state": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "step": step, **self.record.to_checkpoint(),
            "torch_rng": torch.get_rng_state(), "data": self.data, "loss_rows": [dict(r) for r in self.rows],
        })
        with atomic_path(self.loss_csv) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "seconds"])
            w.writeheader()
            w.writerows(self.rows)
        write_text(json.dumps(self.spec.labels.to_dict(), indent=1) + "\n", self.out / "site_labels.json")

    def _network(self):
        """The network the steps run: activation checkpointing (after the EMA copy, which must keep its
        own forward), data parallel across processes, torch.compile, as the settings ask."""
        if self.cfg.activation_checkpointing:
            self.model.use_activation_checkpointing()
        net = self.model
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(self.model)
        return torch.compile(net) if self.cfg.compile else net

    def train_step(self, net, step: int, batch) -> tuple[torch.Tensor, float]:
        """One optimizer step on a batch; (the loss averaged over processes, the learning rate)."""
        cfg = self.cfg
        loss = diffusion_loss(net, self.schedule, cfg, batch, self.device)
        lr = learning_rate(cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.ema.update_parameters(self.model)
        value = loss.detach()
        if self.world > 1:
            torch.distributed.all_reduce(value)
            value /= self.world
        return value, lr

    def run(self, end: int, progress: bool = True) -> dict:
        """Steps from the current one to `end`, saving on the way and at the end; loss.png at the end."""
        from tqdm import tqdm

        net = self._network()
        t_start = time.perf_counter()
        bar = tqdm(range(self.step, end), initial=self.step, total=end, desc="train",
                   disable=not progress or self.rank != 0)
        self.model.train()
        size = self.cfg.batch_size
        stream = batches(self.spec, self.step, end, range(self.rank * size, (self.rank + 1) * size))
        for step in bar:
            value, lr = self.train_step(net, step, next(stream))
            self.rows.append({"step": step + 1, "loss": f"{float(value):.6g}", "lr": f"{lr:.6g}",
                              "seconds": f"{time.perf_counter() - t_start:.3f}"})
            bar.set_postfix(loss=f"{float(value):.4f}")
            if (step + 1) % self.cfg.checkpoint_every == 0 and step + 1 < end:
                self.save(step + 1)
        self.step = end
        self.save(end)
        if self.rank == 0:
            plot_loss(self.rows, self.out / "loss.png")
        losses = [float(r["loss"]) for r in self.rows]
        return {"step": end, "loss_first": losses[0] if losses else math.nan,
                "loss_last": losses[-1] if losses else math.nan}


def train(volumes: list[Volume], output_dir, *, model_cfg: ModelConfig, cfg: TrainConfig, patch_shape,
          anatomy_cfg: dict | None = None, resume: bool = False, max_steps: int | None = None,
          device: str = "cpu", progress: bool = True) -> dict:
    """Train (or resume) and write checkpoint.pt, loss.csv, loss.png into `output_dir`.

    Returns {'step', 'loss_first', 'loss_last'}. `max_steps` stops early (the checkpoint then
    holds that step; `resume` continues from it)."""
    trainer = Trainer(SampleSpec.of(volumes, cfg, patch_shape, anatomy_cfg), model_cfg, output_dir, device)
    if resume:
        trainer.resume_or_restart()
    return trainer.run(cfg.steps if max_steps is None else min(cfg.steps, int(max_steps)), progress)


# --------------------------------------------------------------------------------------------
# a model trained elsewhere (the demo's shipped model)



def data_fingerprint(volumes) -> str:
    """sha256 of the training volumes (site, image and mask bytes, in order)."""
    h = hashlib.sha256()
    for v in volumes:
        h.update(f"{v.site}|{v.image.shape}|".encode())
        h.update(np.ascontiguousarray(v.image, np.float32).tobytes())
        h.update(np.packbits(np.asarray(v.mask, bool)).tobytes())
    return h.hexdigest()


def set_aside(out: Path) -> Path:
    """Move a run's state files into the first free out/stale-N/ (nothing is deleted)."""
    n = 1
    while (out / f"stale-{n}").exists():
        n += 1
    aside = out / f"stale-{n}"
    aside.mkdir()
    for name in (CHECKPOINT, "loss.csv", "loss.png", "site_labels.json"):
        if (out / name).exists():
            os.replace(out / name, aside / name)
    return aside


def config_record(model_cfg: ModelConfig, cfg: TrainConfig, patch_shape, anatomy_cfg) -> dict:
    """What a checkpoint records of the settings it was trained with."""
    return {"model": model_cfg.to_dict(), "train": cfg.training_settings(), "patch_shape": [int(p) for p in patch_shape],
            "anatomy": AnatomyConfig.of(anatomy_cfg).to_dict()}


def _record_defaults() -> dict:
    return {"model": ModelConfig().to_dict(), "train": TrainConfig().training_settings(),
            "anatomy": AnatomyConfig().to_dict()}


def record_differences(saved: dict, wanted: dict) -> list[str]:
    """'section.key: saved -> wanted' for every setting that differs (speed-only keys ignored)."""
    out = []
    defaults = _record_defaults()
    for section in sorted(set(saved) | set(wanted)):
        a, b = saved.get(section), wanted.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            # a setting added after a model was trained: that model has its default (the old behaviour)
            a = {**defaults.get(section, {}), **a}
            for key in sorted(set(a) | set(b)):
                if section == "train" and key in keys_with_role(TrainConfig, "speed"):
                    continue
                if a.get(key) != b.get(key):
                    out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
        elif a != b:
            out.append(f"{section}: {a!r} -> {b!r}")
    return out


def check_pretrained(path, sha256: str | None, record: dict, sites, grid=None) -> dict:
    """Load a model trained elsewhere and prove it is the one the config describes: its sha256
    (when given), its training sites, every setting it was trained with and (given `grid`, a
    GridConfig) the working grid it was trained on, which harmonize checks its inputs against.
    Returns the checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: pretrained model not found")
    digest = file_sha256(path) if sha256 else None
    if digest and digest != sha256.lower():
        raise InputError(f"{path}: sha256 {digest} is not the configured {sha256}")
    ckpt = require_harmodiff_checkpoint(load_checkpoint(path), path)
    if not isinstance(ckpt.get("sha256"), dict) or "model" not in ckpt["sha256"]:
        raise InputError(f"{path}: has no content hash of its weights (write it with 'harmodiff.train export')")
    trained = ModelRecord.from_checkpoint(ckpt)
    have = trained.labels.sites
    if sites and have != sorted(set(map(str, sites))):  # no training scans: the run's sites are the model's
        raise InputError(f"{path}: trained on sites {have}, the training scans are at {sorted(set(sites))}")
    diff = record_differences(trained.config, record)
    if diff:
        raise InputError(f"{path}: trained with other settings than the config ({'; '.join(diff)}); "
                         "set train.pretrained: null to train with these")
    if grid is not None:
        if trained.voxel_mm is None:
            raise InputError(f"{path}: records no training grid (voxel_mm), so harmonize could not check its "
                             "inputs' voxel size; export it again with 'harmodiff.train export'")
        want = {"voxel_mm": [float(grid.spacing)] * 3, "volume_shape": [int(s) for s in grid.shape]}
        have = {k: [type(w[0])(x) for x in getattr(trained, k) or []] for k, w in want.items()}
        if have != want:
            raise InputError(f"{path}: trained on a {have['volume_shape']} grid of {have['voxel_mm']} mm voxels, the "
                             f"config's grid is {want['volume_shape']} at {grid.spacing:g} mm")
    return ckpt


def export_model(checkpoint, output_dir) -> dict:
    """The inference part of a training checkpoint (EMA weights as `model`, config, site labels,
    step) written to output_dir/checkpoint.pt with its loss.csv / loss.png beside it, the
    checkpoint's sha256 in checkpoint.pt.sha256 and its settings, readable, in model.json.
    Returns {'sha256', 'bytes'}."""
    ckpt = load_checkpoint(checkpoint)
    record = ModelRecord.from_checkpoint(ckpt).to_checkpoint()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / CHECKPOINT, {"model": ckpt.get("ema") or ckpt["model"], **record, "step": ckpt["step"]})
    _copy_files([n for n in ("loss.csv", "loss.png") if (Path(checkpoint).parent / n).is_file()],
                Path(checkpoint).parent, out)
    digest = file_sha256(out / CHECKPOINT)
    write_text(f"{digest}  {CHECKPOINT}\n", out / f"{CHECKPOINT}.sha256")
    write_text(json.dumps({"step": ckpt["step"], "sha256": digest, "config": record["config"],
                           "site_labels": record["site_labels"]}, indent=1) + "\n", out / "model.json")
    return {"sha256": digest, "bytes": (out / CHECKPOINT).stat().st_size}


# --------------------------------------------------------------------------------------------
# CLI


def load_volumes(images, masks, sites) -> list[Volume]:
    vols = []
    for img_p, mask_p, site in zip(images, masks, sites, strict=True):
        img = load_image(img_p)
        mask = load_mask(mask_p, like=img)
        if not mask.any():
            raise InputError(f"{mask_p}: brain mask is empty")
        vols.append(Volume(np.asarray(img.dataobj, np.float32), mask, str(site), str(img_p),
                           tuple(round(float(z), 6) for z in img.header.get_zooms()[:3])))
    grids = {(v.image.shape, v.voxel_mm) for v in vols}
    if len(grids) > 1:
        raise InputError(f"training scans are on {len(grids)} different grids (shape, voxel mm): "
                         f"{sorted(grids)[:3]}; preprocess them all with one grid config")
    return vols


@one_line_errors
def export_main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.train export",
                                description="Write the inference part of a training checkpoint (e.g. the demo model).")
    p.add_argument("checkpoint")
    p.add_argument("output_dir")
    a = p.parse_args(argv)
    print(json.dumps(export_model(a.checkpoint, a.output_dir)))
    return 0


def _copy_files(names, src_dir: Path, dst_dir: Path, sources: dict | None = None) -> None:
    """Copy src_dir/<name> (or sources[name]) to dst_dir/<name>, each atomically."""
    import shutil

    for name in names:
        with atomic_path(dst_dir / name) as tmp:
            shutil.copyfile((sources or {}).get(name, src_dir / name), tmp)


def _copy_outputs(src_dir: Path, dst_dir: Path, checkpoint: Path | None = None) -> None:
    """The train rule's outputs (checkpoint.pt, loss.csv, loss.png); `checkpoint` replaces src_dir's."""
    _copy_files((CHECKPOINT, "loss.csv", "loss.png"), src_dir, dst_dir, {CHECKPOINT: checkpoint} if checkpoint else None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m harmodiff.train", description="Train the conditional denoiser.")
    p.add_argument("--config", help="workflow config YAML (its sections model, train, grid, anatomy are read)")
    p.add_argument("--scans", help="scan sheet; its train rows are used, images found under --preprocessed-dir")
    p.add_argument("--preprocessed-dir", default="results/preprocessed")
    add_manifest_option(p, ("image", "mask", "site"), required=False, help="the preprocessed training scans (or --scans)")
    p.add_argument("--output-dir", required=True, help="where checkpoint.pt, loss.csv and loss.png are kept up to date")
    p.add_argument("--resume", action="store_true", help="continue from output-dir/checkpoint.pt if it exists")
    p.add_argument("--export-dir", help="when training ends, copy checkpoint.pt, loss.csv and loss.png here "
                   "(the Snakemake rule's outputs, kept apart so a rerun can resume from output-dir)")
    p.add_argument("--pretrained", help="a model trained elsewhere with exactly these settings (e.g. the demo's "
                   "shipped one): checked against the config and the training sites, then exported instead of training")
    p.add_argument("--pretrained-sha256", help="the sha256 --pretrained must have")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        config = read_config_file(a.config) if a.config else {}
        if a.scans:
            from harmodiff.scans import read_scan_sheet

            sheet = read_scan_sheet(a.scans, check_files=False)
            sheet = sheet[sheet["cohort"] == "train"]
            base = Path(a.preprocessed_dir)
            images = [base / r.cohort / r.site / f"{r.scan_id}.nii.gz" for r in sheet.itertuples()]
            masks = [base / r.cohort / r.site / f"{r.scan_id}_mask.nii.gz" for r in sheet.itertuples()]
            sites = list(sheet["site"])
        elif a.manifest is not None:
            images, masks, sites = (list(a.manifest[c]) for c in ("image", "mask", "site"))
        else:
            images, masks, sites = [], [], []
        if not images and not a.pretrained:
            raise InputError("no training scans: give --scans SHEET or --manifest FILE "
                             "(or --pretrained, a trained model)")
        model_cfg = ModelConfig.from_dict(config.get("model"))
        cfg = TrainConfig.from_dict(config.get("train"))
        grid = GridConfig.of(config.get("grid"))
        patch_shape = grid.patch_shape
        if a.pretrained:
            ckpt = check_pretrained(a.pretrained, a.pretrained_sha256,
                                    config_record(model_cfg, cfg, patch_shape, config.get("anatomy")), sites, grid)
            _copy_outputs(Path(a.pretrained).parent, Path(a.export_dir or a.output_dir), Path(a.pretrained))
            print(json.dumps({"pretrained": str(a.pretrained), "step": int(ckpt.get("step", 0))}))
            return 0
        volumes = load_volumes(images, masks, sites)
        result = train(volumes, a.output_dir, model_cfg=model_cfg, cfg=cfg, patch_shape=patch_shape,
                       anatomy_cfg=config.get("anatomy"), resume=a.resume, max_steps=a.max_steps,
                       device=a.device)
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.export_dir and int(os.environ.get("RANK", "0")) == 0:
        _copy_outputs(Path(a.output_dir), Path(a.export_dir))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
