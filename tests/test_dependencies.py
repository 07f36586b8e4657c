"""Every dependency the pipeline names in pyproject.toml imports, at the version it is pinned to."""

from __future__ import annotations

import importlib


def major(version: str) -> int:
    """The major number of a dotted version string."""
    return int(version.split(".")[0])


def test_every_named_dependency_imports_at_its_pinned_major_version():
    """All direct dependencies import together in one interpreter, at the pinned versions."""
    import dvc
    import efficientnet
    import efficientnet.tfkeras
    import great_expectations
    import kagglesdk
    import boto3  # noqa: F401  (installed: the fake Open Images bucket's tests drive it)
    import keras
    import matplotlib
    import mlflow
    import pandas
    import PIL
    import pyarrow
    import six
    import sklearn
    import tensorflow
    import yaml
    from kaggle.api.kaggle_api_extended import KaggleApi

    assert tensorflow.__version__.startswith("2.21")
    assert major(keras.__version__) == 3
    assert major(mlflow.__version__) == 3
    assert major(great_expectations.__version__) == 1
    assert callable(KaggleApi)
    assert callable(efficientnet.tfkeras.EfficientNetB0)
    for module in (dvc, kagglesdk, six, efficientnet, pandas, sklearn, PIL, pyarrow, yaml, matplotlib):
        assert importlib.import_module(module.__name__) is module


def test_sklearn_digits_are_1797_images_of_8_by_8():
    """The demo dataset ships inside scikit-learn: 1,797 images of 8x8 pixels, no network."""
    from sklearn.datasets import load_digits

    digits = load_digits()

    assert digits.images.shape == (1797, 8, 8)
    assert len(digits.target) == 1797
    assert sorted(set(digits.target.tolist())) == list(range(10))
