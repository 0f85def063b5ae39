"""The package layers of README.md's "Layout", enforced on the import graph (every import, also the
ones inside functions, which is where cycles used to hide).

    base (errors, io, tensor_file, sizes, progress, plotting, fingerprint, timing, host_memory, family adapters
    and roles)
      <- formats <- kernels <- modules (+ generation, attention) <- calibration, methods
      <- quantization, checkpoint, lora, numerics (+ the BitPlan format) <- mixed <- apps (cli, bench, demo, ...)

A module may import its own layer or lower ones, never a higher one, and no two modules import each
other, even through others. ``diffq.eval`` (metrics, reports) and the fixtures (demo models, tiny
pipelines) are libraries of the apps: only apps import them, and they import only base modules (and
themselves). Kernels import only formats, errors and themselves.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: folders mapped into the diffq namespace (pyproject's [tool.setuptools.package-dir])
PACKAGE_DIRS = {"diffq": "diffq", "kernels": "diffq.kernels", "pipelines": "diffq.pipelines", "eval": "diffq.eval"}

BASE, FORMATS, KERNELS, MODULES, METHODS, QUANT, MIXED, APPS = range(8)
EVAL, FIXTURES = "eval", "fixtures"
#: module-name prefix -> layer; the longest matching prefix wins
LAYERS: dict[str, int | str] = {
    "diffq.errors": BASE, "diffq.io": BASE, "diffq.sizes": BASE, "diffq.progress": BASE,
    "diffq.plotting": BASE, "diffq.fingerprint": BASE, "diffq.timing": BASE, "diffq.host_memory": BASE,
    "diffq.tensor_file": BASE,
    "diffq.pipelines": BASE, "diffq.pipelines.adapters": BASE, "diffq.pipelines.roles": BASE,
    "diffq.formats": FORMATS,
    "diffq.kernels": KERNELS,
    "diffq.modules": MODULES, "diffq.generation": MODULES,
    "diffq.attention": MODULES,  # quantized attention processors: a module-level swap like QuantLinear's
    "diffq.calibration": METHODS, "diffq.methods": METHODS,
    "diffq.quantization": QUANT, "diffq.checkpoint": QUANT, "diffq.lora": QUANT, "diffq.numerics": QUANT,
    "diffq.mixed.plan": QUANT,  # the mixed recipe's input format: read by quantize, written by allocate
    "diffq.mixed": MIXED,
    "diffq.apps": APPS, "diffq.cli": APPS, "diffq": APPS,  # the package facade re-exports everything
    "diffq.eval": EVAL,
    "diffq.pipelines.demo_models": FIXTURES, "diffq.pipelines.testing": FIXTURES,
    "diffq.pipelines.digits_data": FIXTURES, "diffq.pipelines.tiny_tokenizers": FIXTURES,
}
NAMES = {BASE: "base", FORMATS: "formats", KERNELS: "kernels", MODULES: "modules", METHODS: "calibration/methods",
         QUANT: "quantization", MIXED: "mixed", APPS: "apps", EVAL: "eval", FIXTURES: "fixtures"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES_BY_NAME = _modules()


def layer_of(module: str) -> int | str:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports_of(module: str) -> set[str]:
    """diffq modules that ``module`` imports anywhere in its file."""
    tree = ast.parse(MODULES_BY_NAME[module].read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "diffq"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "diffq":
            assert node.level == 0, f"{module}: relative import"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES_BY_NAME else node.module)
    return {m for m in out if m != module}


GRAPH = {m: imports_of(m) for m in MODULES_BY_NAME}


def _allowed(src, dst) -> bool:
    if src == KERNELS:
        return dst in (BASE, FORMATS, KERNELS)
    if src in (EVAL, FIXTURES):
        return dst == BASE or dst == src
    if dst in (EVAL, FIXTURES):
        return src == APPS
    return dst <= src


def test_every_module_has_a_layer():
    assert len(MODULES_BY_NAME) > 60
    for m in MODULES_BY_NAME:
        layer_of(m)  # raises if no prefix matches


@pytest.mark.parametrize("module", sorted(MODULES_BY_NAME))
def test_imports_point_down(module):
    src = layer_of(module)
    bad = [f"{dst} ({NAMES[layer_of(dst)]})" for dst in sorted(GRAPH[module]) if not _allowed(src, layer_of(dst))]
    assert not bad, f"{module} ({NAMES[src]}) must not import {', '.join(bad)}"


def test_no_import_cycles():
    """Tarjan's strongly connected components: any component of more than one module is a cycle."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in MODULES_BY_NAME:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(MODULES_BY_NAME):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_catches_a_violation():
    """The rules above can fail: an upward import and a cycle are both reported."""
    assert not _allowed(MODULES, QUANT) and not _allowed(METHODS, EVAL) and not _allowed(KERNELS, MODULES)
    assert not _allowed(EVAL, QUANT) and not _allowed(FIXTURES, MODULES) and _allowed(APPS, EVAL)
    assert layer_of("diffq.quantization.apply") == QUANT and layer_of("diffq.mixed.plan") == QUANT
    assert layer_of("diffq.pipelines.demo_models") == FIXTURES and layer_of("diffq.pipelines.adapters") == BASE
