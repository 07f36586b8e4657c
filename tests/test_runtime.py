"""The accelerator and the precision training.mixed_precision gives on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


LOOKS_FOR_GPUS = """
import sys
from stages import runtime
runtime.NVIDIA_SIGNS, runtime.PCI_VENDORS = (sys.argv[1],), sys.argv[2]
runtime.import_keras_quietly()
print(runtime.accelerator().kind)  # what train asks first, as evaluate's and predict's first model does
"""


@pytest.mark.parametrize("sign", ["none", "device-file", "pci-device"])
def test_tensorflows_cuinit_error_is_left_out_only_where_no_nvidia_gpu_shows(tmp_path: Path, sign: str) -> None:
    """On a machine without a GPU, TensorFlow logged `E0000 ... failed call to cuInit: ...` on
    every train, evaluate and predict, an error line at the level the stages keep (2) although
    nothing had failed. It is left out where the machine shows no sign of an NVIDIA GPU; where it
    shows one (a device file, or an NVIDIA PCI device without its driver), the line still comes."""
    if Path("/proc/driver/nvidia").exists() or list(Path("/dev").glob("nvidia*")):
        pytest.skip("an NVIDIA GPU is here: cuInit does not fail, there is no line to keep or leave out")
    (tmp_path / "vendor").write_text("0x10de\n" if sign == "pci-device" else "0x8086\n")
    if sign == "device-file":
        (tmp_path / "nvidia0").touch()
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", LOOKS_FOR_GPUS, str(tmp_path / "nvidia0"), str(tmp_path / "vendor")],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "cpu", result.stderr[-3000:]
    cuinit = [line for line in result.stderr.splitlines() if "] failed call to cuInit: " in line]
    assert len(cuinit) == (0 if sign == "none" else 1), result.stderr
