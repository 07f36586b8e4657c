"""Work spread over processes gives the same results, in the same order, as work done in one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import workers
from stages.config import DatasetConfig
from tests.toy import toy_config
from stages.split import assign_splits, write_arrays
from stages.validate import build_manifest


def square(value: int) -> int:
    return value * value


@pytest.fixture()
def parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the worker-process path even for a handful of items."""
    monkeypatch.setattr(workers, "SERIAL_BELOW", 0)
    monkeypatch.setenv("CLASSMATRIX_WORKERS", "2")


def test_map_ordered_keeps_input_order_across_processes(parallel: None) -> None:
    """Results come back in input order from two worker processes."""
    items = list(range(300))
    assert list(workers.map_ordered(square, items, desc="squares")) == [i * i for i in items]


def test_worker_count_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLASSMATRIX_WORKERS caps the worker count; without it, the usable cores decide."""
    monkeypatch.setenv("CLASSMATRIX_WORKERS", "1")
    assert workers.worker_count() == 1
    monkeypatch.delenv("CLASSMATRIX_WORKERS")
    assert workers.worker_count() == len(os.sched_getaffinity(0))


def tiny_dataset(raw: Path) -> DatasetConfig:
    rng = np.random.default_rng(0)
    for label in ("a", "b", "c"):
        (raw / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).save(raw / label / f"{i}.png")
    (raw / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return toy_config(["a", "b", "c"], image_size=8, channels=3, split={"val": 0.2, "test": 0.2, "seed": 1})


def test_manifest_and_arrays_are_the_same_in_parallel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """validate's manifest and split's arrays do not depend on how many processes made them."""
    raw = tmp_path / "raw"
    config = tiny_dataset(raw)
    monkeypatch.setenv("CLASSMATRIX_WORKERS", "1")
    serial_manifest = build_manifest(raw, config)
    serial_out = tmp_path / "serial"
    serial_out.mkdir()
    write_arrays(assign_splits(serial_manifest, config.split), raw, serial_out, config)

    monkeypatch.setattr(workers, "SERIAL_BELOW", 0)
    monkeypatch.setenv("CLASSMATRIX_WORKERS", "2")
    parallel_manifest = build_manifest(raw, config)
    parallel_out = tmp_path / "parallel"
    parallel_out.mkdir()
    write_arrays(assign_splits(parallel_manifest, config.split), raw, parallel_out, config)

    assert parallel_manifest.equals(serial_manifest)
    assert (serial_manifest["status"] == "set_aside").sum() == 1
    for name in ("train_x", "val_x", "test_x", "train_y", "val_y", "test_y"):
        assert np.array_equal(np.load(serial_out / f"{name}.npy"), np.load(parallel_out / f"{name}.npy"))
