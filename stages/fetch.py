"""fetch@<dataset>: obtain a dataset exactly as its source gives it, plus a provenance record.

    python -m stages.fetch --dataset digits --out data/raw/digits --provenance data/raw/digits.provenance.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
from pathlib import Path

from stages.config import load_params
from stages.errors import run_stage
from stages.files import write_json_atomic
from stages.layouts import all_files
from stages.sources import get_source


def fetch(dataset: str, params_path: str, out: Path, provenance: Path) -> dict:
    """Fill `out` from the dataset's source and write the provenance record; return it."""
    config = load_params(params_path).dataset(dataset)
    source = get_source(config.source.kind)
    # Work in a sibling folder and rename at the end, so a killed fetch never looks complete.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        details = source.fetch(config.source.options, partial, dataset)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    files = all_files(out)
    record = {
        "dataset": dataset,
        "source": {"kind": config.source.kind, **dataclasses.asdict(config.source.options)},
        "obtained_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": len(files),
        "bytes": sum((out / f).stat().st_size for f in files),
        "archives": [],
        "refused": [],
        **details,
    }
    write_json_atomic(provenance, record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", type=Path, required=True, help="raw dataset folder to fill")
    parser.add_argument("--provenance", type=Path, required=True, help="provenance JSON to write")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # a keras.datasets source imports TensorFlow
    record = fetch(args.dataset, args.params, args.out, args.provenance)
    refused = f", {len(record['refused'])} entries refused (see {args.provenance})" if record["refused"] else ""
    print(f"fetch@{args.dataset}: {record['files']} files, {record['bytes']:,} bytes in {args.out}{refused}")


if __name__ == "__main__":
    run_stage(main)
