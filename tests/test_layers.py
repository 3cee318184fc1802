"""The core never imports the optional parts nor the entry layer: the simulator
(``batcher.sim``), the Ray engine (``batcher.ray``), the command line (``batcher.cli``) and the
Python API (``batcher.api``) import the core, never the other way round."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "batcher"
#: The optional parts, and the top layer that may import them.
OPTIONAL = ("batcher.sim", "batcher.ray")
TOP = ("batcher.cli", "batcher.api", "batcher", "batcher.__main__")
#: The entry layer: what users call, built on the core (the Python API's input and dataset
#: view may import pandas, polars and datasets).
ENTRY = ("batcher.cli", "batcher.api", "batcher.api_input", "batcher.api_view")
#: What the core must never import.
ABOVE_THE_CORE = (*OPTIONAL, *ENTRY)


def core_modules() -> list[str]:
    """Every module of the core: the package but its optional parts and its top layer."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if _under(name, OPTIONAL) or _under(name, ENTRY) or name in TOP:
            continue
        names.append(name)
    return names


def _under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_core_modules_are_found() -> None:
    found = core_modules()
    assert {"batcher.engine.dispatch", "batcher.runner.run", "batcher.config"} <= set(found)
    assert not [n for n in found if _under(n, ABOVE_THE_CORE)]


@pytest.mark.slow  # a fresh interpreter: what the imports load, and nothing else
def test_importing_the_whole_core_loads_no_optional_part_and_no_entry() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = json.loads(done.stdout)
    assert "batcher.runner.run" in loaded and "batcher.engine.dispatch" in loaded
    assert [m for m in loaded if _under(m, ABOVE_THE_CORE)] == []


@pytest.mark.parametrize("name", core_modules())
def test_no_core_module_imports_an_optional_part_or_the_entry_even_lazily(name: str) -> None:
    path = PACKAGE.parent / Path(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    imported = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.append(node.module)
            imported += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            imported.append(node.value)  # importlib.import_module("batcher.sim..."), say
    assert [m for m in imported if _under(m, ABOVE_THE_CORE)] == []
