"""The accelerator and the precision training.mixed_precision gives on it."""

from __future__ import annotations

import pytest

from stages.runtime import Accelerator, accelerator, precision_policy


@pytest.mark.parametrize(
    ("name", "capability", "policy"),
    [("Tesla T4", (7, 5), "mixed_float16"), ("Tesla V100", (7, 0), "mixed_float16"),
     ("NVIDIA A100", (8, 0), "mixed_bfloat16"), ("NVIDIA H100", (9, 0), "mixed_bfloat16")],
)
def test_torch_auto_precision_follows_the_compute_capability(monkeypatch, name, capability, policy) -> None:
    """mixed_precision: auto on PyTorch gives bfloat16 from Ampere (compute capability 8) on, as on
    the other backends; before it, float16, although torch.cuda.is_bf16_supported() says yes there
    (it counts bfloat16 emulated in float32)."""
    torch = pytest.importorskip("torch")
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)

    device = accelerator()
    assert device == Accelerator("gpu", name, capability[0] >= 8)
    assert precision_policy("auto", device) == policy
    assert precision_policy("off", device) == "float32"
    assert precision_policy("float16", device) == "mixed_float16"


def test_auto_precision_on_a_cpu_is_float32() -> None:
    assert precision_policy("auto", Accelerator("cpu", "cpu", False)) == "float32"


@pytest.mark.parametrize(("backend", "advice"), [("torch", "run make env-torch"), ("jax", "run make env,")])
def test_a_backend_that_is_not_installed_is_one_line_saying_how_to_install_it(backend: str, advice: str) -> None:
    """KERAS_BACKEND=torch without PyTorch in .venv (a uv sync removes it) ended a stage with
    Keras's ModuleNotFoundError traceback; it is one line with the make target to run."""
    import os
    import subprocess
    import sys

    code = (f"import sys; sys.modules[{backend!r}] = None  # as if not installed\n"
            "from stages.errors import run_stage\n"
            "def main(argv):\n    import keras\n"
            "run_stage(main)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": backend}, timeout=300)

    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: KERAS_BACKEND is {backend}, but {backend} is not installed in this environment; {advice}")


@pytest.mark.parametrize(("capability", "policy"), [("7.5", "mixed_float16"), ("9.0", "mixed_bfloat16"),
                                                    ("gfx90a", "mixed_float16"), ("", "mixed_float16")])
def test_jax_auto_precision_reads_a_cuda_or_rocm_capability(monkeypatch, capability, policy) -> None:
    """JAX gives an NVIDIA GPU's compute capability as "9.0", and a ROCm GPU's architecture
    ("gfx90a"): that is no number, and training stopped on float("gfx90a") before it started."""
    jax = pytest.importorskip("jax")
    import keras

    class Device:
        platform = "gpu"
        device_kind = "some GPU"
        compute_capability = capability

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setattr(jax, "devices", lambda *args: [Device()])
    device = accelerator()
    assert device.kind == "gpu"
    assert precision_policy("auto", device) == policy
