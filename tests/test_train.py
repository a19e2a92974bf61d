import csv
import os
import socket

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from scipy import ndimage

from harmodiff import model as md
from harmodiff import train as tr
from harmodiff.model import NULL_LABEL, ModelConfig, SiteLabels, build_model
from harmodiff.config import AnatomyConfig
from harmodiff.intensity import median_normalize

TINY = ModelConfig(channels=(8, 16, 16, 16), attention_levels=(False, True, True, False), num_res_blocks=1,
                   num_head_channels=8, context_dim=16, norm_num_groups=8)


def phantom(site, seed, shape=(24, 24, 24)):
    r = np.random.default_rng(seed)
    zz = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    rr = np.sqrt(sum(z * z for z in zz))
    img = np.where(rr < 0.5, 800.0, np.where(rr < 0.85, 400.0, 0)) + ndimage.gaussian_filter(r.normal(0, 60, shape), 1)
    m = rr < 0.85
    return tr.Volume(median_normalize(np.where(m, img, 0).astype(np.float32), m), m, site)


def test_site_labels_map_and_round_trip():
    labels = SiteLabels(["B", "A"], [-0.1, 0.0, 0.1])
    assert len(labels) == 6 and labels.num_embeddings == 7
    assert labels.index("A", -0.1) == 1 and labels.index("B", 0.1) == 6
    assert sorted(labels.index(s, g) for s in "AB" for g in (-0.1, 0, 0.1)) == list(range(1, 7))
    again = SiteLabels.from_dict(labels.to_dict())
    assert again.to_dict() == labels.to_dict()
    with pytest.raises(KeyError, match="unknown site 'C'; known sites: A, B"):
        labels.index("C")


def test_fresh_model_predicts_zero_and_uses_site_context():
    model = build_model(TINY, 5)
    x = torch.randn(2, 1, 16, 16, 16)
    out = model(x, torch.tensor([10, 500]), x, x, torch.tensor([1, 2]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # MONAI zero-inits the output conv
    with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
        build_model(ModelConfig(channels=(12, 16, 16, 16), norm_num_groups=8), 3)


def test_null_label_rate_matches_config():
    vols = [phantom("A", 0), phantom("B", 1)]
    cfg = tr.TrainConfig(null_prob=0.15, spatial_augmentation=False, contrast_levels=[-0.2, 0.0, 0.2])
    labels = SiteLabels(["A", "B"], cfg.contrast_levels)
    n = 1200
    spec = tr.SampleSpec(tuple(vols), labels, cfg, (8, 8, 8), AnatomyConfig())
    drawn = [tr.make_sample(spec, step, 0)[3] for step in range(n)]
    rate = np.mean(np.array(drawn) == NULL_LABEL)
    assert abs(rate - 0.15) < 3 * np.sqrt(0.15 * 0.85 / n)
    # the other labels cover every (site, level) pair
    assert set(drawn) - {NULL_LABEL} == set(range(1, 7))


def test_contrast_augmentation_is_gamma_on_unit_brain():
    v = phantom("A", 0)
    out = tr.contrast_augment(v.image, v.mask, 0.3)
    expected = median_normalize((v.image / v.image[v.mask].max()) ** np.exp(0.3), v.mask)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3)
    assert np.median(out[v.mask]) == pytest.approx(500, rel=1e-4)


def _fixed_eval_loss(model, x0, A, coarse, label, seed=0):
    from harmodiff.diffusion import NoiseSchedule

    sched = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 999, 16).long()
    noise = torch.randn((16, *x0.shape), generator=g)
    x = x0.expand(16, *x0.shape)
    with torch.no_grad():
        pred = model(sched.add_noise(x, noise, t), t, A.expand_as(x), coarse.expand_as(x), label.expand(16))
    return float(torch.nn.functional.mse_loss(pred, noise))


