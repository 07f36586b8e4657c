"""GPU training throughput: the train stage's code path against bare Keras and plain PyTorch.

    KERAS_BACKEND=jax python benchmarks/gpu_throughput.py --out /tmp/gpu_throughput.json --deadline 420
    KERAS_BACKEND=jax python benchmarks/gpu_throughput.py --smoke      # tiny, 1 step, CPU allowed
    bash benchmarks/device_check.sh                                     # on the borrowed GPU machine

End-to-end training throughput (images per second, training steps only, no validation) of
EfficientNetB0 and ResNet50V2 at 224x224 from scratch, batch 128 and 256, on `--images` synthetic
uint8 images (8,192 by default) with 10 classes, measured three ways:

- ours: what stages/train.py does on a GPU. stages.loader.array_batches over the uint8 array
  (on_device=True: on JAX with a GPU the array is copied to the device once and batches are
  gathered there; workers=4), stages.backbones.build_model (uint8 input, the augmentation it
  builds for flip, rotation, zoom and translation, the backbone's preprocessing, the `features`
  head), the mixed_bfloat16 dtype policy (the layers before the base compute in float32), jit_compile from runtime.jit_compile("auto"), and one
  `model.fit` call per epoch with `set_epoch`, as train runs its epochs;
- (b) bare Keras on JAX: keras.applications.<Model>(weights=None, classes=10), mixed_bfloat16,
  jit_compile=True, `model.fit(x, y, batch_size=..., shuffle=True)` on the same uint8 host NumPy
  array, no augmentation;
- (a) plain PyTorch: torchvision efficientnet_b0 / resnet50 (torchvision has no ResNet50V2; v1 has
  about the same cost), channels_last, bf16 autocast, Adam, the uint8 images already on the GPU,
  each batch gathered, converted to float and normalised on the GPU. Skipped, with a message,
  when torch or torchvision is not installed. `--torch-compile` adds torch.compile.

"ours XLA" in the table is what Keras resolved jit_compile="auto" to for our model: Keras 3 turns
XLA off (on JAX: the train step is not jax.jit-compiled at all) for a model holding a layer that
declares supports_jit = False, as its own RandomRotation, RandomZoom and RandomTranslation do;
build_model's augmentation is one RandomAffine (stages/augmentation.py), which compiles, so the
column should say "on". `--no-augmentation` measures ours without augmentation.

Each (model, batch size, method) runs in a child process of its own, one at a time (JAX
preallocates most of the GPU's memory; PyTorch must not share it), a table row's three methods
before the next row's: efficientnetb0 128, efficientnetb0 256, resnet50v2 128, resnet50v2 256.
A child runs `--warmup` epochs (compilation, cuDNN autotuning), then `--epochs` timed epochs, and
reports the median timed epoch. Ratios: ours/b and ours/a (above 1: ours is faster). Each child
also records its jax/keras/numpy (or torch) versions, the device, and whether `tensorflow` was
imported (the JAX path must not import it; the GPU machine has none). Ours and (b) record
`trainable_parameters`: the same count, or the comparison does not hold.

`--deadline SECONDS` bounds the whole script: a child that would start with less time left than
the longest child of its method so far took (for a method's first child, the longest child of
any; at least MIN_CHILD_SECONDS) is skipped and recorded as skipped with "deadline: ...", and each
child is killed when the time is up. `--out` (one JSON object: the settings and `runs`, one entry
per child in order) is rewritten after every child, so a run cut short keeps what it measured.
The exit status is 1 when any child failed (an error, a crash, a timeout), else 0.

Without --smoke a GPU is required (the script exits otherwise). --smoke: 8 images of 32x32,
batch 8 (one step per epoch), one warm-up and one timed epoch, CPU allowed; it checks the code
paths, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

STARTED = time.monotonic()
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
# The augmentation the course's datasets use (gtsrb, fer2013): every kind build_model can add
# except contrast.
AUGMENTATION = {"flip": "horizontal", "rotation": 10.0, "zoom": 0.1, "translation": 0.1}
# Under --deadline, the least time a child is expected to need before any of its method has run.
MIN_CHILD_SECONDS = 30.0


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
# The three methods; each call runs inside a child process of its own.


def trainable(model) -> int:
    """Weights the optimizer updates: ours (a base trained from scratch is not frozen) and (b)
    must both train the whole network for the comparison to hold."""
    return int(sum(np.prod(weight.shape) for weight in model.trainable_weights))


def keras_device() -> dict:
    import jax
    import keras

    device = jax.devices()[0]
    return {
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "platform": device.platform,
        "device": device.device_kind,
    }


def run_ours(name: str, batch_size: int, x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> dict:
    import keras

    from stages import runtime
    from stages.backbones import build_model
    from stages.config import Augmentation, BackboneConfig
    from stages.loader import array_batches, keras_input
    from stages.train import make_optimizer

    runtime.keep_tensorflow_out()
    device = runtime.accelerator()
    policy = runtime.precision_policy("bfloat16", device)  # mixed_bfloat16, as "auto" picks on an H100 or H200
    keras.config.set_dtype_policy(policy)
    runtime.make_deterministic(SEED, device)
    augmentation = Augmentation(**({} if args.no_augmentation else AUGMENTATION))
    model = build_model(
        BackboneConfig(model=name, input_size=args.size, weights=None),
        image_size=args.size, channels=3, num_classes=CLASSES, augmentation=augmentation, seed=SEED,
    )
    jit = runtime.jit_compile("auto")
    model.compile(optimizer=make_optimizer("adam", 1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=jit)
    batches = array_batches(x, y, batch_size=batch_size, seed=SEED, shuffle=True, on_device=True,
                            workers=4 if device.kind == "gpu" else 1)
    fed = keras_input(batches)  # the batches themselves on JAX, as in train

    def run_epoch(epoch: int) -> None:
        batches.set_epoch(epoch)
        history = model.fit(fed, initial_epoch=epoch, epochs=epoch + 1, shuffle=False, verbose=0)
        float(history.history["loss"][-1])  # the epoch's metrics come back from the device

    result = timed_epochs(run_epoch, len(x), args.warmup, args.epochs)
    # model.jit_compile is what compile resolved "auto" to: Keras turns XLA off (on JAX: no
    # jax.jit at all) when any layer says it cannot be compiled.
    return result | dict(dtype_policy=policy, jit_compile_setting=str(jit), jit_compile=bool(model.jit_compile),
                         on_device=bool(batches.on_device), augmentation=not args.no_augmentation,
                         parameters=int(model.count_params()), trainable_parameters=trainable(model))


def run_bare_keras(name: str, batch_size: int, x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> dict:
    import keras

    from stages import runtime

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
    return result | dict(dtype_policy="mixed_bfloat16", jit_compile=bool(model.jit_compile),
                         parameters=int(model.count_params()), trainable_parameters=trainable(model))


def torch_device() -> dict:
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
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
        loss.item()

    result = timed_epochs(run_epoch, count, args.warmup, args.epochs)
    return result | dict(dtype="bf16 autocast", channels_last=True, torch_compile=bool(args.torch_compile),
                         torchvision_model=MODELS[name][1], parameters=sum(p.numel() for p in model.parameters()))


def child(args: argparse.Namespace) -> int:
    """Run one (method, model, batch size); write what it found as JSON to args.result."""
    run: dict = {"python": platform.python_version()}
    try:
        run["environment"] = torch_device() if args.child == "torch" else keras_device()
    except ImportError as error:  # torch and torchvision are optional; Keras and JAX are not
        run["skipped" if args.child == "torch" else "error"] = f"{type(error).__name__}: {error}"
    if "environment" in run and args.child == "torch" and run["environment"]["platform"] != "gpu" and not args.smoke:
        # A CPU-only torch wheel on a GPU machine would time the reference on the CPU.
        run["skipped"] = f"torch {run['environment']['torch']} sees no CUDA GPU"
    if "environment" in run and "skipped" not in run:
        method = {"ours": run_ours, "bare_keras": run_bare_keras, "torch": run_torch}[args.child]
        try:
            run.update(method(args.model, args.batch_size, *synthetic(args.images, args.size), args))
        except Exception as error:  # noqa: BLE001 - reported in the results, and the parent goes on
            traceback.print_exc()
            run.update(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-3000:])
    run["tensorflow_imported"] = "tensorflow" in sys.modules
    Path(args.result).write_text(json.dumps(run, indent=2))
    return 1 if "error" in run else 0


# --------------------------------------------------------------------------------------------
# The parent: one child per (model, batch size, method), then the table.


def child_command(method: str, name: str, batch_size: int, args: argparse.Namespace, result: Path) -> list[str]:
    command = [
        sys.executable, __file__, "--child", method, "--result", str(result), "--models", name,
        "--batch-sizes", str(batch_size), "--images", str(args.images), "--size", str(args.size),
        "--warmup", str(args.warmup), "--epochs", str(args.epochs),
    ]
    for flag in ("no_augmentation", "torch_compile", "smoke"):
        if getattr(args, flag):
            command.append("--" + flag.replace("_", "-"))
    return command


def check_gpu(env: dict[str, str]) -> str | None:
    """The JAX GPU's name, or None when JAX sees none."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)"],
        env={**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, capture_output=True, text=True,
    )
    words = probe.stdout.strip().split(" ", 1)
    if probe.returncode == 0 and words[0] == "gpu":
        return words[1]
    print(f"JAX sees no GPU: {probe.stdout.strip()} {probe.stderr.strip()[-2000:]}".rstrip(), flush=True)
    return None


