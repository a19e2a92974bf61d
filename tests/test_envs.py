"""Every rule names a conda env, the env files are valid, and they list what the rule's module imports."""

import ast
import re
import sys

import yaml

from conftest import ROOT

PIP_NAME = {"HD_BET": "hd-bet", "ants": "antspyx", "skimage": "scikit-image", "sklearn": "scikit-learn", "yaml": "pyyaml"}
OPTIONAL = {"spm"}  # optional backend (needs the MATLAB Runtime), imported only when chosen
STDLIB = set(sys.stdlib_module_names)


def _rules():
    rules = {}
    for smk in (ROOT / "workflow/rules").glob("*.smk"):
        for block in re.split(r"\n(?=rule )", smk.read_text()):
            m = re.match(r"rule (\w+):", block.strip())
            if not m:
                continue
            if "\n    run:" in block:  # runs inside Snakemake itself (writes a manifest): no env, kept local
                assert "localrule: True" in block, f"rule {m.group(1)} has a run block but is not a local rule"
                continue
            conda = re.search(r'conda:\s*\n\s*"([^"]+)"', block)
            module = re.search(r"python -m harmodiff\.(\w+)", block)
            rules[m.group(1)] = (smk, conda.group(1) if conda else None, module.group(1) if module else None)
    return rules


def _imports(module, seen=None):
    """Third-party top-level imports of a harmodiff module and the harmodiff modules it imports."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    tree = ast.parse((ROOT / f"src/harmodiff/{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top == "harmodiff":
                sub = name.split(".")[1] if "." in name else None
                subs = [sub] if sub else [a.name for a in node.names]
                for s in subs:
                    if (ROOT / f"src/harmodiff/{s}.py").is_file():
                        found |= _imports(s, seen)
            elif top not in STDLIB and top not in OPTIONAL and top != "__future__":
                found.add(PIP_NAME.get(top, top))
    return found


def _env_packages(path):
    env = yaml.safe_load(path.read_text())
    pkgs = set()
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            if item.startswith("--"):
                continue
            pkgs.add(re.split(r"[=<>!\[ ]", item)[0].lower())
    return pkgs


def test_every_rule_has_a_valid_env_listing_its_imports():
    rules = _rules()
    assert {"synth", "preprocess", "anatomy", "train", "harmonize", "segment", "leakage"} <= set(rules)
    for name, (smk, conda, module) in rules.items():
        assert conda, f"rule {name} in {smk.name} names no conda env"
        env_path = (smk.parent / conda).resolve()
        assert env_path.is_file(), f"rule {name}: {conda} not found"
        packages = _env_packages(env_path)
        if module:
            missing = {p.lower() for p in _imports(module)} - packages
            assert not missing, f"rule {name} runs harmodiff.{module}, whose imports {sorted(missing)} are not in {conda}"


def test_slurm_profile_routes_gpu_rules():
    prof = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    assert prof["executor"] == "slurm"
    for rule in ("train", "harmonize", "harmonize_all_settings"):
        assert prof["set-resources"][rule]["gpu"] == 1
    assert "gpu" not in prof["default-resources"]
