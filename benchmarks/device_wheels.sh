#!/usr/bin/env bash
# Re-creates .whl/ (git-ignored): the wheels that benchmarks/device_check.sh installs on the
# borrowed GPU machine, which has no network and no Keras. Run it here, from anywhere, before the
# `run` call that names ".whl" in carry (docs/benchmarks.md, GPU section).
#
# The machine's python3 is CPython 3.12 on x86-64 with jax 0.11.2, numpy 2.5.2, h5py, rich,
# ml-dtypes, absl-py, packaging and typing-extensions already installed (KINDS.md's package
# list). Of keras 3.15.1's Requires-Dist (absl-py, numpy, rich, namex, h5py, optree, ml-dtypes,
# packaging) it lacks only namex and optree; optree needs typing-extensions, which is there.
# Pinned as in uv.lock. About 2.9 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl  # exactly these three: two versions of one package stop the whole install there
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    keras==3.15.1 namex==0.1.0 optree==0.20.0
ls -l .whl
