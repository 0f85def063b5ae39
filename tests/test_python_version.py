"""The shipped code runs on the oldest Python that ``requires-python`` admits.

CI runs one interpreter (3.11), so an import or syntax that exists only in newer Pythons would pass
here and break a 3.10 user at import time (``typing.Self`` did). This parses every shipped module
with the grammar of the minimum version and refuses names the standard library gained later.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("diffq", "kernels", "pipelines", "eval")
#: standard-library names added after Python 3.10: (module, name) -> version that added it
NEWER = {
    ("typing", "Self"): (3, 11), ("typing", "LiteralString"): (3, 11), ("typing", "Never"): (3, 11),
    ("typing", "assert_never"): (3, 11), ("typing", "assert_type"): (3, 11), ("typing", "reveal_type"): (3, 11),
    ("typing", "TypeVarTuple"): (3, 11), ("typing", "Unpack"): (3, 11), ("typing", "Required"): (3, 11),
    ("typing", "NotRequired"): (3, 11), ("typing", "dataclass_transform"): (3, 11),
    ("typing", "get_overloads"): (3, 11), ("typing", "clear_overloads"): (3, 11),
    ("typing", "override"): (3, 12), ("typing", "TypeAliasType"): (3, 12), ("typing", "TypeIs"): (3, 13),
    ("typing", "ReadOnly"): (3, 13), ("enum", "StrEnum"): (3, 11), ("datetime", "UTC"): (3, 11),
    ("contextlib", "chdir"): (3, 11), ("hashlib", "file_digest"): (3, 11), ("itertools", "batched"): (3, 12),
    ("asyncio", "TaskGroup"): (3, 11), ("asyncio", "timeout"): (3, 11), ("operator", "call"): (3, 11),
}
NEWER_MODULES = {"tomllib": (3, 11), "wsgiref.types": (3, 11)}


def minimum_python() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip())
    assert m, f"requires-python {spec!r} is not of the form '>=X.Y'"
    return int(m.group(1)), int(m.group(2))


def newer_than(tree: ast.AST, version: tuple[int, int]) -> list[str]:
    """Standard-library imports in ``tree`` that need a Python newer than ``version``."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if NEWER_MODULES.get(a.name, (0, 0)) > version]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if NEWER_MODULES.get(node.module, (0, 0)) > version:
                bad.append(node.module)
            bad += [f"{node.module}.{a.name}" for a in node.names if NEWER.get((node.module, a.name), (0, 0)) > version]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and NEWER.get((node.value.id, node.attr), (0, 0)) > version):
            bad.append(f"{node.value.id}.{node.attr}")
    return bad


FILES = sorted(p for folder in SHIPPED for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_shipped_module_fits_the_minimum_python(path):
    version = minimum_python()
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path), feature_version=version)  # newer syntax is a SyntaxError
    assert not newer_than(tree, version), f"{path.name} uses names newer than Python {version}"


def test_the_check_can_fail():
    assert newer_than(ast.parse("from typing import Self\nimport tomllib\nx = enum.StrEnum"), (3, 10)) == [
        "typing.Self", "tomllib", "enum.StrEnum"]
    with pytest.raises(SyntaxError):
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass\n", feature_version=(3, 10))
