"""Build the comparison notebooks (``notebooks/*.ipynb``, outputs stripped) from their sources,
``notebooks/*.py`` in the jupytext "percent" format (``# %%`` starts a code cell, ``# %% [markdown]``
a markdown cell whose lines start with ``# ``).

Why sources in ``.py``: notebooks are JSON, so edits produce noisy diffs and code inside them is
invisible to lint and refactoring tools; the percent files are plain Python that ruff checks and
that jupytext (or VS Code, PyCharm) opens as notebooks. The committed ``.ipynb`` carry no outputs and
stable cell ids, so building twice gives byte-identical files.

    python -m scripts.make_notebooks            # write notebooks/*.ipynb from notebooks/*.py
    python -m scripts.make_notebooks --check    # exit 1 when a committed notebook differs from its source

``tests/test_notebooks.py`` runs the ``--check`` comparison and executes every notebook.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
CELL = "# %%"
MARKDOWN = "# %% [markdown]"


def _strip_header(lines: list[str]) -> list[str]:
    """Drop the jupytext YAML header (``# ---`` ... ``# ---``) if the file starts with one."""
    if lines and lines[0].strip() == "# ---":
        for i in range(1, len(lines)):
            if lines[i].strip() == "# ---":
                return lines[i + 1:]
    return lines


def _markdown(lines: list[str]) -> str:
    out = []
    for line in lines:
        if line.startswith("# "):
            out.append(line[2:])
        elif line.strip() == "#":
            out.append("")
        else:
            raise ValueError(f"markdown cell line {line!r} does not start with '# '")
    return "\n".join(out)


def parse_percent(text: str) -> list:
    """Cells of a percent-format source: markdown and code, blank lines around each trimmed."""
    cells, kind, body = [], None, []

    def flush():
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        if kind == "markdown":
            cells.append(new_markdown_cell(_markdown(body)))
        elif kind == "code":
            cells.append(new_code_cell("\n".join(body)))

    for line in _strip_header(text.splitlines()):
        if line.startswith(CELL):
            flush()
            kind, body = ("markdown" if line.strip() == MARKDOWN else "code"), []
        elif kind is None:
            if line.strip():
                raise ValueError(f"text before the first '{CELL}' marker: {line!r}")
        else:
            body.append(line)
    flush()
    return cells


def build(source: Path) -> nbformat.NotebookNode:
    nb = new_notebook(cells=parse_percent(source.read_text(encoding="utf-8")))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: rebuilding gives byte-identical files
    nbformat.validate(nb)
    return nb


def render(source: Path) -> str:
    return nbformat.writes(build(source)) + "\n"


def sources(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    return sorted(folder.glob("[0-9][0-9]_*.py"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = ap.parse_args(argv)
    from diffq.io import write_text_atomic

    stale = []
    for src in sources():
        target = src.with_suffix(".ipynb")
        text = render(src)
        if args.check:
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                stale.append(target.name)
        else:
            write_text_atomic(target, text)
            print(f"wrote {target.relative_to(ROOT)}")
    if stale:
        print(f"out of date with their sources: {', '.join(stale)}; run `python -m scripts.make_notebooks`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
