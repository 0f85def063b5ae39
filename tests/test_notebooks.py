"""Execute every notebook in ``notebooks/`` so a broken notebook fails CI.

Each notebook runs top to bottom in a fresh ``python3`` kernel of this interpreter (jupyter_client
maps the kernelspec's ``python`` to ``sys.executable``), offline, with progress bars off and Triton
in interpreter mode. A notebook that errors fails with the failing cell's traceback; one that runs
longer than ``BUDGET_S`` still passes but is reported as needing a speed-up (it is never skipped).

OMP_NUM_THREADS=1: on a shared 2-core machine, two OpenMP threads per op wait on each other at
every barrier; one digits-sd generation (8 prompts, 10 steps) measured 0.8 s with one thread and
8-13 s with two, which put a notebook at 200+ s instead of ~30 s.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_timestep_activations", "03_mixed_precision", "04_kernels"]
BUDGET_S = 120  # per notebook on a 2-core CPU; slower ones are flagged for a speed-up
TIMEOUT_S = 600  # per cell: a hang fails instead of blocking CI
ENV = {
    "HF_HUB_OFFLINE": "1",
    "DIFFQ_NO_PROGRESS": "1",
    "TRITON_INTERPRET": "1",
    "OMP_NUM_THREADS": "1",  # see the module docstring
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
}


class SlowNotebookWarning(UserWarning):
    """A notebook ran, but slower than BUDGET_S: make it smaller rather than skipping it."""


def test_all_notebooks_present():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_matches_its_source(path: Path):
    """Each committed notebook is exactly what its percent-format source builds (edit the .py, then
    run ``python -m scripts.make_notebooks``)."""
    from scripts.make_notebooks import render

    source = path.with_suffix(".py")
    assert source.is_file(), f"{path.name} has no source {source.name}"
    assert path.read_text(encoding="utf-8") == render(source), (
        f"{path.name} differs from {source.name}; run `python -m scripts.make_notebooks`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; rebuild with `python -m scripts.make_notebooks`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": str(NB_DIR)}},
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    elapsed = time.perf_counter() - t0
    print(f"{path.name}: {elapsed:.0f} s ({sys.executable})")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    produced = sum(1 for c in nb.cells if c.cell_type == "code" and c.outputs)
    assert produced >= 3, f"{path.name}: only {produced} cells produced output"
    if elapsed > BUDGET_S:
        warnings.warn(
            f"{path.name} took {elapsed:.0f} s (> {BUDGET_S} s on this machine): needs a speed-up "
            f"(fewer prompts/steps/units)", SlowNotebookWarning, stacklevel=1,
        )
