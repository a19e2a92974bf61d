"""A site learned with the network frozen (harmodiff.sites): the mechanics on an untrained tiny model.
Whether a learned site harmonizes is tests/test_learnability.py's (a trained model, a scanner it never saw)."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from harmodiff import harmonize as hz
from harmodiff import sites
from harmodiff.io import InputError
from harmodiff.model import ModelRecord, SiteLabels, save_checkpoint
from test_harmonize import CONFIG, _model
from test_train import TINY, phantom

SHAPE = (32, 40, 32)


def test_an_added_site_leaves_every_trained_label_where_it_was():
    labels = SiteLabels(["B", "A"], [-0.2, 0.0, 0.2])
    added = labels.with_site("AA")  # sorts between A and B: must still come last
    for site in ("A", "B"):
        for g in labels.levels:
            assert added.index(site, g) == labels.index(site, g)
    assert [added.index("AA", g) for g in labels.levels] == [7, 8, 9] and added.num_embeddings == 10
    assert SiteLabels.from_dict(added.to_dict()).index("AA", 0.0) == 8
    assert labels.to_dict() == SiteLabels.from_dict(labels.to_dict()).to_dict() and "added" not in labels.to_dict()
    with pytest.raises(ValueError, match="given twice"):
        added.with_site("A")


def _attending_model():
    """The tiny model with MONAI's zero-initialized layers (the attention output among them) drawn at
    random, so that the site token reaches the output as in a trained model."""
    model = _model(num_labels=3)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


def test_learning_moves_only_the_new_token():
    model = _attending_model()
    record = ModelRecord(CONFIG, SiteLabels(["A", "B"], [0.0]))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    volumes = [phantom("Z", k, shape=SHAPE) for k in range(2)]
    embeddings, losses = sites.learn_site(model, record, volumes, "Z", sites.LearnSiteConfig(steps=10, lr=0.1, batch_size=2))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # the network is frozen
    start = sites.starting_embeddings(model, record.labels)
    torch.testing.assert_close(start[0], (weights["site_embedding.weight"][1] + weights["site_embedding.weight"][2]) / 2)
    assert embeddings.shape == (1, TINY.context_dim) and not torch.allclose(embeddings, start)
    assert len(losses) == 10 and np.isfinite(losses).all()
    # appended as label 3 of a model that otherwise is the trained one
    grown, grown_record = sites.with_learned_site(_attending_model(), record, sites.LearnedSite(
        "Z", embeddings, (0.0,), "0" * 64, (), 10, tuple(losses)))
    assert grown_record.labels.index("Z") == 3
    torch.testing.assert_close(grown.site_embedding.weight[3], embeddings[0])
    torch.testing.assert_close(grown.site_embedding.weight[:3], weights["site_embedding.weight"])


@pytest.fixture()
def files(tmp_path):
    """A tiny checkpoint on a recorded 2 mm grid of SHAPE, two new-site scans, their sheet."""
    model = _model(num_labels=3)
    save_checkpoint(tmp_path / "ckpt.pt", {
        "model": model.state_dict(), "ema": model.state_dict(), "step": 1,
        "site_labels": SiteLabels(["A", "B"], [0.0]).to_dict(), "config": {**CONFIG, "model": TINY.to_dict()},
        "volume_shape": list(SHAPE), "voxel_mm": [2.0, 2.0, 2.0]})
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = []
    for k in range(2):
        v = phantom("Z", k, shape=SHAPE)
        nib.save(nib.Nifti1Image(v.image, aff), str(tmp_path / f"z{k}.nii.gz"))
        nib.save(nib.Nifti1Image(v.mask.astype(np.uint8), aff), str(tmp_path / f"z{k}_mask.nii.gz"))
        rows.append({"image": str(tmp_path / f"z{k}.nii.gz"), "mask": str(tmp_path / f"z{k}_mask.nii.gz")})
    pd.DataFrame(rows).to_csv(tmp_path / "new.tsv", sep="\t", index=False)
    return tmp_path


def _learn(d, *extra):
    return sites.main(["learn", "--checkpoint", str(d / "ckpt.pt"), "--manifest", str(d / "new.tsv"), "--site", "Z",
                       "--output", str(d / "Z.site.pt"), "--steps", "3", "--device", "cpu", *extra])


def test_the_cli_learns_a_site_harmonize_takes_it_and_records_its_sha256(files, capsys):
    from harmodiff.io import file_sha256

    assert _learn(files) == 0
    site = sites.LearnedSite.load(files / "Z.site.pt", files / "ckpt.pt")
    assert site.name == "Z" and site.steps == 3 and len(site.loss) == 3 and len(site.scans) == 2
    assert site.checkpoint_sha256 == file_sha256(files / "ckpt.pt") and (files / "Z.site_loss.png").is_file()
    args = ["--checkpoint", str(files / "ckpt.pt"), "--input", str(files / "z0.nii.gz"), "--mask",
            str(files / "z0_mask.nii.gz"), "--target-site", "Z", "--steps", "2", "--batch-size", "12",
            "--start-from", "source", "--strength", "0.4", "--device", "cpu", "--output", str(files / "h.nii.gz")]
    assert hz.main(args) == 2 and "unknown site 'Z'" in capsys.readouterr().err  # not without the file
    assert hz.main([*args, "--learned-site", str(files / "Z.site.pt")]) == 0
    sidecar = json.loads((files / "h.json").read_text())
    assert sidecar["learned_site"]["sha256"] == file_sha256(files / "Z.site.pt") and sidecar["target_site"] == "Z"


def test_bad_inputs_are_refused_in_one_line_and_write_nothing(files, capsys):
    out = files / "Z.site.pt"
    # a name that is a training site's
    assert sites.main(["learn", "--checkpoint", str(files / "ckpt.pt"), "--manifest", str(files / "new.tsv"),
                       "--site", "A", "--output", str(out), "--steps", "3"]) == 2
    assert "already a site of this model" in capsys.readouterr().err and not out.exists()
    # scans on another grid
    nib.save(nib.Nifti1Image(np.ones((30, 40, 32), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
             str(files / "z1.nii.gz"))
    assert _learn(files) == 2
    assert "is not the model's working grid" in capsys.readouterr().err and not out.exists()
    # an empty sheet
    (files / "new.tsv").write_text("image\tmask\n")
    with pytest.raises(SystemExit) as exit_:  # argparse's: the usage, then the one line
        _learn(files)
    assert exit_.value.code == 2 and "new.tsv: manifest has no rows" in capsys.readouterr().err and not out.exists()
    # a learned file used with another checkpoint
    sites.LearnedSite("Z", torch.zeros(1, TINY.context_dim), (0.0,), "f" * 64, (), 1, (0.0,)).save(out)
    with pytest.raises(InputError, match="learned for another checkpoint"):
        sites.LearnedSite.load(out, files / "ckpt.pt")
    (files / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="not a learned-site file"):
        sites.LearnedSite.load(files / "junk.pt")
