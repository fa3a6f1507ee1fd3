"""README's commands work: every fenced bash command runs (in order, in a scratch folder with
the bundled models), and its recipe example is a valid recipe."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                commands.append(line)
    return commands


def test_readme_is_short_and_starts_with_the_two_commands():
    assert len(README.splitlines()) <= 250
    first, second = _commands()[:2]
    assert first.startswith("pip install -e . && onnxcomp optimize models/")
    # the test command is CI's (.ci/run runs the same line)
    assert second.replace("pip install -e", "pip install -q -e") in (
        ROOT / ".ci" / "run").read_text()


def test_every_readme_command_runs(tmp_path):
    """Installed already (pip) and tested already (pytest): the rest runs for real."""
    (tmp_path / "models").symlink_to(ROOT / "models")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ran = 0
    for command in _commands():
        parts = [p.strip() for p in command.split("&&")]
        parts = [p for p in parts if not p.startswith(("pip install", "python -m pytest",
                                                       "python models/fetch_all.py"))]
        for part in parts:
            argv = shlex.split(part)
            if argv[0] == "python":
                argv[0] = sys.executable
            result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True,
                                    text=True, timeout=600)
            assert result.returncode == 0, f"{part}\n{result.stdout[-2000:]}{result.stderr}"
            ran += 1
    assert ran >= 10
    assert (tmp_path / "svd_annotated.onnx").exists() and (tmp_path / "many").is_dir()


def test_the_readme_recipe_is_a_valid_recipe(tmp_path):
    from onnxcomp import recipe
    from onnxcomp.passes import REGISTRY

    (toml,) = _blocks("toml")
    path = tmp_path / "r.toml"
    path.write_text(toml)
    steps = recipe.load(path).steps(REGISTRY, {})
    assert [s.name for s in steps] == ["canonicalize", "fold_bn", "cp", "quantize"]


@pytest.mark.parametrize("doc", ["docs/options.md", "docs/results.md", "docs/design.md"])
def test_the_docs_readme_links_exist(doc):
    assert doc in README and (ROOT / doc).exists()
