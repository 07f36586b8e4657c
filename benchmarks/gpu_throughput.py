"""GPU training throughput: the train stage's code path against bare Keras and plain PyTorch.

    KERAS_BACKEND=jax python benchmarks/gpu_throughput.py --out /tmp/gpu_throughput.json
    KERAS_BACKEND=jax python benchmarks/gpu_throughput.py --smoke      # tiny, 1 step, CPU allowed

End-to-end training throughput (images per second, training steps only, no validation) of
EfficientNetB0 and ResNet50V2 at 224x224 from scratch, batch 128 and 256, on `--images` synthetic
uint8 images (8,192 by default) with 10 classes, measured three ways:

- ours: what stages/train.py does on a GPU. stages.loader.array_batches over the uint8 array
  (on_device=True: on JAX with a GPU the array is copied to the device once and batches are
  gathered there; workers=4), stages.backbones.build_model (uint8 input, augmentation layers
  RandomFlip/RandomRotation/RandomZoom/RandomTranslation, the backbone's preprocessing, the
  `features` head), the mixed_bfloat16 dtype policy, jit_compile from runtime.jit_compile("auto"),
  and one `model.fit` call per epoch with `set_epoch`, as train runs its epochs;
- (b) bare Keras on JAX: keras.applications.<Model>(weights=None, classes=10), mixed_bfloat16,
  jit_compile=True, `model.fit(x, y, batch_size=..., shuffle=True)` on the same uint8 host NumPy
  array, no augmentation;
- (a) plain PyTorch: torchvision efficientnet_b0 / resnet50 (torchvision has no ResNet50V2; v1 has
  about the same cost), channels_last, bf16 autocast, Adam, the uint8 images already on the GPU,
  each batch gathered, converted to float and normalised on the GPU. Skipped, with a message,
  when torch or torchvision is not installed. `--torch-compile` adds torch.compile.

"ours XLA" in the table is what Keras resolved jit_compile="auto" to for our model. Keras 3 turns
XLA off (on JAX: the train step is not jax.jit-compiled at all) for a model holding a layer that
declares supports_jit = False, as RandomRotation, RandomZoom and RandomTranslation do; ours has
them, so expect "off" and read the ours/b ratio with that in mind. `--no-augmentation` measures
ours without the augmentation layers.

Each (method, model, batch size) runs `--warmup` epochs (compilation, cuDNN autotuning) and then
`--epochs` timed epochs; the median timed epoch is reported. Each method runs in its own process
(JAX preallocates most of the GPU's memory; PyTorch must not share it). Ratios: ours/b and ours/a
(above 1: ours is faster).

Without --smoke a GPU is required (the script exits otherwise). --smoke: 8 images of 32x32,
batch 8 (one step per epoch), one warm-up and one timed epoch, CPU allowed; it checks the code
paths, not the speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    # registry name: (keras.applications factory, torchvision builder)
    "efficientnetb0": ("EfficientNetB0", "efficientnet_b0"),
    "resnet50v2": ("ResNet50V2", "resnet50"),
}
METHODS = ("ours", "bare_keras", "torch")
CLASSES = 10
SEED = 42
# The augmentation the course's datasets use (gtsrb, fer2013): every layer build_model can add
# except contrast.
AUGMENTATION = {"flip": "horizontal", "rotation": 10.0, "zoom": 0.1, "translation": 0.1}


def synthetic(images: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    x = rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, CLASSES, images).astype(np.int32)
    return x, y


def timed_epochs(run_epoch, images: int, warmup: int, epochs: int) -> dict:
    """run_epoch(e) trains one epoch and returns once the device is done; img/s per timed epoch."""
    started = time.perf_counter()
    for epoch in range(warmup):
        run_epoch(epoch)
    warmup_seconds = time.perf_counter() - started
    rates = []
    for epoch in range(warmup, warmup + epochs):
        started = time.perf_counter()
        run_epoch(epoch)
        rates.append(images / (time.perf_counter() - started))
    return {
        "img_per_s": round(statistics.median(rates), 1),
        "epochs_img_per_s": [round(r, 1) for r in rates],
        "warmup_seconds": round(warmup_seconds, 1),
    }


# --------------------------------------------------------------------------------------------
# The three methods; each runs inside its own child process.


def keras_device() -> dict:
    import jax
    import keras

    device = jax.devices()[0]
    return {
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "jax": jax.__version__,
        "platform": device.platform,
        "device": device.device_kind,
    }


def run_ours(name: str, batch_size: int, x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> dict:
    import keras

    from stages import runtime
    from stages.backbones import build_model
    from stages.config import Augmentation, BackboneConfig
    from stages.loader import array_batches
    from stages.train import make_optimizer

    keras.backend.clear_session()
    runtime.keep_tensorflow_out()
    device = runtime.accelerator()
    policy = runtime.precision_policy("bfloat16", device)  # mixed_bfloat16, as "auto" picks on an H100
    keras.config.set_dtype_policy(policy)
    runtime.make_deterministic(SEED, device)
    augmentation = Augmentation(**({} if args.no_augmentation else AUGMENTATION))
    model = build_model(
        BackboneConfig(model=name, input_size=args.size, weights=None),
        image_size=args.size, channels=3, num_classes=CLASSES, augmentation=augmentation, seed=SEED,
    )
    runtime.let_augmentation_compile(model)  # as the train stage does
    jit = runtime.jit_compile("auto")
    model.compile(optimizer=make_optimizer("adam", 1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=jit)
    batches = array_batches(x, y, batch_size=batch_size, seed=SEED, shuffle=True, on_device=True,
                            workers=4 if device.kind == "gpu" else 1)

    def run_epoch(epoch: int) -> None:
        batches.set_epoch(epoch)
        history = model.fit(batches, initial_epoch=epoch, epochs=epoch + 1, shuffle=False, verbose=0)
        float(history.history["loss"][-1])  # the epoch's metrics come back from the device

    result = timed_epochs(run_epoch, len(x), args.warmup, args.epochs)
    # model.jit_compile is what compile resolved "auto" to: Keras turns XLA off (on JAX: no
    # jax.jit at all) when any layer says it cannot be compiled, as RandomRotation, RandomZoom and
    # RandomTranslation do in Keras 3.
    result.update(dtype_policy=policy, jit_compile_setting=str(jit), jit_compile=bool(model.jit_compile),
                  on_device=bool(batches.on_device),
                  augmentation=bool(not args.no_augmentation), parameters=int(model.count_params()))
    del model, batches
    gc.collect()
    return result


def run_bare_keras(name: str, batch_size: int, x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> dict:
    import keras

    from stages import runtime

    keras.backend.clear_session()
    runtime.keep_tensorflow_out()
    keras.config.set_dtype_policy("mixed_bfloat16")
    np.random.seed(SEED)
    factory = getattr(keras.applications, MODELS[name][0])
    model = factory(include_top=True, weights=None, input_shape=(args.size, args.size, 3), classes=CLASSES)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=True)

    def run_epoch(epoch: int) -> None:
        history = model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
        float(history.history["loss"][-1])

    result = timed_epochs(run_epoch, len(x), args.warmup, args.epochs)
    result.update(dtype_policy="mixed_bfloat16", jit_compile=bool(model.jit_compile), parameters=int(model.count_params()))
    del model
    gc.collect()
    return result


def torch_device() -> dict:
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": "gpu" if cuda else "cpu",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }


def run_torch(name: str, batch_size: int, x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> dict:
    import torch
    import torchvision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(SEED)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    images = torch.from_numpy(x).to(device)  # uint8, NHWC, on the GPU once
    labels = torch.from_numpy(y).long().to(device)
    model = getattr(torchvision.models, MODELS[name][1])(weights=None, num_classes=CLASSES)
    model = model.to(device, memory_format=torch.channels_last).train()
    step_model = torch.compile(model) if args.torch_compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    generator = torch.Generator(device=device).manual_seed(SEED)
    count = len(images)

    def run_epoch(epoch: int) -> None:
        order = torch.randperm(count, device=device, generator=generator)
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            batch = images[index].permute(0, 3, 1, 2).float()
            batch = ((batch - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = loss_fn(step_model(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        float(loss)

    result = timed_epochs(run_epoch, count, args.warmup, args.epochs)
    result.update(dtype="bf16 autocast", channels_last=True, torch_compile=bool(args.torch_compile),
                  torchvision_model=MODELS[name][1], parameters=sum(p.numel() for p in model.parameters()))
    del model, step_model, optimizer, images, labels
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def child(method: str, args: argparse.Namespace) -> None:
    """Run every (model, batch size) of one method; write the results as JSON to args.result."""
    results: dict = {"method": method, "runs": []}

    def save() -> None:
        Path(args.result).write_text(json.dumps(results, indent=2))

    try:
        results["environment"] = torch_device() if method == "torch" else keras_device()
    except ImportError as error:
        results["skipped"] = f"{type(error).__name__}: {error}"
        save()
        return
    if method == "torch" and results["environment"]["platform"] != "gpu" and not args.smoke:
        # A CPU-only torch wheel on a GPU machine would time the reference on the CPU.
        results["skipped"] = f"torch {results['environment']['torch']} sees no CUDA GPU"
        save()
        return
    x, y = synthetic(args.images, args.size)
    run = {"ours": run_ours, "bare_keras": run_bare_keras, "torch": run_torch}[method]
    for name in args.models:
        for batch_size in args.batch_sizes:
            started = time.perf_counter()
            try:
                outcome = run(name, batch_size, x, y, args)
            except Exception as error:  # noqa: BLE001 - report it and go on with the next
                outcome = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
            outcome.update(model=name, batch_size=batch_size, seconds=round(time.perf_counter() - started, 1))
            results["runs"].append(outcome)
            save()
            print(f"{method} {name} batch {batch_size}: "
                  f"{outcome.get('img_per_s', outcome.get('error'))} img/s", flush=True)


# --------------------------------------------------------------------------------------------
# The parent: one child per method, then the table.


def child_command(method: str, args: argparse.Namespace, result: Path) -> list[str]:
    command = [
        sys.executable, __file__, "--child", method, "--result", str(result),
        "--images", str(args.images), "--size", str(args.size), "--warmup", str(args.warmup),
        "--epochs", str(args.epochs), "--models", *args.models,
        "--batch-sizes", *map(str, args.batch_sizes),
    ]
    if args.no_augmentation:
        command.append("--no-augmentation")
    if args.torch_compile:
        command.append("--torch-compile")
    if args.smoke:
        command.append("--smoke")
    return command


def check_gpu(env: dict[str, str]) -> str | None:
    """The JAX GPU's name, or None when JAX sees none."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)"],
        env=env, capture_output=True, text=True,
    )
    words = probe.stdout.strip().split(" ", 1)
    return words[1] if probe.returncode == 0 and words[0] == "gpu" else None


