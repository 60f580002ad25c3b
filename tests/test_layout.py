"""Import arrows between smelt's packages, checked on the source with `ast` (nothing is imported):

    cli   -> flows, tasks, models, serving, bench
    flows -> tasks, models
    bench -> models, serving, tasks   (times stages; a top-level consumer like the CLI)
    tasks -> models
    serving -> models                 (a Bento carries serving/ + models/ and nothing else)
    models -> nothing of ours

A package may always import itself; nothing imports cli. Run: `uv run pytest tests/test_layout.py`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED: dict[str, set[str]] = {
    "cli": {"flows", "tasks", "models", "serving", "bench"},
    "flows": {"tasks", "models"},
    "bench": {"models", "serving", "tasks"},
    "tasks": {"models"},
    "serving": {"models"},
    "models": set(),
}
PACKAGES = tuple(ALLOWED)


def module_name(path: Path) -> str:
    """`tasks/data/formats.py` -> `tasks.data.formats`; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute names an import statement reaches, relative ones resolved against `module`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if not node.level:
        return [node.module or ""]
    # `from . import x` in a/b.py means package a; in a/__init__.py it means a itself.
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    stem = ".".join(base + ([node.module] if node.module else []))
    return [stem] if node.module else [f"{stem}.{alias.name}" for alias in node.names]


def violations(source: str, module: str, filename: str = "<string>", is_package: bool = False) -> list[str]:
    """`file:line: a -> b` for every import (module level or inside a function) against the arrows."""
    home = module.split(".")[0]
    allowed = ALLOWED[home] | {home}
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        for target in imported_modules(node, module, is_package):
            top = target.split(".")[0]
            if top in PACKAGES and top not in allowed:
                found.append(f"{filename}:{node.lineno}: {home} -> {top} ({target})")
    return found


def our_sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_package_is_checked():
    assert all((ROOT / pkg / "__init__.py").exists() for pkg in PACKAGES)
    assert len(our_sources()) > 40  # the walk found the code, not an empty tree


def test_imports_follow_the_arrows():
    bad = [v for p in our_sources()
           for v in violations(p.read_text(), module_name(p), str(p.relative_to(ROOT)), p.name == "__init__.py")]
    assert not bad, "imports against the arrows (see tests/test_layout.py):\n" + "\n".join(bad)


@pytest.mark.parametrize("module, source, bad", [
    ("tasks.measure", "from serving.engine import Engine\n", "tasks -> serving"),
    ("tasks.train", "def f():\n    import flows.env\n", "tasks -> flows"),
    ("models.quant.gptq", "from ...tasks import config\n", "models -> tasks"),
    ("serving.service", "from ..cli import main\n", "serving -> cli"),
    ("tasks.data.shapes", "import os\nfrom .. import evaluate\nfrom bench.serve import run\n", "tasks -> bench"),
    ("flows.pipeline", "from bench import serve\n", "flows -> bench"),
])
def test_the_checker_catches_a_planted_import(module, source, bad):
    found = violations(source, module, "planted.py")
    assert len(found) == 1 and bad in found[0] and found[0].startswith("planted.py:")


def test_the_checker_passes_allowed_and_relative_imports():
    source = "import torch\nfrom models.chat import render\nfrom . import formats\nfrom .shapes import x\n"
    assert violations(source, "tasks.data.quality") == []
    assert violations("from . import config\n", "models", is_package=True) == []
    assert violations("from tasks.etl import x\nfrom serving import y\n", "bench.serve") == []
