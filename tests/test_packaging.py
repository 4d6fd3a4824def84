"""The conda environment installs what pyproject declares; the CLI and CI entry exist."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _spec(req: str) -> str:
    return req.replace(" ", "").lower()


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["notebooks"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pip_reqs = [r for r in pip if not r.startswith("-e")]
    assert "-e .[notebooks]" in pip
    assert any(d.startswith("python=3.11") for d in env["dependencies"] if isinstance(d, str))
    env_by_name = {_name(r): _spec(r) for r in pip_reqs}
    proj_by_name = {_name(r): _spec(r) for r in declared}
    assert env_by_name.pop("torch") == "torch==2.13.0"  # the CPU build, installed first as in the Makefile
    proj_by_name.pop("torch")
    assert env_by_name == proj_by_name


def test_makefile_installs_cpu_torch_before_the_package():
    make = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in make
    assert make.index('"$(TORCH)"') < make.index("-e \".[notebooks,test]\"")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "voco_lib.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "pretrain", "finetune", "nnunet", "phantom", "fetch", "weights", "tasks"):
        assert command in out.stdout
