"""Open Images: selecting 3 classes from a 10-million-row human image-labels CSV, time and memory.

    python benchmarks/openimages_labels.py --rows 10000000 --workdir /tmp/cm-openimages

Generates (once, then reused) a labels CSV with the real header and columns
(`ImageID,Source,LabelName,Confidence`), sorted by ImageID like the real file: 16-hex-digit
ImageIDs with a few labels each, 600 LabelNames of the `/m/0xxxxx` form drawn with a Zipf-like
frequency (a few classes are very common, as "Person" is), Source one of the real values,
Confidence 1 for about 70% of rows. Then, in a fresh process, runs the same function the
`openimages` source uses (`stages.openimages.select_labelled`) for 3 classes (the most common
one, the 10th and the 100th), and reports wall time, rows matched, and peak memory: the resident
memory of the child process sampled every 0.05 s, and its own `ru_maxrss` (the kernel's peak),
beside the memory of the same process after its imports, before reading. `images_per_class`
counts distinct ImageIDs with a Confidence-1 row of the class (what the selection keeps). The real train file
(oidv7-train-annotations-human-imagelabels.csv) is about 2.7 GB; scale the time by its size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from sampling import run_sampled  # noqa: E402
SOURCES = np.array(["verification", "crowdsource-verification", "human"])

CHILD = r"""
import json, resource, sys, time
import psutil
from stages import openimages
import pyarrow, pyarrow.csv, pyarrow.compute  # the imports the selection makes, counted in the baseline
path, labels = sys.argv[1], sys.argv[2].split(",")
before = psutil.Process().memory_info().rss
started = time.perf_counter()
found = openimages.select_labelled(path, labels)
seconds = time.perf_counter() - started
print(json.dumps({
    "seconds": seconds,
    "rss_after_imports": before,
    "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "images_per_class": {label: len(ids) for label, ids in found.items()},
}))
"""


def label_names(count: int, rng: np.random.Generator) -> list[str]:
    alphabet = np.array(list("0123456789bcdfghjklmnpqrstvwxyz_"))
    names: set[str] = set()
    while len(names) < count:
        names.add("/m/0" + "".join(rng.choice(alphabet, int(rng.integers(4, 6)))))
    return sorted(names)


def generate(path: Path, rows: int, classes: int = 600, seed: int = 0) -> list[str]:
    """Write the CSV; return the LabelNames ordered from most to least common."""
    rng = np.random.default_rng(seed)
    names = np.array(label_names(classes, rng))
    weights = 1.0 / np.arange(1, classes + 1) ** 1.1
    weights /= weights.sum()
    popular = list(names)  # names[i] has weight weights[i]: names[0] is the most common
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    image_counter = 0
    # About rows/6 images; gaps averaging half of max_gap fill half of the 64-bit range.
    max_gap = int(2**64 // (rows / 6 + 1))
    with open(tmp, "w", encoding="utf-8", newline="\n") as sink:
        sink.write("ImageID,Source,LabelName,Confidence\n")
        while written < rows:
            batch = min(1_000_000, rows - written)
            # ~6 labels an image (the real file has about that), each image's rows together.
            per_image = rng.integers(1, 12, size=batch // 3 + 1)
            per_image = per_image[np.cumsum(per_image) <= batch]
            if per_image.sum() < batch:
                per_image = np.append(per_image, batch - per_image.sum())
            # Increasing 64-bit ids with random gaps, printed as 16 hex digits: sorted, and as
            # spread over the hex range as the real ones.
            gaps = rng.integers(1, max_gap, size=len(per_image), dtype=np.uint64)
            ids = np.uint64(image_counter) + np.cumsum(gaps, dtype=np.uint64)
            image_counter = int(ids[-1])
            image_ids = np.char.mod("%016x", ids)
            column_ids = np.repeat(image_ids, per_image)
            labels = names[rng.choice(classes, size=batch, p=weights)]
            sources = SOURCES[rng.integers(0, len(SOURCES), size=batch)]
            confidence = (rng.random(batch) < 0.7).astype(np.int8).astype(str)
            lines = np.char.add(np.char.add(np.char.add(np.char.add(np.char.add(np.char.add(
                column_ids, ","), sources), ","), labels), ","), confidence)
            sink.write("\n".join(lines.tolist()))
            sink.write("\n")
            written += batch
    os.replace(tmp, path)
    return popular


def measure(path: Path, labels: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", CHILD, str(path), ",".join(labels)]
    seconds, peak, finished = run_sampled(command, REPO, env, tree=False, interval=0.05)
    if finished.returncode:
        raise SystemExit(f"the selection failed:\n{finished.stderr[-3000:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    result["process_seconds"] = seconds
    result["sampled_peak_rss"] = peak
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cm-openimages"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"labels-{args.rows}.csv"
    order_file = path.with_name(path.name + ".labels.json")
    if not path.exists() or not order_file.exists():
        print(f"generating {args.rows:,} rows in {path} ...", flush=True)
        started = time.perf_counter()
        order_file.write_text(json.dumps(generate(path, args.rows)))
        print(f"generated in {time.perf_counter() - started:.0f} s", flush=True)
    popular = json.loads(order_file.read_text())
    chosen = [popular[0], popular[9], popular[99]]
    result = measure(path, chosen)
    mib = 2**20
    print(json.dumps({
        "rows": args.rows,
        "file_mib": round(path.stat().st_size / mib),
        "classes": chosen,
        "images_per_class": result["images_per_class"],
        "images_matched": sum(result["images_per_class"].values()),
        "selection_seconds": round(result["seconds"], 1),
        "rows_per_second": round(args.rows / result["seconds"]),
        "process_seconds_with_imports": round(result["process_seconds"], 1),
        "peak_rss_mib_sampled": round(result["sampled_peak_rss"] / mib),
        "peak_rss_mib_ru_maxrss": round(result["ru_maxrss"] / mib),
        "rss_mib_after_imports": round(result["rss_after_imports"] / mib),
        "cores": len(os.sched_getaffinity(0)),
    }, indent=2))


if __name__ == "__main__":
    main()
