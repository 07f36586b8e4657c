"""report@<suite>: the suite's leaderboard, beside the course's own figures.

    python -m stages.report --suite demo --metrics reports/metrics/demo --out reports/leaderboard/demo

Reads every evaluation of the suite and writes `<out>.md` and `<out>.csv`: one row per experiment,
grouped by dataset and ranked by the suite's metric, with the course's and the published test
accuracy beside ours and the difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from stages.config import load_params
from stages.errors import UserError, run_stage
from stages.files import atomic_path, write_text_atomic

COLUMNS = [
    "dataset",
    "backbone",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "reference_course",
    "reference_published",
    "vs_course",
    "test_images",
    "epochs_run",
    "train_seconds",
    "parameters",
]


def leaderboard(records: list[dict], rank_by: str) -> pd.DataFrame:
    table = pd.DataFrame(records)
    table["vs_course"] = table["accuracy"] - pd.to_numeric(table["reference_course"], errors="coerce")
    table = table.sort_values(["dataset", rank_by], ascending=[True, False]).reset_index(drop=True)
    return table[COLUMNS]


def to_markdown(table: pd.DataFrame, suite: str, description: str, rank_by: str) -> str:
    def percent(value: object) -> str:
        return "" if value is None or pd.isna(value) else f"{100 * float(value):.2f}%"

    def signed(value: object) -> str:
        return "" if value is None or pd.isna(value) else f"{100 * float(value):+.2f} pts"

    lines = [
        f"# Leaderboard: {suite}",
        "",
        *([description, ""] if description else []),
        f"Test-set results, best {rank_by.replace('_', ' ')} first within each dataset. "
        "Course and published figures are test accuracy as reported (empty where unknown).",
        "",
        "| dataset | backbone | accuracy | balanced acc. | macro F1 | course | published | vs course | test images | epochs | train s | parameters |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in table.itertuples(index=False):
        lines.append(
            f"| {row.dataset} | {row.backbone} | {percent(row.accuracy)} | {percent(row.balanced_accuracy)} | "
            f"{percent(row.macro_f1)} | {percent(row.reference_course)} | {percent(row.reference_published)} | "
            f"{signed(row.vs_course)} | {row.test_images} | {row.epochs_run} | {row.train_seconds:.1f} | "
            f"{row.parameters:,} |"
        )
    return "\n".join(lines) + "\n"


def report(suite: str, params_path: str, metrics_dir: Path, out: Path) -> pd.DataFrame:
    params = load_params(params_path)
    members = params.suite_experiments(suite)
    config = params.suites[suite]
    records = []
    for name in members:
        spec = params.experiments[name]
        path = metrics_dir / spec.dataset / f"{spec.backbone}.json"
        if not path.exists():
            raise UserError(f"report@{suite}: {path} is missing; run evaluate@{name} (dvc repro report@{suite})")
        records.append({"dataset": spec.dataset, "backbone": spec.backbone, **json.loads(path.read_text(encoding="utf-8"))})
    if not records:
        raise UserError(f"report@{suite}: the suite has no experiments; add some under experiments: in {params_path}")
    table = leaderboard(records, config.rank_by)
    with atomic_path(out.with_suffix(".csv")) as temporary:
        table.to_csv(temporary, index=False)
    write_text_atomic(out.with_suffix(".md"), to_markdown(table, suite, config.description, config.rank_by))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="the suite's metrics folder")
    parser.add_argument("--out", type=Path, required=True, help="leaderboard path without suffix")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    table = report(args.suite, args.params, args.metrics, args.out)
    best = table.iloc[0]
    print(
        f"report@{args.suite}: {len(table)} experiments in {args.out}.md and .csv; "
        f"first: {best['dataset']} x {best['backbone']} at {100 * best['accuracy']:.2f}% test accuracy"
    )


if __name__ == "__main__":
    run_stage(main)
