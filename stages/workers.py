"""Spreading per-file work (decoding, hashing) over the machine's cores, with progress.

Results come back in input order, a chunk at a time, so the caller can stream them into an
output (a memory-mapped array) without holding them all. Small inputs stay in this process:
starting workers costs more than it saves.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from stages.progress import progress

T = TypeVar("T")
R = TypeVar("R")

SERIAL_BELOW = 1000


def worker_count() -> int:
    """CLASSMATRIX_WORKERS if set, else the cores this process may use."""
    configured = os.environ.get("CLASSMATRIX_WORKERS")
    if configured:
        return max(1, int(configured))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def map_ordered(fn: Callable[[T], R], items: Sequence[T], desc: str, unit: str = "file") -> Iterator[R]:
    """fn(item) for each item, in order, over worker processes when it pays."""
    workers = worker_count()
    if workers == 1 or len(items) < SERIAL_BELOW:
        yield from progress((fn(item) for item in items), desc=desc, unit=unit, total=len(items))
        return
    chunk = max(16, min(512, len(items) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results: Iterable[R] = pool.map(fn, items, chunksize=chunk)
        yield from progress(results, desc=desc, unit=unit, total=len(items))