def outcome(run: dict | None) -> str:
    """A run's result in a few words."""
    if run is None:
        return "-"
    if "img_per_s" in run:
        return f"{run['img_per_s']:,.0f}"
    if "skipped" in run:
        return "deadline" if run["skipped"].startswith("deadline") else "skipped"
    return "timeout" if "timed out" in run.get("failure", "") else "failed"


def table(runs: list[dict], args: argparse.Namespace) -> list[str]:
    found = {(run["method"], run["model"], run["batch_size"]): run for run in runs}

    def ratio(a: dict | None, b: dict | None) -> str:
        if a and b and a.get("img_per_s") and b.get("img_per_s"):
            return f"{a['img_per_s'] / b['img_per_s']:>6.2f}x"
        return f"{'-':>7}"

    lines = [f"{'model':<15} {'batch':>5} {'ours img/s':>11} {'ours XLA':>8} {'(b) bare Keras':>15} {'(a) PyTorch':>12} "
             f"{'ours/b':>7} {'ours/a':>7}"]
    for name in args.models:
        for batch_size in args.batch_sizes:
            ours, bare, torch = (found.get((method, name, batch_size)) for method in METHODS)
            xla = {True: "on", False: "off"}.get((ours or {}).get("jit_compile"), "-")
            lines.append(f"{name:<15} {batch_size:>5} {outcome(ours):>11} {xla:>8} {outcome(bare):>15} {outcome(torch):>12} "
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
    parser.add_argument("--deadline", type=float, help="seconds for the whole script; children that would not fit are skipped")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one child may take before it is killed")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too (rewritten after every child)")
    parser.add_argument("--smoke", action="store_true", help="8 images of 32x32, batch 8, 1 step; CPU allowed")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Checked here, on the host: a bad value would otherwise fail in a child, on device time.
    for flag, values, least in (("--batch-sizes", args.batch_sizes, 1), ("--images", [args.images], 1),
                                ("--size", [args.size], 32), ("--epochs", [args.epochs], 1), ("--warmup", [args.warmup], 0)):
        if min(values) < least:
            parser.error(f"{flag} {' '.join(map(str, values))}: each must be at least {least}")
    if args.smoke:
        args.images, args.size, args.batch_sizes, args.warmup, args.epochs = 8, 32, [8], 1, 1
    if args.child:
        args.model, args.batch_size = args.models[0], args.batch_sizes[0]
        raise SystemExit(child(args))
    if args.out and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.parent} does not exist; create it or name another")

    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "jax")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    if env["KERAS_BACKEND"] != "jax":
        raise SystemExit(f"KERAS_BACKEND is {env['KERAS_BACKEND']}; this benchmark is for jax (KERAS_BACKEND=jax)")
    gpu = check_gpu(env)
    if gpu is None and not args.smoke:
        raise SystemExit("JAX sees no GPU; run on a GPU machine (jax[cuda]), or pass --smoke to check the code on a CPU")
    plan = [(name, batch_size, method) for name in args.models for batch_size in args.batch_sizes for method in args.methods]
    print(f"device: {gpu or 'cpu (smoke)'}; {args.images} images {args.size}x{args.size}, {args.warmup} warm-up + "
          f"{args.epochs} timed epochs; {len(plan)} children, deadline {f'{args.deadline:.0f} s' if args.deadline else 'none'}", flush=True)

    summary = {
        "device": gpu or "cpu (smoke)", "host": platform.node(), "cores": len(os.sched_getaffinity(0)),
        "images": args.images, "size": args.size, "warmup": args.warmup, "epochs": args.epochs,
        "smoke": args.smoke, "deadline": args.deadline, "seconds": 0.0, "runs": [],
    }

    def save() -> None:
        summary["seconds"] = round(time.monotonic() - STARTED, 1)
        if args.out:
            args.out.write_text(json.dumps(summary, indent=2))

    def record(run: dict) -> None:
        summary["runs"].append(run)
        save()

    save()

    scratch = Path(tempfile.mkdtemp(prefix="gpu_throughput."))  # not under --out: $OUT returns 8 files at most
    longest: dict[str, float] = {}  # per method, the longest child so far, in seconds
    for number, (name, batch_size, method) in enumerate(plan, 1):
        run = {"method": method, "model": name, "batch_size": batch_size}
        timeout = args.timeout
        if args.deadline:
            left = args.deadline - (time.monotonic() - STARTED)
            # A method's first child is expected to take as long as the longest child so far.
            expected = max(MIN_CHILD_SECONDS, longest.get(method, max(longest.values(), default=0.0)))
            if left < expected:
                run["skipped"] = f"deadline: {max(left, 0):.0f} s left, {expected:.0f} s expected"
                record(run)
                print(f"[{number}/{len(plan)}] {method} {name} batch {batch_size}: skipped ({run['skipped']})", flush=True)
                continue
            timeout = min(timeout, left)
        print(f"[{number}/{len(plan)}] {method} {name} batch {batch_size} ...", flush=True)
        result = scratch / f"{number}.json"
        started = time.monotonic()
        try:
            finished = subprocess.run(child_command(method, name, batch_size, args, result), env=env, cwd=REPO,
                                      stdin=subprocess.DEVNULL, timeout=timeout)
            failure = f"exit code {finished.returncode}" if finished.returncode else None
        except subprocess.TimeoutExpired:
            failure = f"timed out after {timeout:.0f} s"
        seconds = time.monotonic() - started
        longest[method] = max(longest.get(method, 0.0), seconds)
        run.update(json.loads(result.read_text()) if result.exists() else {})
        run["seconds"] = round(seconds, 1)
        if failure:
            run["failure"] = failure
        record(run)
        said = (f"{run['img_per_s']:,.1f} img/s" if "img_per_s" in run
                else run.get("error") or run.get("failure") or run.get("skipped") or "no result")
        print(f"[{number}/{len(plan)}] {method} {name} batch {batch_size}: {said} ({seconds:.0f} s; "
              f"tensorflow imported: {run.get('tensorflow_imported', '?')})", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{summary['seconds']:.0f} s in all")
    for method in METHODS:
        environment = next((run["environment"] for run in summary["runs"] if run["method"] == method and "environment" in run), None)
        if environment:
            print(f"{method}: " + ", ".join(f"{key} {value}" for key, value in environment.items()))
    imported = [f"{run['method']} {run['model']} {run['batch_size']}" for run in summary["runs"] if run.get("tensorflow_imported")]
    print(f"tensorflow imported by: {', '.join(imported) or 'no child'}\n")
    for line in table(summary["runs"], args):
        print(line)
    raise SystemExit(1 if any("error" in run or "failure" in run for run in summary["runs"]) else 0)


if __name__ == "__main__":
    main()
