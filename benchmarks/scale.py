"""Scale: a GTSRB-sized dataset through fetch (local) + validate + split, and a no-op repro.

    python benchmarks/scale.py --files 50000 --classes 43 --workdir /tmp/classmatrix-scale

Generates small PNGs of varied sizes (GTSRB's are 15x15 to 250x250, most under 64x64) in a
folder per class, copies the repository's tracked files into a fresh project under --workdir,
adds a `scale` dataset with a `local` source, and measures with the real `dvc repro`:
wall time and peak memory of the whole process tree (sampled every 0.1 s) for
`dvc repro split@scale`, the wall time of a second, no-op `dvc repro split@scale`, and the disk
the raw data takes in the workspace and in DVC's cache (hard links are counted once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from sampling import run_sampled  # noqa: E402


def generate(folder: Path, files: int, classes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(files):
        side = int(rng.integers(25, 70))
        base = rng.integers(0, 255, 3)
        image = np.clip(base + rng.normal(0, 25, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / str(i % classes) / f"{i:06d}.png", compress_level=1)


def make_project(workdir: Path, data: Path, classes: int) -> Path:
    project = workdir / "project"
    shutil.rmtree(project, ignore_errors=True)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (REPO / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["datasets"]["scale"] = {
        "source": {"kind": "local", "path": str(data)},
        "layout": {"kind": "folders"},
        "classes": [str(c) for c in range(classes)],
        "image_size": 32,
        "channels": 3,
        "split": {"val": 0.15, "test": 0.15, "seed": 42},
        "validation": {"min_per_class": 10, "min_side": 8, "max_side": 300},
        "augmentation": {},
        "reference": {},
        "metric": "auto",
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "bench"], cwd=project, check=True)
    return project


def timed(command: list[str], cwd: Path) -> tuple[float, int, str]:
    """Wall seconds, peak RSS of the process tree in bytes, and the output."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    seconds, peak, finished = run_sampled(command, cwd, env)
    output = finished.stdout + finished.stderr
    if finished.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return seconds, peak, output


def disk_bytes(*folders: Path) -> int:
    """Bytes on disk under the folders, each inode counted once (hard links share)."""
    seen, total = set(), 0
    for folder in folders:
        for path in folder.rglob("*"):
            info = path.lstat()
            if path.is_file() and (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=43)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/classmatrix-scale"))
    args = parser.parse_args()
    data = args.workdir / f"source-{args.files}"
    if not data.exists():
        print(f"generating {args.files} PNGs in {data} ...", flush=True)
        generate(data, args.files, args.classes)
    project = make_project(args.workdir, data, args.classes)
    seconds, peak, output = timed(["dvc", "repro", "split@scale"], project)
    noop_seconds, _, noop_output = timed(["dvc", "repro", "split@scale"], project)
    assert "Running stage" not in noop_output, noop_output
    source_disk = disk_bytes(data)
    raw_disk = disk_bytes(project / "data" / "raw" / "scale")
    with_cache = disk_bytes(project / "data" / "raw" / "scale", project / ".dvc" / "cache")
    cache_only = disk_bytes(project / ".dvc" / "cache")
    raw_files = [p for p in (project / "data" / "raw" / "scale").rglob("*") if p.is_file()]
    linked = sum(1 for p in raw_files if p.stat().st_nlink > 1)
    summary = json.loads((project / "reports" / "validation" / "scale" / "summary.json").read_text())
    result = {
        "files": args.files,
        "classes": args.classes,
        "accepted": summary["accepted"],
        "repro_seconds": round(seconds, 1),
        "peak_rss_mib": round(peak / 2**20),
        "noop_repro_seconds": round(noop_seconds, 1),
        "source_mib": round(source_disk / 2**20),
        "raw_workspace_mib": round(raw_disk / 2**20),
        "raw_workspace_plus_cache_mib": round(with_cache / 2**20),
        "cache_all_outputs_mib": round(cache_only / 2**20),
        "raw_files_sharing_an_inode_with_the_cache": f"{linked}/{len(raw_files)}",
        "cache_type": subprocess.run(
            ["dvc", "config", "cache.type"], cwd=project, capture_output=True, text=True,
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        ).stdout.strip() or "(default: reflink,copy)",
        "cores": len(os.sched_getaffinity(0)),
    }
    print(json.dumps(result, indent=2))
    for line in output.splitlines():
        if line.startswith(("fetch@", "validate@", "split@")):
            print(line)


if __name__ == "__main__":
    main()
