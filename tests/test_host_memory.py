"""``import diffq`` turns on torch's huge pages for large CPU tensors unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "import os, diffq; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0"), ("1", "1")])
def test_import_sets_huge_pages_unless_the_user_set_them(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_enable_huge_pages_reports_whether_it_set_the_variable(monkeypatch):
    from diffq.host_memory import ENV, enable_huge_pages

    monkeypatch.delenv(ENV, raising=False)
    assert enable_huge_pages() and os.environ[ENV] == "1"
    assert not enable_huge_pages() and os.environ[ENV] == "1"
    monkeypatch.setenv(ENV, "0")
    assert not enable_huge_pages() and os.environ[ENV] == "0"
