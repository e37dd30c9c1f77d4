"""The pins agree everywhere: pyproject.toml, requirements.lock and the conda envs."""

import re
import tomllib

import yaml

from conftest import REPO


def _pins(lines):
    return dict(line.strip().split("==", 1) for line in lines if "==" in line and not line.lstrip().startswith("#"))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_project_pins_are_exact_and_locked():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["test"]
    assert all("==" in d for d in deps), "every direct dependency is pinned exactly"
    assert "torch==2.13.0" in deps
    lock = {_norm(k): v for k, v in _pins((REPO / "requirements.lock").read_text().splitlines()).items()}
    for name, version in _pins(deps).items():
        assert lock.get(_norm(name)) == version, f"{name}: pyproject {version}, lock {lock.get(_norm(name))}"


def test_conda_envs_use_the_project_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {_norm(k): v for k, v in _pins(project["dependencies"]).items()}
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert {e.stem for e in envs} >= {"train", "prune", "evaluate", "report"}
    for env in envs:
        pip = next(d["pip"] for d in yaml.safe_load(env.read_text())["dependencies"] if isinstance(d, dict))
        for name, version in _pins(pip).items():
            assert pins.get(_norm(name)) == version, f"{env.name}: {name}=={version} differs from pyproject"
        assert "torch" in {_norm(n) for n in _pins(pip)}


def test_every_rule_declares_a_conda_env_that_exists():
    for rule_file in (REPO / "workflow" / "rules").glob("*.smk"):
        for env in re.findall(r'conda:\s*\n\s*"([^"]+)"', rule_file.read_text()):
            assert (rule_file.parent / env).resolve().is_file(), f"{rule_file.name}: {env} missing"
