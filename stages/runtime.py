"""What the machine offers training, asked of the Keras backend in use.

Nothing here imports TensorFlow unless KERAS_BACKEND is tensorflow: JAX and PyTorch are asked
directly, so the training path stays free of TensorFlow on the other backends.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Accelerator:
    kind: str  # "gpu" or "cpu"
    name: str
    bfloat16: bool  # fast bfloat16 (compute capability 8.0 or newer)


def accelerator() -> Accelerator:
    """The first GPU the backend sees, or the CPU."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "gpu":
            return Accelerator("gpu", device.device_kind, _capability_8_or_later(getattr(device, "compute_capability", "")))
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            # Compute capability 8 (Ampere) or later, as for the other backends: torch's own
            # is_bf16_supported() also says yes where bfloat16 is only emulated (T4, V100).
            return Accelerator("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)[0] >= 8)
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            major = (details.get("compute_capability") or (0, 0))[0]
            return Accelerator("gpu", details.get("device_name", "GPU"), major >= 8)
    return Accelerator("cpu", "cpu", False)


def _capability_8_or_later(capability: object) -> bool:
    """Whether JAX's compute capability ("8.0", "9.0") is Ampere's or later. A ROCm GPU's is its
    architecture ("gfx90a"), no number: it counts as older, so auto gives float16."""
    try:
        return float(str(capability)) >= 8.0
    except ValueError:
        return False


def precision_policy(setting: str, device: Accelerator) -> str:
    """The Keras dtype policy for training.mixed_precision on `device`.

    auto: mixed_bfloat16 on a GPU with fast bfloat16, mixed_float16 on an older GPU (Keras then
    scales the loss), float32 on a CPU, where mixed precision is slower.
    """
    if setting == "off":
        return "float32"
    if setting == "auto":
        if device.kind != "gpu":
            return "float32"
        return "mixed_bfloat16" if device.bfloat16 else "mixed_float16"
    return f"mixed_{setting}"


def jit_compile(setting: str) -> bool | str:
    return {"auto": "auto", "on": True, "off": False}[setting]


def xla_refused(model: Any) -> str | None:
    """Why Keras would compile `model` without XLA although asked to (it warns only that the model
    "doesn't support" it), or None when it would compile it."""
    import keras
    from keras.src.trainers.trainer import model_supports_jit

    if model_supports_jit(model):
        return None
    unsupported = [layer.name for layer in model._flatten_layers() if not layer.supports_jit]
    if unsupported:
        return f"Keras does not compile layer {unsupported[0]} with XLA"
    if keras.backend.backend() == "tensorflow":
        from tensorflow.python.framework.config import is_op_determinism_enabled

        if is_op_determinism_enabled():
            return ("TensorFlow's op determinism, on for every CPU run so that a resumed run ends with the "
                    "same weights, excludes XLA")
    return "Keras does not compile this model with XLA on this platform"


# A line TensorFlow's C++ code logs before abseil's logging is initialised ("I0000 00:00:1796649244.397629
# 8474 port.cc:153] oneDNN custom operations are on ..."), and the notice abseil writes above them.
NATIVE_LOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\s\]]+:\d+\] ")
NATIVE_LOG_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# What shows an NVIDIA GPU to this machine, driver loaded or not: the driver (/proc/driver/nvidia),
# its device files (/dev/nvidia0, nvidiactl; a container given one GPU may have /dev/nvidia3
# alone), WSL 2's GPU (/dev/dxg, no /dev/nvidia*), Jetson's (/dev/nvhost-ctrl-gpu), or a PCI
# device of NVIDIA's (vendor 0x10de) whose driver is not loaded.
NVIDIA_SIGNS = ("/proc/driver/nvidia", "/dev/nvidia*", "/dev/dxg", "/dev/nvhost-ctrl-gpu")
PCI_VENDORS = "/sys/bus/pci/devices/*/vendor"


def nvidia_device() -> bool:
    """Whether this machine shows any sign of an NVIDIA GPU (NVIDIA_SIGNS, PCI_VENDORS)."""
    if any(glob.glob(sign) for sign in NVIDIA_SIGNS):
        return True
    for vendor in glob.glob(PCI_VENDORS):
        try:
            if Path(vendor).read_text().strip().lower() == "0x10de":
                return True
        except OSError:
            continue
    return False


def import_keras_quietly() -> None:
    """Import Keras, and with it the backend's native libraries, leaving out of stderr the lines
    they log below TF_CPP_MIN_LOG_LEVEL (oneDNN's, cuda's) while loading.

    TensorFlow logs them before abseil's logging is initialised, and abseil then writes every
    line whatever the level (abseil/abseil-cpp#1957). So stderr's file descriptor is sent to a
    file while Keras is imported, and what came there is written back but those lines. Every
    other line (a Python warning, an error, a line at or above the level) is written back as it
    came. On TensorFlow, on a machine with no sign of an NVIDIA GPU (nvidia_device()), TensorFlow
    also looks for GPUs then, and its error line "failed call to cuInit" is left out too: there
    is no GPU for it to have failed on. Where there is one, that line is written back, as TensorFlow
    logs it when something first asks for the devices."""
    if "keras" in sys.modules:
        return
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    if level <= 0:
        import keras  # noqa: F401

        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        no_gpu = False
        try:
            import keras

            if keras.backend.backend() == "tensorflow" and not nvidia_device():
                import tensorflow as tf

                no_gpu = True
                tf.config.list_physical_devices("GPU")  # where TensorFlow calls cuInit
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode("utf-8", "replace").splitlines(keepends=True):
                found = NATIVE_LOG_LINE.match(line)
                if line.rstrip("\n") == NATIVE_LOG_NOTICE or found and "IWEF".index(found.group(1)) < level:
                    continue
                if no_gpu and found and found.group(1) == "E" and "] failed call to cuInit: " in line:
                    continue
                sys.stderr.write(line)
            sys.stderr.flush()


