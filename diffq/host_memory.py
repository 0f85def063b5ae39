"""Transparent huge pages for torch's large CPU tensors.

torch asks the kernel for 2 MB pages (``madvise``) for every CPU tensor of 2 MB or more when the
environment variable ``THP_MEM_ALLOC_ENABLE=1`` is set (torch's own opt-in, off by default; it is
read once, at the first such allocation; Linux with transparent huge pages in ``madvise`` or
``always`` mode, elsewhere it changes nothing).

Quantization allocates and drops many fresh [C, C] and [N, K] fp32 temporaries (Hessians,
transposed working copies, candidate residuals); with 4 KB pages each first touch of them is a page
fault that zeroes a page, which on the project's 2-core machine made up about a tenth of the FLUX
slice's quantization time (BENCHMARKS.md, "Quantization time", session 12). Resident memory was the
same there for 300 tensors of 2.9-4.5 MB, with or without huge pages.

``import diffq`` sets the variable when the user has not: it takes effect only if torch has not yet
allocated a tensor of 2 MB or more in the process (the ``diffq`` command, or ``import diffq`` before
building models). ``THP_MEM_ALLOC_ENABLE=0`` keeps torch's default.
"""

from __future__ import annotations

import os

ENV = "THP_MEM_ALLOC_ENABLE"


def enable_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless it is set already; True when it was set here."""
    if ENV in os.environ:
        return False
    os.environ[ENV] = "1"
    return True
