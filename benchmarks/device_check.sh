#!/usr/bin/env bash
# The one command a session with the borrowed GPU machine runs, from the repository root, after
# `bash benchmarks/device_wheels.sh` here:
#
#   run  command: bash benchmarks/device_check.sh   carry: [".whl"]   timeout_s: 540
#
# It installs the carried wheels (Keras and the two packages it needs that the machine lacks) into
# $SITE, prints the GPU and the versions, runs benchmarks/gpu_throughput.py under a deadline and
# leaves $OUT/gpu_throughput.json (rewritten after every child) and $OUT/device_check.log (all of
# this output); it ends with the table, then (when at least 45 s are left) benchmarks/torch_device.py,
# the loader's device path on KERAS_BACKEND=torch. Extra arguments go to gpu_throughput.py (later ones win),
# e.g. `--models resnet50v2` for a second, shorter call. Here, without a GPU:
#
#   PATH=/tmp/devsim/bin:$PATH SITE=/tmp/devsite bash benchmarks/device_check.sh --smoke
#
# Time. The lease is 15 minutes of device time in all, the machine's start (1-2 min) included,
# at most 10 minutes a command. BUDGET (450 s) bounds this whole command: the benchmark's
# --deadline is what is left of it after the install and the version print (about 15-30 s), so
# the command ends by about 7.5 minutes plus the table, and timeout_s 540 leaves a margin.
# One JAX child (ours or bare Keras, one model and batch size): start, imports and GPU set-up
# ~10 s, the 1.2 GB synthetic array ~3 s, building the model ~5 s, then the warm-up epoch, which
# holds the XLA compilation of the train step (30-90 s on a GPU), then 3 timed epochs of 8,192
# images at ~3,000-7,000 img/s (1-3 s each): ~55-120 s. A torch child (no XLA; cuDNN autotuning
# in its warm-up epoch) ~20-40 s. One table row is then ~130-280 s, so the four rows (12
# children, 9-19 min) do not all fit in one command: the rows run in order (efficientnetb0 128,
# 256, resnet50v2 128, 256), each complete before the next, and a child that would not fit is
# recorded as "skipped: deadline". 8,192 images and 3 timed epochs give a median of three
# epochs of 32-64 steps each (Keras's per-fit overhead included, as train pays it); 5 timed
# epochs would cost ~2 x 2 s more per child, ~40 s over 12 children, about one more child.
#
# Memory. Only one process holds the GPU at a time (the children run one after another and the
# GPU probe does not preallocate), so JAX's defaults stay: preallocate 75 % of the GPU (~105 GiB
# of the H200's 141) up front, no growth while timing. PyTorch runs in its own process after the
# JAX ones have exited.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-450}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/classmatrix-device-check}  # $OUT is set on the GPU machine; a local folder here
mkdir -p "$OUT"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-true}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.75}

{
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no wheels in .whl/: run benchmarks/device_wheels.sh here and name .whl in carry"
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 2
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    else
        echo "nvidia-smi: not found (no NVIDIA GPU here)"
    fi
    python3 - <<'EOF' || exit 2
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("jax", "jaxlib", "keras", "numpy", "optree", "torch", "torchvision"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {module.__version__} ({module.__file__})")
    except ImportError as error:
        print(f"{name}: {error}")
print("tensorflow imported:", "tensorflow" in sys.modules)
EOF
    deadline=$((BUDGET - SECONDS))
    echo "setup took ${SECONDS} s; benchmark deadline ${deadline} s"
    python3 benchmarks/gpu_throughput.py --out "$OUT/gpu_throughput.json" --deadline "$deadline" \
        --images 8192 --warmup 1 --epochs 3 "$@"
    bench=$?
    # With the time the benchmark left (it stops short of its deadline when the next child would
    # not fit): the loader's device path on the PyTorch backend, ~15-30 s (with --smoke: on the CPU).
    torch_args=()
    [[ " $* " == *" --smoke "* ]] && torch_args=(--cpu)
    if (( BUDGET - SECONDS > 45 )); then
        KERAS_BACKEND=torch timeout $((BUDGET - SECONDS)) python3 benchmarks/torch_device.py "${torch_args[@]}" || bench=1
    else
        echo "torch_device: skipped, $((BUDGET - SECONDS)) s left"
    fi
    exit $bench
} 2>&1 | tee "$OUT/device_check.log"
status=$?
echo "exit status $status; results in $OUT/gpu_throughput.json and $OUT/device_check.log"
exit $status
