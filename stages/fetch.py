"""fetch@<dataset>: obtain a dataset exactly as its source gives it, plus a provenance record.

    python -m stages.fetch --dataset digits --out data/raw/digits --provenance data/raw/digits.provenance.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

from stages.config import load_params
from stages.errors import run_stage
from stages.files import write_json_atomic
from stages.layouts import all_files
from stages.sources import get_source


def fetch(dataset: str, params_path: str, out: Path, provenance: Path) -> dict:
    """Fill `out` from the dataset's source, write the provenance record and return it; print a
    summary line, with how this run got the data (downloaded or from a cache), which the record
    leaves out.

    The record holds what was obtained and nothing about when or how: fetching the same data
    again writes the same bytes, so DVC sees an unchanged dependency and validate does not rerun
    (after a change to a fetch module, say), and two machines write the same dvc.lock."""
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
    this_run = details.pop("this_run", {})
    record = {
        "dataset": dataset,
        "source": {"kind": config.source.kind, **dataclasses.asdict(config.source.options)},
        "files": len(files),
        "bytes": sum((out / f).stat().st_size for f in files),
        "archives": [],
        "refused": [],
        **details,
    }
    write_json_atomic(provenance, record)
    refused = f", {len(record['refused'])} entries refused (see {provenance})" if record["refused"] else ""
    how = "".join(f"; {key.replace('_', ' ')}: {value}" for key, value in this_run.items())
    print(f"fetch@{dataset}: {record['files']} files, {record['bytes']:,} bytes in {out}{refused}{how}")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", type=Path, required=True, help="raw dataset folder to fill")
    parser.add_argument("--provenance", type=Path, required=True, help="provenance JSON to write")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # a keras.datasets source imports TensorFlow
    fetch(args.dataset, args.params, args.out, args.provenance)


if __name__ == "__main__":
    run_stage(main)
