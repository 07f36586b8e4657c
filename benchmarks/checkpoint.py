"""Per-epoch checkpoint of a frozen pretrained base: everything every epoch, against the base's
values written once per phase (stages.train.Checkpoint's static file).

    python benchmarks/checkpoint.py --models mobilenetv2 efficientnetb0 efficientnetb7 --workdir /tmp/cm-checkpoint

For each backbone: stages.backbones.build_model with a frozen base (weights=None stands in for a
pretrained file: the same variables), the params.yaml-style head (average pooling, dense 128,
dropout 0.2, 10 classes) and an Adam optimizer built for the head, as phase 1 has them; then
`--epochs` checkpoints of one epoch's state each way, through the train stage's own
Checkpoint.save:

- everything: `static=()`, what every epoch wrote before (the whole model and its best weights);
- static: `static=` the frozen base's variables, as train passes them; the first save also
  writes the static file, the others reuse it.

Reports bytes written per epoch and the median seconds of a save after the first (the first,
with the static file, separately). Files go to `--workdir` (keep it on the disk the models go to;
/tmp may be memory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(name: str, workdir: Path, epochs: int) -> dict:
    import keras
    import numpy as np

    from stages.backbones import REGISTRY, base_of, build_model
    from stages.config import Augmentation, BackboneConfig, HeadConfig
    from stages.train import Checkpoint, TrainingState

    size = REGISTRY.lookup(name).native_input_size or 224
    backbone = BackboneConfig(model=name, input_size=size, weights=None, freeze=True,
                              head=HeadConfig(pool="avg", dense=[128], dropout=0.2))
    model = build_model(backbone, image_size=size, channels=3, num_classes=10, augmentation=Augmentation(), seed=0)
    base = base_of(model)
    base.trainable = False  # as a pretrained, frozen base is (weights=None builds it trainable)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    best = model.get_weights()
    state = TrainingState(run_key="benchmark", run_id="")
    result = {"model": name, "input_size": size, "parameters": int(model.count_params()),
              "base_variables": len(base.variables), "trainable": int(sum(np.prod(v.shape) for v in model.trainable_variables))}
    for mode, static in (("everything", ()), ("static", base.non_trainable_variables)):
        folder = workdir / f"{name}-{mode}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        checkpoint = Checkpoint(folder / "checkpoint.npz")
        seconds = []
        for epoch in range(epochs):
            state.epoch = epoch
            started = time.perf_counter()
            checkpoint.save(state, model, optimizer, best, static)
            os.sync()
            seconds.append(time.perf_counter() - started)
        static_files = list(folder.glob("checkpoint.static-*.npz"))
        result[mode] = {
            "epoch_bytes": (folder / "checkpoint.npz").stat().st_size,
            "static_bytes": sum(path.stat().st_size for path in static_files),
            "first_seconds": round(seconds[0], 3),
            "epoch_seconds": round(statistics.median(seconds[1:]), 3),
        }
        shutil.rmtree(folder)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenetv2", "efficientnetb0", "efficientnetb7"])
    parser.add_argument("--epochs", type=int, default=6, help="checkpoints per way, at least 2: the first is reported "
                        "apart, the median of the others as the per-epoch cost")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/classmatrix-checkpoint"))
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs {args.epochs}: at least 2 (the first checkpoint is timed apart from the others)")
    from stages.backbones import REGISTRY
    from stages.errors import UserError

    for name in args.models:  # before any model is built and timed, not after the first ones
        try:
            REGISTRY.lookup(name)
        except UserError as error:
            parser.error(f"--models: {error}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rows = [measure(name, args.workdir, args.epochs) for name in args.models]
    print(f"{'backbone':<15} {'size':>4} {'params':>11} {'everything: MB/epoch':>21} {'s/epoch':>8} "
          f"{'static: MB/epoch':>17} {'s/epoch':>8} {'static file MB':>15} {'first save s':>13}")
    for row in rows:
        every, static = row["everything"], row["static"]
        print(f"{row['model']:<15} {row['input_size']:>4} {row['parameters']:>11,} {every['epoch_bytes'] / 1e6:>21.1f} "
              f"{every['epoch_seconds']:>8.3f} {static['epoch_bytes'] / 1e6:>17.2f} {static['epoch_seconds']:>8.3f} "
              f"{static['static_bytes'] / 1e6:>15.1f} {static['first_seconds']:>13.3f}")


if __name__ == "__main__":
    main()
