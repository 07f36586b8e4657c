"""A minimal params mapping with one dataset, `toy`, for tests that need a DatasetConfig."""

from __future__ import annotations

from typing import Any

from stages.config import DatasetConfig, parse_params


def toy_params(classes: list[str], **dataset: Any) -> dict[str, Any]:
    """params.yaml as a dict: one `toy` dataset (folders layout, local source) with `dataset`
    overriding any of its keys; empty mappings take the documented defaults."""
    entry = {
        "source": {"kind": "local", "path": "unused"},
        "layout": {"kind": "folders"},
        "classes": classes,
        "image_size": 8,
        "channels": 1,
        "split": {},
        "validation": {},
        "augmentation": {},
        "reference": {},
        "metric": "auto",
    }
    entry.update(dataset)
    return {"training": {}, "datasets": {"toy": entry}, "backbones": {}, "experiments": {}, "suites": {}}


def toy_config(classes: list[str], **dataset: Any) -> DatasetConfig:
    """The `toy` DatasetConfig, parsed through the real params parser."""
    return parse_params(toy_params(classes, **dataset), "test-params.yaml").datasets["toy"]