def keep_tensorflow_out() -> None:
    """On a backend other than TensorFlow, stop Keras importing TensorFlow behind our back.

    Keras asks `tensorflow.available` (which imports it, seconds and a gigabyte) in a dozen places
    only to test whether an object is a TensorFlow type, model.save among them. When TensorFlow
    has not been imported, no such object exists, so the answer is no; once something imports
    it, the answer is yes again (keras.utils.set_random_seed then seeds it too, as Keras does).
    """
    import sys

    import keras

    if keras.backend.backend() == "tensorflow" or "tensorflow" in sys.modules:
        return
    from keras.src.utils import module_utils

    tensorflow = module_utils.tensorflow  # a LazyModule: any other attribute would import it
    if not hasattr(type(tensorflow), "imported_only"):

        class ImportedOnly(type(tensorflow)):
            imported_only = True
            available = property(lambda self: self.name in sys.modules)

        tensorflow.__class__ = ImportedOnly


def make_deterministic(seed: int, device: Accelerator) -> None:
    """Seed Python, NumPy and the backend; on a CPU, also make TensorFlow's kernels deterministic,
    so that a resumed run ends with the same weights as an uninterrupted one."""
    import keras

    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
        if device.kind == "cpu":
            import tensorflow as tf

            tf.config.experimental.enable_op_determinism()
        return
    # keras.utils.set_random_seed imports TensorFlow whenever it is installed (to seed tf.data);
    # this is the rest of what it does (Keras 3.15), without that import.
    import random

    import numpy as np
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils.rng_utils import GLOBAL_RANDOM_SEED

    global_state.set_global_attribute(GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
    if keras.backend.backend() == "torch":
        import torch

        torch.manual_seed(seed)


@contextlib.contextmanager
def settings_kept() -> Iterator[None]:
    """Leave the process-wide settings train changes as they were: Keras's dtype policy and, on
    TensorFlow, op determinism (while it is on, Keras turns XLA off). A stage is a process of its
    own; this is for whoever calls train() in theirs (a notebook, a test, a benchmark)."""
    import sys

    keras = sys.modules.get("keras")  # not imported yet: Keras's default policy, floatx
    policy = keras.config.dtype_policy() if keras else None
    determinism = "tensorflow" in sys.modules and _op_determinism()
    try:
        yield
    finally:
        keras = sys.modules.get("keras")
        if keras:
            keras.config.set_dtype_policy(policy or keras.config.floatx())
        if "tensorflow" in sys.modules and _op_determinism() != determinism:
            from tensorflow.python.framework import config

            if determinism:
                config.enable_op_determinism()
            else:
                config.disable_op_determinism()


def _op_determinism() -> bool:
    from tensorflow.python.framework import config

    return config.is_op_determinism_enabled()


@dataclass(frozen=True)
class Replicas:
    """Where training runs: `count` devices in data parallel (1: no distribution)."""

    count: int
    devices: tuple[str, ...]
    scope: Any  # a context manager: build, compile and fit inside it


def data_parallel(setting: str, stage: str, key: str = "training.distribution") -> Replicas:
    """The devices for training.distribution (`key`: where params.yaml sets it, for the messages).

    `data_parallel` replicates the model on every accelerator the backend sees (restrict them
    with CUDA_VISIBLE_DEVICES) and splits each batch between them: tf.distribute.MirroredStrategy
    on TensorFlow, keras.distribution.DataParallel on JAX. Without a GPU it uses the backend's
    CPU devices, one unless the backend was asked for more (how the tests run it on a CPU).
    Keras has no distribution on PyTorch: that is an error, not a silent single-device run.
    """
    import keras

    if setting == "off":
        return Replicas(1, (), contextlib.nullcontext())
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        names = tuple(device.name for device in devices)
        if len(names) > 1:
            return Replicas(len(names), names, tf.distribute.MirroredStrategy(devices=list(names)).scope())
    elif backend == "jax":
        import jax

        devices = jax.devices()
        names = tuple(f"{device.platform}:{device.id}" for device in devices)
        if len(names) > 1:
            distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
            return Replicas(len(names), names, distribution.scope())
    else:
        from stages.errors import UserError

        raise UserError(
            f"{stage}: {key}: data_parallel needs KERAS_BACKEND tensorflow or jax "
            f"(Keras has no distribution API on {backend}); set distribution: off or change the backend"
        )
    print(f"{stage}: {key} is data_parallel but {backend} sees one device ({names[0]}); training on it alone")
    return Replicas(1, names, contextlib.nullcontext())