def test_overfits_one_tiny_volume(tmp_path):
    v = phantom("A", 0, shape=(16, 16, 16))
    v.mask[:] = True
    cfg = tr.TrainConfig(steps=150, batch_size=4, lr=3e-3, checkpoint_every=10**6, contrast_levels=[0.0],
                         null_prob=0.0, anatomy_log_gamma=0.0, spatial_augmentation=False, ema_decay=0.9)
    labels = SiteLabels(["A"], [0.0])
    x0, A, coarse, label, _, _ = tr.make_batch(tr.SampleSpec((v,), labels, cfg, (16, 16, 16), AnatomyConfig()), 0, [0])
    torch.manual_seed(0)
    before = _fixed_eval_loss(build_model(TINY, 2), x0[0], A[0], coarse[0], label)
    tr.train([v], tmp_path, model_cfg=TINY, cfg=cfg, patch_shape=(16, 16, 16), progress=False)
    model, _ = md.load_model_for_inference(tmp_path / "checkpoint.pt", use_ema=False)
    after = _fixed_eval_loss(model, x0[0], A[0], coarse[0], label)
    assert before == pytest.approx(1.0, abs=0.15)  # a fresh model predicts 0: loss = E[eps^2]
    assert after < before / 5, (before, after)


def _state(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)


def test_resume_gives_identical_weights(tmp_path):
    vols = [phantom("A", 0), phantom("B", 1)]
    cfg = tr.TrainConfig(steps=6, batch_size=2, checkpoint_every=2, contrast_levels=[-0.2, 0.0, 0.2])
    kw = dict(model_cfg=TINY, cfg=cfg, patch_shape=(16, 16, 16), progress=False)
    tr.train(vols, tmp_path / "straight", **kw)
    tr.train(vols, tmp_path / "resumed", max_steps=3, **kw)        # "killed" after step 3
    assert _state(tmp_path / "resumed")["step"] == 3
    tr.train(vols, tmp_path / "resumed", resume=True, **kw)
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    la = list(csv.DictReader(open(tmp_path / "straight/loss.csv")))
    lb = list(csv.DictReader(open(tmp_path / "resumed/loss.csv")))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    # the site-label map travels with the checkpoint
    _, record = md.load_model_for_inference(tmp_path / "resumed/checkpoint.pt")
    assert record.labels.index("B", 0.2) == 6 and record.patch_shape == (16, 16, 16)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, cfg_dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    vols = [phantom("A", 0), phantom("B", 1)]
    tr.train(vols, out, model_cfg=TINY, cfg=tr.TrainConfig(**cfg_dict), patch_shape=(16, 16, 16), progress=False)
    torch.distributed.destroy_process_group()


def test_ddp_two_gloo_processes_equal_one_process_with_double_batch(tmp_path):
    base = dict(steps=4, checkpoint_every=100, contrast_levels=[-0.2, 0.0, 0.2], spatial_augmentation=False)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), {**base, "batch_size": 1}), nprocs=2)
    torch.set_num_threads(1)
    tr.train([phantom("A", 0), phantom("B", 1)], tmp_path / "single", model_cfg=TINY,
             cfg=tr.TrainConfig(**base, batch_size=2), patch_shape=(16, 16, 16), progress=False)
    ddp = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "ddp/loss.csv"))]
    single = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "single/loss.csv"))]
    np.testing.assert_allclose(ddp, single, rtol=1e-4)
    a, b = _state(tmp_path / "ddp")["model"], _state(tmp_path / "single")["model"]
    for k in a:
        # Adam divides by sqrt(v): float-order differences in near-zero gradients show up at ~1e-6
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5)


