"""Harmonize to a scanner the model never saw: its site token fitted to a few of its scans.

    python -m harmodiff.sites learn --checkpoint CKPT --manifest NEW_SITE.tsv --site NAME \\
        --output NAME.site.pt [--config results/config/learn_site.yaml] [--steps N --lr X --batch-size N --seed N]
        (the manifest's columns: image, mask: preprocessed scans of the new scanner and their brain masks;
        the settings and their defaults: config `learn_site`, `harmodiff.config.LearnSiteConfig`)
    python -m harmodiff.harmonize --checkpoint CKPT --learned-site NAME.site.pt --target-site NAME ...

The site enters the network only through one token (`model.HarmonizationUNet`: the site embedding, a
cross-attention context). With every weight of the network and every trained embedding frozen, the
new site's embeddings (one per contrast level of the label map, each started from the training
sites' mean at that level) are fitted to its scans by the training loss itself, on training samples
drawn as training draws them (`train.make_sample`: patches, contrast levels, the anatomy map's
perturbation), without the null label: the textual-inversion recipe (Gal et al. 2022) for a
diffusion model's conditioning. Minutes on a CPU, not the days a retraining takes.

The file (`LearnedSite`) records the checkpoint's sha256, the scans, the steps and the loss curve;
harmonize refuses it for another checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harmodiff.config import LearnSiteConfig, TrainConfig, add_setting_options, load_settings
from harmodiff.diffusion import NoiseSchedule
from harmodiff.io import InputError, atomic_path, check_outputs, file_sha256, load_image, one_line_errors
from harmodiff.manifests import add_manifest_option
from harmodiff.model import ModelRecord, SiteLabels


@dataclass(frozen=True)
class LearnedSite:
    """A site learned with the network frozen: its embeddings (levels x context width) and what they
    were learned from."""

    name: str
    embeddings: torch.Tensor
    levels: tuple[float, ...]
    checkpoint_sha256: str
    scans: tuple[str, ...]
    steps: int
    loss: tuple[float, ...]

    def save(self, path) -> None:
        state = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        state["embeddings"] = self.embeddings.detach().cpu().clone()
        with atomic_path(path) as tmp:
            torch.save({"harmodiff_learned_site": 1, **state}, tmp)

    @classmethod
    def load(cls, path, checkpoint=None) -> LearnedSite:
        """Read a learned site; given the checkpoint it is to be used with, refuse it for any other."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: learned site not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  # any unreadable file is one line, whatever torch raised
            raise InputError(f"{path}: not a learned-site file ({type(exc).__name__})") from None
        if not isinstance(state, dict) or state.pop("harmodiff_learned_site", None) != 1:
            raise InputError(f"{path}: not a learned-site file (write it with 'harmodiff.sites learn')")
        site = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in state.items()})
        digest = None if checkpoint is None else file_sha256(checkpoint)
        if digest is not None and digest != site.checkpoint_sha256:
            raise InputError(f"{path}: learned for another checkpoint (sha256 {site.checkpoint_sha256[:12]}..., "
                             f"{checkpoint} is {digest[:12]}...)")
        return site


class AddedSiteEmbedding(nn.Module):
    """The trained embedding table, frozen, with one site's rows appended as the only parameter."""

    def __init__(self, trained: nn.Embedding, added: torch.Tensor):
        super().__init__()
        self.register_buffer("trained", trained.weight.detach().clone())
        self.added = nn.Parameter(added.detach().clone())

    def forward(self, labels):
        return nn.functional.embedding(labels, torch.cat([self.trained, self.added]))


def _check_name(record: ModelRecord, name: str) -> SiteLabels:
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise InputError(f"site name {name!r}: use letters, digits, '-' and '_'")
    if name in record.labels.sites:
        raise InputError(f"site {name!r} is already a site of this model ({', '.join(record.labels.sites)}): "
                         "name the new scanner differently")
    return record.labels.with_site(name)


def with_learned_site(model, record: ModelRecord, site: LearnedSite):
    """(model, record) that also know `site` as a target: its embeddings appended to the table."""
    labels = _check_name(record, site.name)
    if list(site.levels) != record.labels.levels:
        raise InputError(f"learned site {site.name!r} has contrast levels {list(site.levels)}, the model "
                         f"{record.labels.levels}")
    old = model.site_embedding.weight
    table = nn.Embedding(old.shape[0] + len(site.levels), old.shape[1]).to(old.device, old.dtype)
    with torch.no_grad():
        table.weight.copy_(torch.cat([old.detach(), site.embeddings.to(old.device, old.dtype)]))
    model.site_embedding = table
    return model, dataclasses.replace(record, labels=labels)


def starting_embeddings(model, labels: SiteLabels) -> torch.Tensor:
    """Each contrast level's mean over the training sites' embeddings at that level."""
    weight = model.site_embedding.weight.detach()
    return torch.stack([weight[[labels.index(s, g) for s in labels.trained]].mean(0) for g in labels.levels])


