"""harmodiff.config: one typed, validated description of every config key; the JSON schema and
config/README.md are generated from it and cannot drift."""

import copy
import re

import jsonschema
import pytest
import yaml

from conftest import ROOT
from harmodiff import config as hc

CONFIGS = ["config/config.yaml", "config/test.yaml", "config/srpbs.yaml"]


def test_committed_schema_and_readme_are_the_generated_ones():
    committed = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    assert committed == hc.workflow_schema(), "run: python -m harmodiff.config schema > workflow/schemas/config.schema.yaml"
    assert (ROOT / "config/README.md").read_text() == hc.readme(), \
        "run: python -m harmodiff.config readme > config/README.md"


def test_every_key_has_help_and_the_readme_names_it():
    text = hc.readme()

    def keys(cls, prefix=""):
        import dataclasses
        import typing

        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{prefix}{f.name} has no help text"
            if dataclasses.is_dataclass(hints[f.name]):
                yield from keys(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    names = list(keys(hc.WorkflowConfig))
    assert len(names) > 80
    missing = [k for k in names if f"| `{k}` |" not in text]
    assert not missing


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_pass_the_schema_and_the_classes(path):
    data = yaml.safe_load((ROOT / path).read_text())
    jsonschema.validate(data, hc.workflow_schema())
    full = hc.WorkflowConfig.from_dict(data).to_dict()
    for section, values in data.items():  # nothing given is changed, only defaults added
        if isinstance(values, dict):
            for key, value in values.items():
                if not isinstance(value, dict):
                    assert full[section][key] == value, (section, key)


BAD = [
    (("train", "steps"), "4", "train.steps must be int, got '4'"),
    (("train", "steps"), -3, "train.steps must be > 0, got -3"),
    (("grid", "spacing"), "two", "grid.spacing must be a number, got 'two'"),
    (("grid", "shape"), [80, 96], "grid.shape must be a list of ints of length 3"),
    (("anatomy", "alpha"), 1.5, r"anatomy.alpha must be in [0, 1], got 1.5"),
    (("anatomy", "coarse_mode"), "patch", "anatomy.coarse_mode must be one of local, global, got 'patch'"),
    (("harmonize", "guidance"), "cfg+", "harmonize.guidance must be one of none, cfg, cfgpp"),
    (("harmonize", "bf16"), "yes", "harmonize.bf16 must be bool, got 'yes'"),
    (("evaluation", "methods"), ["combat", "stgan"], "evaluation.methods must be one of"),
    (("model", "channels"), [16], "model.channels must be a list of ints (at least 2)"),
    (("train", "lr_typo"), 1, "train: unknown key 'lr_typo'"),
    (("cohort", "srpbs", "sites"), "ATV", "cohort.srpbs.sites must be a list of strings or null, got 'ATV'"),
]


@pytest.mark.parametrize("keys, value, message", BAD, ids=[".".join(b[0]) for b in BAD])
def test_schema_and_classes_reject_the_same_values(keys, value, message):
    data = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, hc.workflow_schema())
    with pytest.raises(hc.ConfigError) as info:
        hc.WorkflowConfig.from_dict(data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_missing_section_takes_the_class_defaults_not_the_demo():
    data = yaml.safe_load((ROOT / "config/srpbs.yaml").read_text())
    del data["model"]
    full = hc.WorkflowConfig.from_dict(data)
    assert full.model == hc.ModelConfig()
    assert list(full.model.channels) == [64, 128, 256, 256]  # the authors' widths, not the demo's 16-64
    demo = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    assert demo["model"]["channels"] != list(full.model.channels)


def test_sections_check_themselves_when_made_directly():
    with pytest.raises(hc.ConfigError, match="train.contrast_levels must include 0"):
        hc.TrainConfig(contrast_levels=[0.1, 0.2])
    with pytest.raises(hc.ConfigError, match=r"model.attention_levels needs one entry per level"):
        hc.ModelConfig(channels=(8, 16), attention_levels=(False, True, True))
    assert hc.ModelConfig(channels=[8, 16], attention_levels=[False, True]).channels == (8, 16)


def test_external_methods_need_every_field():
    data = copy.deepcopy(yaml.safe_load((ROOT / "config/test.yaml").read_text()))
    data["evaluation"]["external"] = {"stgan": {"pattern": "x/{scan_id}.nii.gz", "space": "native"}}
    with pytest.raises(hc.ConfigError, match="evaluation.external.stgan.target is required"):
        hc.WorkflowConfig.from_dict(data)


def test_each_setting_default_is_written_only_in_the_config_classes():
    """No module re-reads a config key with its own fallback or restates a sampling/anatomy default."""
    keys = "|".join(["alpha", "sigma", "coarse_factor", "coarse_mode", "normalize_erosion", "prediction",
                     "guidance", "scale", "steps", "patch_shape", "strength", "num_train_timesteps"])
    fallback = re.compile(rf"\.get\(\"({keys})\", ")
    restated = re.compile(r"(scale: float = 0\.6|alpha: float = 0\.5|sigma: float = 1\.0|default=0\.6\b|"
                          r"coarse_mode=\"local\"|mode: str = \"local\"|steps: int = 50\b|default=50\b)")
    offenders = []
    for path in sorted((ROOT / "src/harmodiff").glob("*.py")):
        if path.name == "config.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if fallback.search(line) or restated.search(line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders


def test_a_stage_reads_its_settings_file_with_the_command_line_on_top(tmp_path):
    """The file the workflow writes for a stage (settings_text) gives the module back the config's
    sections; an option given on the command line wins; per-job keys are not in the file."""
    cfg = hc.WorkflowConfig.from_dict(yaml.safe_load((ROOT / "config/srpbs.yaml").read_text())).to_dict()
    for stage, sections in hc.STAGE_SECTIONS.items():
        path = tmp_path / f"{stage}.yaml"
        path.write_text(hc.settings_text(cfg, stage))
        written = yaml.safe_load(path.read_text())
        assert list(written) == [name.split(".")[0] for name in sections]
        for name in sections:
            cls = hc.section_class(name)
            loaded = hc.load_settings(cls, path).to_dict()
            if stage == "train":
                assert loaded == hc.section_at(cfg, name)
            else:
                assert "threads" not in hc.section_at(written, name)
                assert loaded == {**hc.section_at(cfg, name), **{k: v for k, v in cls().to_dict().items()
                                                                 if k in hc.keys_with_role(cls, "per_job")}}
    harmonize = tmp_path / "harmonize.yaml"
    import argparse

    given = hc.load_settings(hc.HarmonizeConfig, harmonize, argparse.Namespace(scale=2.0, guidance=None))
    assert (given.scale, given.guidance, given.steps) == (2.0, cfg["harmonize"]["guidance"], cfg["harmonize"]["steps"])
    assert hc.load_settings(hc.HarmonizeConfig).to_dict() == hc.HarmonizeConfig().to_dict()  # no file: the defaults


def test_a_bad_settings_file_or_option_is_one_line_naming_it(tmp_path):
    import argparse

    bad = tmp_path / "harmonize.yaml"
    bad.write_text("harmonize:\n  scael: 1.0\n")
    with pytest.raises(hc.ConfigError, match=rf"^{re.escape(str(bad))}: harmonize: unknown key 'scael'"):
        hc.load_settings(hc.HarmonizeConfig, bad)
    with pytest.raises(hc.ConfigError, match=r"harmonize\.steps"):
        hc.load_settings(hc.HarmonizeConfig, None, argparse.Namespace(steps=0))
    with pytest.raises(hc.ConfigError, match="config file not found"):
        hc.load_settings(hc.HarmonizeConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(hc.ConfigError, match="a config file is a mapping of sections, got list"):
        hc.read_config_file(tmp_path / "list.yaml")


def test_each_keys_role_is_its_field_metadata():
    """What reruns, what a checkpoint records and what a settings file holds is decided by the
    fields' roles (the lists the code kept before, in field order)."""
    assert hc.keys_with_role(hc.TrainConfig, "workflow") == ("run", "threads", "pretrained", "pretrained_sha256")
    assert hc.keys_with_role(hc.TrainConfig, "speed") == ("checkpoint_every", "compile", "activation_checkpointing",
                                                          "workers")
    for cls in (hc.PreprocessConfig, hc.HarmonizeConfig, hc.TrainConfig):
        assert hc.keys_with_role(cls, "per_job") == ("threads",)
    assert hc.keys_with_role(hc.AnatomyConfig, "per_job") == ()
    assert set(hc.TrainConfig().training_settings()) == {f.name for f in hc.dataclasses.fields(hc.TrainConfig)} - {
        "run", "threads", "pretrained", "pretrained_sha256"}
    with pytest.raises(ValueError, match="unknown role"):
        hc.setting(1, "x", roles=("fast",))
