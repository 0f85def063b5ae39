"""Test-wide settings: offline hub, Triton interpreter (CPU) or compiled kernels (``-m cuda``),
deterministic CPU torch.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, i.e. before any
``diffq.kernels`` module is imported. ``pytest_configure`` runs before test modules are
collected (imported), so it decides there:

* a marker expression that selects ``cuda`` tests and nothing unmarked (``pytest -m cuda``)
  forces ``TRITON_INTERPRET=0``: the CUDA tests compile the kernels (they assert it);
* anything else keeps the interpreter (``TRITON_INTERPRET=1`` unless already set), and the
  ``cuda`` tests are skipped (they would otherwise run the numpy interpreter on CUDA tensors and
  pass without compiling anything).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFQ_NO_PROGRESS", "1")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _selects_only_cuda(markexpr: str) -> bool:
    """True when ``-m markexpr`` selects tests marked ``cuda`` but no unmarked test."""
    if not markexpr:
        return False
    try:
        from _pytest.mark.expression import Expression

        expr = Expression.compile(markexpr)
        return bool(expr.evaluate(lambda name, **kw: name == "cuda")) and not expr.evaluate(lambda name, **kw: False)
    except Exception:  # noqa: BLE001  (an unparsable expression is pytest's to report)
        return False


def pytest_configure(config):
    if _selects_only_cuda(config.getoption("markexpr", "") or ""):
        os.environ["TRITON_INTERPRET"] = "0"
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        why = "needs a CUDA GPU"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        why = "compiled-kernel test: run `pytest -m cuda` (sets TRITON_INTERPRET=0)"
    else:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
