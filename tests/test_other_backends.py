"""Resume and feature caching on JAX and PyTorch: test_training.py's tests of both, run again with
KERAS_BACKEND set, each backend in a pytest process of its own (a process has one Keras backend).

What differs between backends is where random numbers come from: unseeded dropout on PyTorch
draws from torch's global generator, which no checkpoint holds, so a resumed run, or a head trained
on cached features, dropped other units than an uninterrupted one. These runs are what shows it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The killed-and-resumed stage, and feature caching on MobileNetV2 and on EfficientNetB0 (whose
# blocks hold dropout), as test_training.py defines them.
SELECTION = "test_a_killed_train_stage_resumes or test_feature_caching_trains_the_same_model"
EXPECTED = 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    [
        "jax",
        pytest.param("torch", marks=pytest.mark.skipif(
            importlib.util.find_spec("torch") is None,
            reason="PyTorch is optional: `make env-torch` installs the CPU build")),
    ],
)
def test_resume_and_feature_caching_hold_on_every_backend(backend: str) -> None:
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_training.py", "-k", SELECTION, "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1700, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert re.search(rf"\b{EXPECTED} passed\b", result.stdout) and " skipped" not in result.stdout, result.stdout[-2000:]