def test_learning_rate_warm_up_and_linear_decay():
    cfg = tr.TrainConfig(steps=110, lr=1e-3, warmup_steps=10, lr_decay="linear")
    lrs = [tr.learning_rate(cfg, s) for s in range(110)]
    np.testing.assert_allclose(lrs[:10], [1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(5e-4) and lrs[-1] == pytest.approx(1e-5)
    assert tr.learning_rate(tr.TrainConfig(lr=2e-4), 5000) == 2e-4
    with pytest.raises(ValueError, match="prediction must be one of"):
        tr.TrainConfig(prediction="score")


def test_dataloader_workers_build_the_same_batches_as_the_loop():
    vols = [phantom("A", 0), phantom("B", 1)]
    cfg = tr.TrainConfig(batch_size=2, spatial_augmentation=True, contrast_levels=[-0.2, 0.0, 0.2], workers=2)
    labels = SiteLabels(["A", "B"], cfg.contrast_levels)
    spec = tr.SampleSpec(tuple(vols), labels, cfg, (8, 8, 8), AnatomyConfig())
    stream = tr.batches(spec, 3, 6, [2, 3])
    for step in range(3, 6):
        expected = tr.make_batch(spec, step, [2, 3])
        for got, want in zip(next(stream), expected):
            torch.testing.assert_close(got, want)


def test_without_self_attention_blocks_keep_only_the_site_cross_attention():
    """self_attention=False: the transformer blocks' self-attention adds nothing (the same model
    with its self-attention output zeroed gives the same result), it costs fewer FLOPs, and the
    site label still changes the output."""
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetTransformerBlock
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(**{**TINY.__dict__, "self_attention": False})
    torch.manual_seed(0)
    lean = build_model(cfg, 4)
    torch.manual_seed(0)
    full = build_model(TINY, 4)
    missing, unexpected = full.load_state_dict(lean.state_dict(), strict=False)
    assert missing and all(".attn1." in k for k in missing) and not unexpected
    for block in full.unet.modules():
        if isinstance(block, DiffusionUNetTransformerBlock):
            block.attn1.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    with torch.no_grad():  # MONAI zero-inits the output conv and the transformers' projections
        for p in lean.parameters():
            if not p.any():
                p.normal_(std=0.05)
    full.load_state_dict(lean.state_dict(), strict=False)
    x = torch.randn(2, 1, 16, 16, 16)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        a = lean(x, t, x, x, torch.tensor([1, 2]))
        torch.testing.assert_close(a, full(x, t, x, x, torch.tensor([1, 2])))
        assert (a - lean(x, t, x, x, torch.tensor([3, 3]))).abs().max() > 1e-4
    costs = []
    for model in (lean, build_model(TINY, 4)):
        with FlopCounterMode(display=False) as counter:
            model(x, t, x, x, torch.tensor([1, 2]))
        costs.append(counter.get_total_flops())
    assert costs[0] < costs[1]


def test_crop_shape_cuts_training_samples_from_the_same_draws(tmp_path):
    """train.crop_shape: samples have the crop's shape and are cut from the augmented volume
    exactly where the patch-shaped sample's draws say (same corner rule, same A), so a crop is the
    patch-shaped sample's content at its own corner; a net with self-attention is refused."""
    from harmodiff import anatomy as anat
    from harmodiff.patches import brain_bbox, extract, random_patch

    vols = [phantom("A", 0)]
    labels = SiteLabels(["A"], [0.0])
    an = {"alpha": 0.5, "sigma": 1.0, "coarse_factor": 2, "coarse_mode": "local"}
    cfg = tr.TrainConfig(spatial_augmentation=False, contrast_levels=[0.0], anatomy_log_gamma=0.0,
                         crop_shape=[8, 8, 16])
    x0, A, coarse, label, t, noise = tr.make_sample(tr.SampleSpec(tuple(vols), labels, cfg, (16, 16, 16),
                                                                  AnatomyConfig.of(an)), 4, 1)
    assert x0.shape == A.shape == coarse.shape == (1, 8, 8, 16) and noise.shape == (1, 8, 8, 16)
    rng = np.random.default_rng([cfg.seed, 4, 1])
    rng.integers(1)  # the volume draw
    rng.choice(cfg.contrast_levels)
    rng.uniform(0, 0)
    corner = random_patch(vols[0].image.shape, (8, 8, 16), brain_bbox(vols[0].mask), rng)
    full_A = anat.anatomy_map(vols[0].image, vols[0].mask)
    np.testing.assert_allclose(A[0], extract(full_A, corner, (8, 8, 16)), atol=1e-6)
    np.testing.assert_allclose(coarse[0], extract(anat.coarse_map(full_A, 2, "local"), corner, (8, 8, 16)), atol=1e-6)
    with pytest.raises(tr.InputError, match="crop_shape needs a convolutional net"):
        tr.train(vols, tmp_path / "run", model_cfg=TINY, cfg=cfg, patch_shape=(16, 16, 16),
                 anatomy_cfg=an, progress=False)
    with pytest.raises(ValueError, match=r"train.crop_shape must be a list of ints of length 3"):
        tr.training_shape(tr.TrainConfig(crop_shape=[8, 8]), (16, 16, 16))
    assert not (tmp_path / "run").exists()


def test_exported_model_is_checked_against_the_config_before_it_stands_in_for_training(tmp_path):
    """`export` keeps the EMA weights, config and labels (no optimizer) and records its sha256;
    `--pretrained` exports it as the run's model only when its sha256, training sites and every
    setting it was trained with match the config, naming what differs otherwise."""
    import json

    import nibabel as nib
    import yaml

    import dataclasses

    vols = [dataclasses.replace(phantom(s, i), voxel_mm=(2.0, 2.0, 2.0)) for i, s in enumerate("AB")]
    settings = dict(steps=2, batch_size=1, checkpoint_every=100, contrast_levels=[0.0], spatial_augmentation=False)
    tr.train(vols, tmp_path / "run", model_cfg=TINY, cfg=tr.TrainConfig(**settings), patch_shape=(16, 16, 16),
             progress=False)
    info = tr.export_model(tmp_path / "run/checkpoint.pt", tmp_path / "shipped")
    shipped = tmp_path / "shipped/checkpoint.pt"
    lean = torch.load(shipped, weights_only=True)
    full = _state(tmp_path / "run")
    assert set(lean) == {"model", "config", "site_labels", "step", "sha256", "volume_shape", "voxel_mm"}
    assert lean["step"] == 2
    assert lean["volume_shape"] == [24, 24, 24] and lean["voxel_mm"] == [2.0, 2.0, 2.0]  # the training grid travels
    for k, v in full["ema"].items():
        assert torch.equal(lean["model"][k], v), k
    assert (tmp_path / "shipped/checkpoint.pt.sha256").read_text().split()[0] == info["sha256"] == tr.file_sha256(shipped)
    assert (tmp_path / "shipped/loss.csv").read_text() == (tmp_path / "run/loss.csv").read_text()
    readable = json.loads((tmp_path / "shipped/model.json").read_text())
    assert readable["sha256"] == info["sha256"] and readable["config"]["train"]["steps"] == 2

    paths = []
    for v in vols:
        p = tmp_path / f"{v.site}.nii.gz"
        nib.save(nib.Nifti1Image(v.image, np.eye(4)), p)
        nib.save(nib.Nifti1Image(v.mask.astype(np.uint8), np.eye(4)), tmp_path / f"{v.site}_mask.nii.gz")
        paths.append(p)

    def run(train_settings, sha=info["sha256"], sites=("A", "B"), spacing=2.0):
        grid = {"spacing": spacing, "shape": [24, 24, 24], "patch_shape": [16, 16, 16]}
        cfg = {"model": TINY.to_dict(), "train": train_settings, "grid": grid, "anatomy": {}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        scans = _training_manifest(tmp_path / "scans.tsv", [(p, str(p).replace(".nii", "_mask.nii"), s)
                                                            for p, s in zip(paths, sites)])
        args = ["--config", str(tmp_path / "c.yaml"), "--manifest", scans, "--output-dir", str(tmp_path / "state"),
                "--export-dir", str(tmp_path / "out"),
                "--pretrained", str(shipped), "--pretrained-sha256", sha]
        return tr.main(args)

    assert run({**settings, "workers": 3}) == 0  # speed-only settings may differ
    assert (tmp_path / "out/checkpoint.pt").read_bytes() == shipped.read_bytes()
    assert not (tmp_path / "state").exists()  # nothing was trained
    model, record = md.load_model_for_inference(tmp_path / "out/checkpoint.pt")
    assert record.labels.sites == ["A", "B"]
    for k, v in full["ema"].items():
        assert torch.equal(model.state_dict()[k], v), k
    assert run({**settings, "lr": 2e-4}) == 2
    assert run(settings, sha="0" * 64) == 2
    assert run(settings, sites=("A", "C")) == 2
    assert run(settings, spacing=1.0) == 2  # trained on 2 mm voxels, the config's grid is 1 mm


def test_pretrained_mismatch_messages_name_the_key_and_the_file(tmp_path, capsys):
    vols = [phantom("A", 0)]
    settings = dict(steps=1, batch_size=1, checkpoint_every=100, contrast_levels=[0.0], spatial_augmentation=False)
    tr.train(vols, tmp_path / "run", model_cfg=TINY, cfg=tr.TrainConfig(**settings), patch_shape=(16, 16, 16),
             progress=False)
    path = tmp_path / "run/checkpoint.pt"
    record = tr.config_record(TINY, tr.TrainConfig(**{**settings, "lr": 2e-4}), (16, 16, 16), {})
    with pytest.raises(tr.InputError, match=r"checkpoint.pt: trained with other settings .*train\.lr: 0\.0001 -> 0\.0002"):
        tr.check_pretrained(path, None, record, ["A"])
    with pytest.raises(tr.InputError, match=r"sha256 [0-9a-f]{64} is not the configured abc"):
        tr.check_pretrained(path, "abc", record, ["A"])
    with pytest.raises(tr.InputError, match=r"trained on sites \['A'\], the training scans are at \['B'\]"):
        tr.check_pretrained(path, None, tr.config_record(TINY, tr.TrainConfig(**settings), (16, 16, 16), {}), ["B"])
    torch.save({"weight": torch.zeros(2)}, tmp_path / "bare.pt")
    with pytest.raises(tr.InputError, match="bare.pt: not a harmodiff model"):
        tr.check_pretrained(tmp_path / "bare.pt", None, record, ["A"])


@pytest.mark.parametrize("key, value, message", [
    ("steps", "4", "steps must be int, got '4'"),
    ("steps", -3, "steps must be > 0, got -3"),
    ("lr", 0, "lr must be > 0"),
    ("batch_size", 1.5, "batch_size must be int"),
    ("null_prob", 1.2, r"null_prob must be in \[0, 1\)"),
    ("spatial_augmentation", "yes", "spatial_augmentation must be bool"),
    ("contrast_levels", [], "contrast_levels must be a list of numbers"),
])
def test_train_config_types_and_ranges_are_one_line_errors(key, value, message):
    with pytest.raises(ValueError, match=f"train.{message}"):
        tr.TrainConfig.from_dict({key: value})


def test_the_workflow_train_section_is_accepted_as_is():
    """A config file's train section (run, threads, pretrained are the workflow's) loads as it is."""
    import yaml

    for name in ("config/config.yaml", "config/test.yaml", "config/srpbs.yaml"):
        section = yaml.safe_load(open(name))["train"]
        cfg = tr.TrainConfig.from_dict(section)
        assert cfg.steps == section["steps"] and cfg.prediction == section.get("prediction", "eps")


def _flip_tensor_bytes(path, n=64):
    """Flip n bytes in the middle of the largest tensor record of a torch zip checkpoint."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(open(path, "rb").read())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for i in range(start, start + n):
        raw[i] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def test_damaged_foreign_and_unsafe_checkpoints_are_refused_in_one_line(tmp_path):
    import pickle

    vols = [phantom("A", 0)]
    settings = dict(steps=1, batch_size=1, checkpoint_every=100, contrast_levels=[0.0], spatial_augmentation=False)
    tr.train(vols, tmp_path / "run", model_cfg=TINY, cfg=tr.TrainConfig(**settings), patch_shape=(16, 16, 16),
             progress=False)
    ckpt = tmp_path / "run/checkpoint.pt"
    state = tr.load_checkpoint(ckpt)
    assert state["sha256"]["model"] == md.weights_sha256(state["model"])
    assert state["sha256"]["ema"] == md.weights_sha256(state["ema"])
    # the hash sees a change of one weight
    changed = {k: v.clone() for k, v in state["model"].items()}
    next(iter(changed.values())).view(-1)[0] += 1e-3
    assert md.weights_sha256(changed) != state["sha256"]["model"]
    _flip_tensor_bytes(ckpt)
    with pytest.raises(tr.InputError, match=r"checkpoint.pt: damaged: the '(model|ema)' weights do not match"):
        md.load_model_for_inference(ckpt)
    torch.save(state["model"], tmp_path / "bare.pt")  # a bare state_dict
    with pytest.raises(tr.InputError, match="bare.pt: not a harmodiff model"):
        md.load_model_for_inference(tmp_path / "bare.pt")

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Payload(), f)
    torch.save({"x": Payload()}, tmp_path / "evil_zip.pt")
    for name in ("evil.pt", "evil_zip.pt"):
        with pytest.raises(tr.InputError) as err:
            tr.load_checkpoint(tmp_path / name)
        text = str(err.value)
        assert text.startswith(str(tmp_path / name)) and "\n" not in text
        assert "weights_only=False" not in text and "weights_only` to `False" not in text


def test_resume_only_continues_the_same_settings_and_data(tmp_path):
    """A resumed run with a changed setting or changed data does not continue the old state: it is
    moved to stale-N/ and the run starts fresh, ending equal to a straight run with the new
    settings. Temporaries of a killed write are removed, and a loss.csv that lags the checkpoint
    is rebuilt from the rows the checkpoint carries."""
    vols = [phantom("A", 0), phantom("B", 1)]
    base = dict(steps=4, batch_size=1, checkpoint_every=2, contrast_levels=[0.0], spatial_augmentation=False)
    kw = dict(model_cfg=TINY, patch_shape=(16, 16, 16), progress=False)
    run = tmp_path / "run"
    tr.train(vols, run, cfg=tr.TrainConfig(**base), max_steps=2, **kw)
    (run / ".checkpoint.abc123.pt").write_bytes(b"half a checkpoint")
    tr.train(vols, run, cfg=tr.TrainConfig(**{**base, "lr": 3e-4}), resume=True, **kw)
    assert not (run / ".checkpoint.abc123.pt").exists()
    assert _state(run / "stale-1")["step"] == 2
    tr.train(vols, tmp_path / "straight", cfg=tr.TrainConfig(**{**base, "lr": 3e-4}), **kw)
    a, b = _state(run), _state(tmp_path / "straight")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # other data: set aside again
    other = [phantom("A", 5), phantom("B", 1)]
    tr.train(other, run, cfg=tr.TrainConfig(**{**base, "lr": 3e-4}), resume=True, max_steps=2, **kw)
    assert (run / "stale-2" / "checkpoint.pt").is_file() and _state(run)["step"] == 2
    # same settings and data: resumes; a loss.csv that lost its last row is rebuilt
    lines = (run / "loss.csv").read_text().splitlines()
    (run / "loss.csv").write_text("\n".join(lines[:-1]) + "\n")
    tr.train(other, run, cfg=tr.TrainConfig(**{**base, "lr": 3e-4}), resume=True, **kw)
    assert not (run / "stale-3").exists()
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "loss.csv"))]
    assert steps == [1, 2, 3, 4]


def test_a_sigkilled_training_resumes_bit_identically(tmp_path):
    """The train CLI killed with SIGKILL at a random moment (mid-step or mid-checkpoint-write), then
    rerun with --resume: the same final weights and the same complete loss.csv as a run never killed."""
    import random
    import signal
    import subprocess
    import sys
    import time

    import nibabel as nib
    import yaml

    paths = []
    for site, seed in (("A", 0), ("B", 1)):
        v = phantom(site, seed)
        nib.save(nib.Nifti1Image(v.image, np.eye(4)), str(tmp_path / f"{site}.nii.gz"))
        nib.save(nib.Nifti1Image(v.mask.astype(np.uint8), np.eye(4)), str(tmp_path / f"{site}_m.nii.gz"))
        paths.append((tmp_path / f"{site}.nii.gz", tmp_path / f"{site}_m.nii.gz", site))
    config = {"model": TINY.to_dict(), "grid": {"patch_shape": [16, 16, 16]},
              "train": {"steps": 40, "batch_size": 1, "checkpoint_every": 1, "contrast_levels": [0.0],
                        "spatial_augmentation": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    args = [sys.executable, "-m", "harmodiff.train", "--config", str(tmp_path / "c.yaml"), "--threads", "1",
            "--device", "cpu", "--manifest", _training_manifest(tmp_path / "scans.tsv", paths), "--resume", "--output-dir"]
    subprocess.run([*args, str(tmp_path / "straight")], check=True, capture_output=True, timeout=600)
    killed_at = None
    for attempt in range(5):  # until a kill lands while training runs
        run = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen([*args, str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (run / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(random.Random(attempt).uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = _state(run)["step"]
        if step < 40:
            killed_at = step
            break
    assert killed_at is not None, "the training always finished before the kill"
    subprocess.run([*args, str(run)], check=True, capture_output=True, timeout=600)
    a, b = _state(tmp_path / "straight"), _state(run)
    assert a["step"] == b["step"] == 40
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    rows_a = list(csv.DictReader(open(tmp_path / "straight/loss.csv")))
    rows_b = list(csv.DictReader(open(run / "loss.csv")))
    assert [int(r["step"]) for r in rows_b] == list(range(1, 41))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert not list(run.glob(".checkpoint.*"))  # a killed write's temporary is cleaned up


def test_training_records_its_voxel_size_and_refuses_mixed_grids(tmp_path):
    vols = [phantom("A", 0), phantom("B", 1)]
    paths = []
    for i, (v, mm) in enumerate(zip(vols, (2.0, 2.0))):
        aff = np.diag([mm, mm, mm, 1.0])
        nib.save(nib.Nifti1Image(v.image, aff), str(tmp_path / f"i{i}.nii.gz"))
        nib.save(nib.Nifti1Image(v.mask.astype(np.uint8), aff), str(tmp_path / f"m{i}.nii.gz"))
        paths.append((tmp_path / f"i{i}.nii.gz", tmp_path / f"m{i}.nii.gz"))
    loaded = tr.load_volumes([p for p, _ in paths], [m for _, m in paths], ["A", "B"])
    assert loaded[0].voxel_mm == (2.0, 2.0, 2.0)
    run = tmp_path / "run"
    tr.train(loaded, run, cfg=tr.TrainConfig(steps=1, batch_size=1, checkpoint_every=1, contrast_levels=[0.0],
                                             spatial_augmentation=False),
             model_cfg=TINY, patch_shape=(16, 16, 16), progress=False)
    assert _state(run)["voxel_mm"] == [2.0, 2.0, 2.0]
    nib.save(nib.Nifti1Image(vols[1].image, np.diag([3.0, 3.0, 3.0, 1.0])), str(paths[1][0]))
    nib.save(nib.Nifti1Image(vols[1].mask.astype(np.uint8), np.diag([3.0, 3.0, 3.0, 1.0])), str(paths[1][1]))
    with pytest.raises(tr.InputError, match="training scans are on 2 different grids"):
        tr.load_volumes([p for p, _ in paths], [m for _, m in paths], ["A", "B"])


def _training_manifest(path, scans) -> str:
    """The train manifest (image, mask, site) of these (image, mask, site) triples."""
    pd.DataFrame([[str(v) for v in scan] for scan in scans], columns=["image", "mask", "site"]).to_csv(
        path, sep="\t", index=False)
    return str(path)
