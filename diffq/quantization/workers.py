"""Quantizing several layers at once on CPU threads.

Every layer's quantization (smoothing search, low-rank split, GPTQ) reads only the dense layer and
the calibration statistics, so layers are independent. On a CPU, :func:`ordered_map` runs them on
``workers`` Python threads, each doing its torch ops on one intra-op thread (torch releases the GIL
inside its ops): a layer then computes exactly what it computes in a one-thread serial run, so the
result is bit-identical to ``workers=1`` under ``torch.set_num_threads(1)``
(tests/test_quantize_workers.py). One layer per core beats one layer on all cores here: most of the
quantizer is sequences of small ops (GPTQ's column loop, the chunked clip search) that do not scale
with intra-op threads (:mod:`diffq.methods.threads`).

Memory: up to ``workers`` layers' working tensors at once. On a GPU, layers are built one at a time
(threads would only queue on the same device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from diffq.errors import QuantizationError
from diffq.methods.threads import one_thread

T = TypeVar("T")
R = TypeVar("R")


def check_workers(workers: int) -> int:
    """``workers`` as a positive int, else a QuantizationError naming what works."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise QuantizationError(f"workers must be a positive integer (layers quantized at once), got {workers!r}; "
                                f"use 1 for one layer at a time or e.g. os.cpu_count()")
    return workers


def effective_workers(workers: int, device: torch.device | str) -> int:
    """Layers built at once on ``device``: ``workers`` on a CPU, 1 elsewhere."""
    return check_workers(workers) if torch.device(device).type == "cpu" else 1


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn`` over ``items``, results yielded in the items' order.

    workers = 1: lazily, one item after another on the calling thread (nothing is computed ahead).
    workers > 1: on that many threads with one intra-op thread each (the caller's setting is restored
    when the iteration ends); a failing item's exception is raised in the caller when its turn comes
    (in the items' order), the items not started yet are cancelled and the running ones finish first."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    with one_thread("cpu"):  # each worker runs its ops on itself
        pool = ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="diffq-quantize")
        try:
            futures = [pool.submit(fn, item) for item in items]
            for fut in futures:
                yield fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