def learn_site(model, record: ModelRecord, volumes, name: str, settings: LearnSiteConfig | None = None, *,
               device: str = "cpu", progress: bool = False, batches=None):
    """Fit a new site's embeddings to `volumes` (train.Volume, any site name) with everything else frozen,
    as `settings` say (steps, lr, batch_size, seed; None: the section's defaults). `batches(spec, step)`
    builds each step's batch (None: `train.make_batch`, as training draws them; a benchmark may redraw
    the timesteps). Returns (embeddings, loss per step)."""
    settings = LearnSiteConfig.of(settings)
    from tqdm import tqdm

    from harmodiff.train import SampleSpec, diffusion_loss, make_batch

    if not volumes:
        raise InputError(f"site {name!r}: no scans to learn it from")
    labels = _check_name(record, name)
    train_cfg = dataclasses.replace(TrainConfig.of(record.config["train"]), null_prob=0.0, seed=settings.seed,
                                    batch_size=settings.batch_size, spatial_augmentation=False, bf16=False,
                                    contrast_levels=list(record.labels.levels))
    spec = SampleSpec(tuple(dataclasses.replace(v, site=name) for v in volumes), labels, train_cfg,
                      record.patch_shape, record.anatomy)
    model = model.to(device).train()
    trained_table = model.site_embedding
    model.requires_grad_(False)
    model.site_embedding = AddedSiteEmbedding(trained_table, starting_embeddings(model, record.labels)).to(device)
    optimizer = torch.optim.Adam([model.site_embedding.added], lr=settings.lr)
    schedule = NoiseSchedule.linear(record.num_train_timesteps)
    if batches is None:
        def batches(spec_, step_):
            return make_batch(spec_, step_, range(settings.batch_size))
    losses = []
    try:
        for step in tqdm(range(settings.steps), desc=f"learn {name}", disable=not progress):
            loss = diffusion_loss(model, schedule, train_cfg, batches(spec, step), device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return model.site_embedding.added.detach().cpu().clone(), losses
    finally:
        model.site_embedding = trained_table
        model.eval()


def load_site_volumes(entries, record: ModelRecord, checkpoint) -> list:
    """The manifest's scans as train.Volume (`train.load_volumes`), after each image's header is checked
    against the model's working grid (`harmonize.check_voxel_size` for the voxels)."""
    from harmodiff.harmonize import check_voxel_size
    from harmodiff.train import load_volumes

    for path in entries["image"]:
        img = load_image(path)  # the header: the data are read once, by load_volumes
        if record.volume_shape is not None and tuple(img.shape) != tuple(record.volume_shape):
            raise InputError(f"{path}: shape {tuple(img.shape)} is not the model's working grid "
                             f"{tuple(record.volume_shape)} (preprocess it with the model's grid)")
        check_voxel_size(path, img.header.get_zooms(), record.voxel_mm, checkpoint)
    return load_volumes(entries["image"], entries["mask"], ["new"] * len(entries))


@one_line_errors
def main(argv=None) -> int:
    from harmodiff.model import load_model_for_inference
    from harmodiff.plotting import plot_loss

    p = argparse.ArgumentParser(prog="python -m harmodiff.sites", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    le = sub.add_parser("learn", help="fit a new site's token to a few of its preprocessed scans")
    le.add_argument("--checkpoint", required=True)
    add_manifest_option(le, ("image", "mask"), help="the new site's preprocessed scans and brain masks")
    le.add_argument("--site", required=True, help="the new site's name (not one of the model's sites)")
    le.add_argument("--output", required=True, help="NAME.site.pt; its loss curve is written beside it")
    le.add_argument("--config", help="settings file (its learn_site section: the workflow's "
                    "results/config/learn_site.yaml, or a workflow config); the options below override it")
    add_setting_options(le, LearnSiteConfig)
    le.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    settings = load_settings(LearnSiteConfig, a.config, a)
    out = Path(a.output)
    curve = out.with_name(out.name.removesuffix(".pt") + "_loss.png")
    check_outputs([out, curve], inputs=[a.checkpoint, a.manifest.attrs["path"], *a.manifest["image"],
                                        *a.manifest["mask"]])
    torch.set_num_threads(settings.threads)
    model, record = load_model_for_inference(a.checkpoint, a.device)
    _check_name(record, a.site)
    volumes = load_site_volumes(a.manifest, record, a.checkpoint)
    embeddings, losses = learn_site(model, record, volumes, a.site, settings, device=a.device, progress=True)
    site = LearnedSite(a.site, embeddings, tuple(record.labels.levels), file_sha256(a.checkpoint),
                       tuple(str(s) for s in a.manifest["image"]), settings.steps, tuple(losses))
    site.save(out)
    plot_loss([{"step": k + 1, "loss": v} for k, v in enumerate(losses)], curve)
    print(f"{out}: site {a.site} from {len(volumes)} scans, loss {np.mean(losses[:10]):.4f} -> "
          f"{np.mean(losses[-10:]):.4f} over {settings.steps} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
