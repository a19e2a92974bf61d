"""The demo's shipped model (resources/demo-model/) is the one config/config.yaml describes."""

from pathlib import Path

import yaml

from harmodiff import train as tr
from harmodiff.model import ModelConfig
from harmodiff.workflow_support import scan_table

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_demo_model_matches_the_default_config():
    """Its sha256 is the configured one, it was trained on the demo's training sites with exactly
    the config's settings, its sidecar sha256 and model.json agree, and it fits the size limit."""
    import json

    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    train = config["train"]
    path = ROOT / train["pretrained"]
    sites = list(scan_table(config).query("cohort == 'train'")["site"])
    record = tr.config_record(ModelConfig.from_dict(config["model"]), tr.TrainConfig.from_dict(train),
                              config["grid"]["patch_shape"], config["anatomy"])
    ckpt = tr.check_pretrained(path, train["pretrained_sha256"], record, sites)
    assert ckpt["step"] == train["steps"]
    assert (path.parent / "checkpoint.pt.sha256").read_text().split()[0] == train["pretrained_sha256"]
    assert json.loads((path.parent / "model.json").read_text())["sha256"] == train["pretrained_sha256"]
    assert path.stat().st_size < 20 * 2**20
    model, labels, _ = tr.load_model_for_inference(path)
    assert labels.sites == sorted(set(sites))