def table(results: dict[str, dict], args: argparse.Namespace) -> list[str]:
    def rate(method: str, name: str, batch_size: int) -> float | None:
        for run in results.get(method, {}).get("runs", []):
            if run["model"] == name and run["batch_size"] == batch_size:
                return run.get("img_per_s")
        return None

    def jit(name: str, batch_size: int) -> str:
        for run in results.get("ours", {}).get("runs", []):
            if run["model"] == name and run["batch_size"] == batch_size and "jit_compile" in run:
                return "on" if run["jit_compile"] else "off"
        return "-"

    lines = [f"{'model':<15} {'batch':>5} {'ours img/s':>11} {'ours XLA':>8} {'(b) bare Keras':>15} {'(a) PyTorch':>12} "
             f"{'ours/b':>7} {'ours/a':>7}"]

    def cell(value: float | None, width: int) -> str:
        return f"{value:>{width},.0f}" if value else f"{'-':>{width}}"

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:>6.2f}x" if a and b else f"{'-':>7}"

    for name in args.models:
        for batch_size in args.batch_sizes:
            ours, bare, torch = (rate(m, name, batch_size) for m in METHODS)
            lines.append(f"{name:<15} {batch_size:>5} {cell(ours, 11)} {jit(name, batch_size):>8} {cell(bare, 15)} {cell(torch, 12)} "
                         f"{ratio(ours, bare)} {ratio(ours, torch)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs first (compilation)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (median reported)")
    parser.add_argument("--no-augmentation", action="store_true", help="ours without augmentation layers")
    parser.add_argument("--torch-compile", action="store_true", help="(a) with torch.compile")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per method before it is abandoned")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    parser.add_argument("--smoke", action="store_true", help="8 images of 32x32, batch 8, 1 step; CPU allowed")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.images, args.size, args.batch_sizes, args.warmup, args.epochs = 8, 32, [8], 1, 1
    if args.child:
        child(args.child, args)
        return

    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "jax")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    if env["KERAS_BACKEND"] != "jax":
        raise SystemExit(f"KERAS_BACKEND is {env['KERAS_BACKEND']}; this benchmark is for jax (KERAS_BACKEND=jax)")
    gpu = check_gpu(env)
    if gpu is None and not args.smoke:
        raise SystemExit("JAX sees no GPU; run on a GPU machine (jax[cuda]), or pass --smoke to check the code on a CPU")
    print(f"device: {gpu or 'cpu (smoke)'}; {args.images} images {args.size}x{args.size}, batch sizes "
          f"{args.batch_sizes}, {args.warmup} warm-up + {args.epochs} timed epochs", flush=True)

    results: dict[str, dict] = {}
    scratch = Path(args.out).parent if args.out else Path("/tmp")
    for method in args.methods:
        result_file = scratch / f"gpu_throughput.{method}.{os.getpid()}.json"
        started = time.perf_counter()
        try:
            finished = subprocess.run(child_command(method, args, result_file), env=env, cwd=REPO,
                                      capture_output=True, text=True, timeout=args.timeout)
            failure = None if finished.returncode == 0 else (finished.stdout + finished.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            failure = f"timed out after {args.timeout} s"
        results[method] = json.loads(result_file.read_text()) if result_file.exists() else {"runs": []}
        result_file.unlink(missing_ok=True)
        results[method]["seconds"] = round(time.perf_counter() - started, 1)
        if failure:
            results[method]["failure"] = failure
            print(f"{method}: FAILED\n{failure}", flush=True)
        if "skipped" in results[method]:
            print(f"{method}: skipped ({results[method]['skipped']})", flush=True)
        for run in results[method]["runs"]:
            if "error" in run:
                print(f"{method} {run['model']} batch {run['batch_size']}: {run['error']}\n{run['traceback']}", flush=True)

    summary = {
        "device": gpu or "cpu (smoke)",
        "host": platform.node(),
        "cores": len(os.sched_getaffinity(0)),
        "images": args.images,
        "size": args.size,
        "warmup": args.warmup,
        "epochs": args.epochs,
        "smoke": args.smoke,
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({m: {k: v for k, v in r.items() if k != "runs"} for m, r in results.items()}, indent=2))
    print()
    for line in table(results, args):
        print(line)


if __name__ == "__main__":
    main()
