"""setup.py's Python floor is one every pinned dependency installs on (transformers 5.24 and trl 1.16 need 3.11)."""

import ast
import importlib.metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def _python_requires() -> SpecifierSet:
    call = next(
        node for node in ast.walk(ast.parse(SETUP.read_text())) if isinstance(node, ast.Call) and node.keywords
    )
    return SpecifierSet(next(keyword.value.value for keyword in call.keywords if keyword.arg == "python_requires"))


@pytest.mark.parametrize("distribution", ["transformers", "datasets", "numpy", "trl", "torch", "peft", "accelerate"])
def test_the_python_floor_is_one_every_installed_dependency_supports(distribution):
    floor = min(_python_requires().filter([f"3.{minor}" for minor in range(8, 20)]), key=lambda v: int(v[2:]))
    needed = SpecifierSet(importlib.metadata.metadata(distribution).get("Requires-Python") or "")
    assert floor in needed, f"setup.py allows Python {floor}, but {distribution} needs {needed}"
