"""The method learns: a tiny model trained on a phantom population harmonizes a held-out subject.

Three phantom sites differ by their contrast curve (harmodiff.phantom). A tiny model is trained
for a few hundred steps on CPU (x0 target, the project's defaults otherwise); a held-out subject
scanned at site B is harmonized to A from pure noise (the paper's setting), and compared with the
same subject rendered noise-free at A. Breaking the conditioning, the noise schedule, the
sampler or the fusion makes these assertions fail (measured once, see docs/decisions.md).
"""

import numpy as np
import pytest
import torch

from harmodiff import phantom
from harmodiff import model as md
from harmodiff import train as tr
from harmodiff.config import HarmonizeConfig
from harmodiff.harmonize import harmonize_array
from harmodiff.metrics import ssim_psnr
from harmodiff.model import ModelConfig

MODEL = ModelConfig(channels=(8, 16, 16), attention_levels=(False, False, True), num_res_blocks=1,
                    num_head_channels=16, context_dim=32, norm_num_groups=8)
TRAIN = tr.TrainConfig(steps=1500, batch_size=4, lr=2e-3, warmup_steps=20, lr_decay="linear", grad_clip=1.0,
                       prediction="x0", null_prob=0.15, contrast_levels=[0.0], anatomy_log_gamma=0.7,
                       spatial_augmentation=False, ema_decay=0.9, checkpoint_every=1500, seed=0)
HELD_OUT = 99


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(2)
    volumes = []
    for k in range(12):
        site = "ABC"[k // 4]
        maps, brain = phantom.subject_maps(k)
        volumes.append(tr.Volume(phantom.render(maps, brain, site, seed=k), brain, site))
    out = tmp_path_factory.mktemp("learn")
    tr.train(volumes, out, model_cfg=MODEL, cfg=TRAIN, patch_shape=(16, 16, 16), progress=False)
    return md.load_model_for_inference(out / "checkpoint.pt")


def harmonize(trained, image, mask, target, scale=0.6, guidance="cfgpp"):
    model, record = trained
    out, _ = harmonize_array(model, record, image, mask, target,
                             HarmonizeConfig(guidance=guidance, scale=scale, steps=10, batch_size=27, start_from="noise",
                                             seed=0))
    return out


@pytest.mark.slow
def test_tiny_model_harmonizes_a_held_out_subject_to_the_target_site(trained):
    maps, brain = phantom.subject_maps(HELD_OUT)
    source = phantom.render(maps, brain, "B", seed=HELD_OUT)
    truth_a = phantom.render(maps, brain, "A", noise=0)
    to_a = harmonize(trained, source, brain, "A")
    before = ssim_psnr(source, truth_a, brain, brain)[0]
    after = ssim_psnr(to_a, truth_a, brain, brain)[0]
    # measured: before 0.895, after ~0.95
    assert after > before + 0.03, (before, after)
    # the site label steers: the same scan sent to site C is far from the truth at A ...
    to_c = harmonize(trained, source, brain, "C")
    assert ssim_psnr(to_c, truth_a, brain, brain)[0] < after - 0.03
    # ... and white matter lands near each target's own intensity (brain-median-500 units)
    wm = maps[2] > 0.9
    for out, site in ((to_a, "A"), (to_c, "C")):
        true_wm = np.median(phantom.render(maps, brain, site, noise=0)[wm])
        assert abs(np.median(out[wm]) - true_wm) < 0.35 * abs(true_wm - np.median(source[wm])), site
    # conditional and unconditional predictions differ: CFG++ lambda 0 (unconditional) != lambda 1
    uncond = harmonize(trained, source, brain, "A", scale=0.0)
    cond = harmonize(trained, source, brain, "A", scale=1.0)
    assert np.abs(cond - uncond)[brain].mean() > 20


def _site_d_scans():
    volumes = []
    for k in (20, 21, 22):
        maps, brain = phantom.subject_maps(k)
        volumes.append(tr.Volume(phantom.render(maps, brain, "D", seed=k), brain, "D"))
    return volumes


@pytest.mark.slow
def test_a_site_learned_with_the_network_frozen_harmonizes_to_a_scanner_never_trained_on(trained):
    """Site D (contrast exponent 1.3) is no training site: its token is fitted to three of its scans,
    and a held-out subject's site-B scan is harmonized to it."""
    import copy

    from harmodiff import sites

    model, record = trained
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    embeddings, losses = sites.learn_site(model, record, _site_d_scans(), "D", sites.LearnSiteConfig(steps=150, batch_size=4))
    # only the new token moved: every network weight and trained embedding is as it was
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    start = sites.starting_embeddings(model, record.labels)
    assert float((embeddings - start).norm()) > 0.1 * float(start.norm())
    assert np.mean(losses[-30:]) < np.mean(losses[:30])

    maps, brain = phantom.subject_maps(HELD_OUT)
    source = phantom.render(maps, brain, "B", seed=HELD_OUT)
    truth_d = phantom.render(maps, brain, "D", noise=0)
    scores = {}
    for name, rows in (("learned", embeddings), ("start", start)):
        site = sites.LearnedSite("D", rows, tuple(record.labels.levels), "0" * 64, (), 150, tuple(losses))
        with_d = sites.with_learned_site(copy.deepcopy(model), record, site)
        out = harmonize(with_d, source, brain, "D")
        scores[name] = ssim_psnr(out, truth_d, brain, brain)[0]
        if name == "learned":
            wm = maps[2] > 0.9
            true_wm = np.median(truth_d[wm])
            wm_error = abs(np.median(out[wm]) - true_wm) / abs(true_wm - np.median(source[wm]))
    unharmonized = ssim_psnr(source, truth_d, brain, brain)[0]
    print("site D:", scores, "unharmonized", unharmonized, "WM error share", wm_error)
    assert scores["learned"] > unharmonized + 0.02, (scores, unharmonized)
    assert scores["learned"] > scores["start"] + 0.01, scores  # the fitted token, not the starting one, does it
    assert wm_error < 0.35
