"""scripts/check and its import rules: the farm passes, and each planted violation fails with a line naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import import_layers  # noqa: E402  (a script, not part of the package)


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of what scripts/check reads, with the project's venv linked in."""
    for name in ("farm", "tests", "scripts"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    return tmp_path


def plant(tree: Path, module: str, line: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


def check(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(tree / "scripts" / "check")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": os.environ.get("PATH", "")})


def test_the_farm_passes_its_own_check(tree):
    result = check(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert import_layers.check(REPO / "farm") == []


@pytest.mark.parametrize("module, line, expected", [
    ("farm/render/renderer.py", "import ray", "farm/render/renderer.py:"),
    ("farm/sweep/plan.py", "from ray.util import ActorPool", "imports Ray outside the cluster layer"),
    ("farm/render/pnginfo.py", "from farm.render import renderer", "import cycle between"),
    ("farm/models/tiny.py", "from farm.models.artifacts import HashCache", "import cycle between"),
    ("farm/models/tiny.py", "from farm.runs.manifest import RunFolder", "from a later layer (runs)"),
    ("farm/render/lora.py", "from ..train import trainer", "from a later layer (train)"),
])
def test_a_planted_violation_fails_the_check(tree, module, line, expected):
    plant(tree, module, line)
    problems = import_layers.check(tree / "farm")
    assert any(expected in problem for problem in problems), problems
    result = check(tree)
    assert result.returncode == 1
    assert expected in result.stdout


def test_unused_code_fails_the_check(tree):
    plant(tree, "farm/runs/grid.py", "import json")
    result = check(tree)
    assert result.returncode == 1
    assert "F401" in result.stdout and "grid.py" in result.stdout


def test_cycles_are_found_however_long():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_layers.find_cycle(graph) == [["a", "b", "c"]]
    assert import_layers.find_cycle({"a": {"b"}, "b": set()}) == []
