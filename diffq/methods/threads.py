"""Run latency-bound stretches of quantization math on one CPU thread.

Why: the per-column GPTQ loop, the chunked clip search and the thin QR / Cholesky factorisations are
sequences of small tensor ops. With several intra-op threads every op pays a fork/join, and on a
shared CPU the threads spin-wait for each other: measured on the project's 2-core machine, one
[12288 x 3072] layer took 147 s wall with 2 threads and 15 s with 1. The large matrix products
(GPTQ's block updates, Hessians, the low-rank projections) stay multi-threaded; only the stretches
in :func:`one_thread` blocks run serially. Tensors on a GPU are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """Set torch's intra-op threads to 1 for the block (CPU tensors only), then restore them."""
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu" or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
