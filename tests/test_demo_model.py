"""The demo's shipped model (resources/demo-model/) is the one config/config.yaml describes."""

from pathlib import Path

import yaml

from harmodiff import model as md
from harmodiff import train as tr
from harmodiff.model import ModelConfig
from harmodiff.workflow_support import scan_table

ROOT = Path(__file__).resolve().parents[1]


def _shipped():
    """The default config, its train section, the shipped model, the demo's training sites and the
    training record the config describes (what the train rule checks the model against)."""
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    train = config["train"]
    sites = list(scan_table(config).query("cohort == 'train'")["site"])
    record = tr.config_record(ModelConfig.from_dict(config["model"]), tr.TrainConfig.from_dict(train),
                              config["grid"]["patch_shape"], config["anatomy"])
    return config, train, ROOT / train["pretrained"], sites, record


def test_shipped_demo_model_matches_the_default_config():
    """Its sha256 is the configured one, it was trained on the demo's training sites with exactly
    the config's settings, its sidecar sha256 and model.json agree, and it fits the size limit."""
    import json

    config, train, path, sites, record = _shipped()
    ckpt = tr.check_pretrained(path, train["pretrained_sha256"], record, sites, tr.GridConfig.from_dict(config["grid"]))
    assert ckpt["step"] == train["steps"]
    assert ckpt["voxel_mm"] == [config["grid"]["spacing"]] * 3  # so harmonize checks its inputs' voxel size
    assert (path.parent / "checkpoint.pt.sha256").read_text().split()[0] == train["pretrained_sha256"]
    assert json.loads((path.parent / "model.json").read_text())["sha256"] == train["pretrained_sha256"]
    assert path.stat().st_size < 20 * 2**20
    model, record = md.load_model_for_inference(path)
    assert record.labels.sites == sorted(set(sites))


def test_the_shipped_model_checks_the_voxel_size_of_what_it_harmonizes(tmp_path):
    """It records its 2 mm training grid: a config on another grid is refused at the train rule,
    and a 1 mm scan of the same shape at harmonize."""
    import nibabel as nib
    import numpy as np
    import pytest

    from harmodiff.harmonize import check_voxel_size
    from harmodiff.io import InputError

    config, train, path, sites, record = _shipped()
    one_mm = tr.GridConfig.from_dict({**config["grid"], "spacing": 1.0})
    with pytest.raises(InputError, match=r"trained on a \[80, 96, 80\] grid of \[2.0, 2.0, 2.0\] mm voxels"):
        tr.check_pretrained(path, None, record, sites, one_mm)
    _, checkpoint = md.load_model_for_inference(path)
    scan = nib.Nifti1Image(np.ones((80, 96, 80), np.float32), np.eye(4))
    with pytest.raises(InputError, match=r"voxels of 1x1x1 mm, but .* was trained on 2x2x2 mm"):
        check_voxel_size("scan.nii.gz", scan.header.get_zooms(), checkpoint.voxel_mm, path)
