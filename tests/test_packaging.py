"""pyproject.toml and environment.yml must list the same dependencies."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        pip.update({_name(r): r.replace(" ", "") for r in extra})
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):  # the pip: section, for what conda-forge lacks
            conda.update({_name(r): r.replace(" ", "") for r in dep["pip"]})
        elif _name(dep) not in ("python", "pip"):
            name = CONDA_TO_PIP.get(_name(dep), _name(dep))
            conda[name] = name + dep.strip()[len(_name(dep)):]
    assert conda == pip


def test_readme_starts_with_two_commands_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 2
    setup_and_demo, tests = blocks[0].strip(), blocks[1].strip()
    assert "curvlens demo" in setup_and_demo and "pip install" in setup_and_demo
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()
