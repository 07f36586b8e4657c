"""Progress bars for long work (decoding, downloads), quiet when output is not a terminal."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None) -> Iterable[T]:
    # disable=None turns the bar off when stderr is not a terminal (CI logs, DVC pipes), so
    # logs hold results rather than thousands of carriage returns.
    return tqdm(items, desc=desc, unit=unit, total=total, disable=None, leave=False)
