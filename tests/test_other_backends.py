"""Resume, feature caching and the pretrained path on JAX and PyTorch: test_training.py's tests of
them, run again with KERAS_BACKEND set, each backend in a pytest process of its own (a process has
one Keras backend).

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
# As test_training.py defines them: the killed-and-resumed stage; feature caching on MobileNetV2
# and on EfficientNetB0 (whose blocks hold dropout); the pinned weights loaded into the base; phase
# 2 (the top of the base unfrozen, BatchNormalization frozen); a run killed in phase 2 resuming;
# the order of the first epoch after a compile with loader workers (the GPU path); class weights in
# the training and validation losses; a mixed precision asked for on a CPU, and a float16 model loaded.
TESTS = [
    "test_a_killed_train_stage_resumes_and_ends_with_the_uninterrupted_weights",
    "test_feature_caching_trains_the_same_model_as_running_the_frozen_base[pretrained]",
    "test_feature_caching_trains_the_same_model_as_running_the_frozen_base[pretrained_efficientnet]",
    "test_the_pinned_weights_are_what_the_base_starts_from",
    "test_phase_two_fine_tunes_the_top_of_the_base_with_batch_normalization_frozen",
    "test_a_frozen_base_is_checkpointed_once_per_phase_and_resumes_to_the_uninterrupted_weights[phase-2-epoch-1]",
    "test_the_first_epoch_after_compile_trains_in_the_loaders_order_with_workers",
    "test_with_balanced_class_weights_val_loss_is_the_weighted_loss_training_minimises",
    "test_with_balanced_class_weights_the_training_loss_is_weighted",
    "test_train_leaves_the_dtype_policy_and_op_determinism_as_it_found_them",
    "test_a_model_trained_in_float16_loads_for_inference_without_warnings",
]


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
def test_resume_feature_caching_and_fine_tuning_hold_on_every_backend(backend: str) -> None:
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *(f"tests/test_training.py::{test}" for test in TESTS), "-q",
         "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1700, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert re.search(rf"\b{len(TESTS)} passed\b", result.stdout) and " skipped" not in result.stdout, result.stdout[-2000:]
