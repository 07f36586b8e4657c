"""report@<suite>: the suite's leaderboard beside the course's own figures, and each dataset's champion.

    python -m stages.report --suite demo --metrics reports/metrics/demo --out reports/leaderboard/demo

Reads every evaluation of the suite and writes `<out>.md`, `<out>.csv` and `<out>.png` (a
datasets x backbones heatmap of the suite's metric): one row per experiment, grouped by dataset
and ranked by the suite's metric, with our test accuracy and its 95% interval, balanced accuracy,
macro F1, the course's and the published test accuracy and our difference from each, and the
cost (training time and throughput, latency, size).

Then, in the MLflow model registry, it points each dataset's `champion` alias at the best
registered version by the dataset's selection metric (balanced accuracy where the classes are
imbalanced; see `metric:` in params.yaml), among the versions evaluated on the same prepared
data. The alias moves only when a version is strictly better than the current champion.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stages import tracking
from stages.config import Experiment, load_params
from stages.errors import UserError, run_stage
from stages.files import atomic_path, write_text_atomic

CHAMPION = "champion"
COLUMNS = [
    "dataset",
    "backbone",
    "start",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "balanced_accuracy",
    "macro_f1",
    "reference_course",
    "reference_published",
    "vs_course",
    "vs_published",
    "selection_metric",
    "champion",
    "model_version",
    "test_images",
    "epochs_run",
    "train_seconds",
    "train_images_per_second",
    "latency_ms_batch1",
    "latency_measured_on",
    "parameters",
    "size_mb",
]


def start(experiment: Experiment) -> str:
    """What the model started from, for comparing transfer learning with training from scratch:
    "scratch", "imagenet" (the whole base trained), or "imagenet, frozen" (+ its fine-tune epochs)."""
    backbone = experiment.backbone
    if not backbone.weights:
        return "scratch"
    if not backbone.freeze:
        return str(backbone.weights)
    tune = experiment.training.fine_tune.epochs
    return f"{backbone.weights}, frozen" + (f" + {tune} fine-tune epochs" if tune else "")


def leaderboard(records: list[dict], rank_by: str) -> pd.DataFrame:
    table = pd.DataFrame(records)
    for column in COLUMNS:
        if column not in table:
            table[column] = None
    table["vs_course"] = table["accuracy"] - pd.to_numeric(table["reference_course"], errors="coerce")
    table["vs_published"] = table["accuracy"] - pd.to_numeric(table["reference_published"], errors="coerce")
    table = table.sort_values(["dataset", rank_by, "backbone"], ascending=[True, False, True]).reset_index(drop=True)
    return table[COLUMNS]


def to_markdown(table: pd.DataFrame, suite: str, description: str, rank_by: str) -> str:
    def percent(value: object) -> str:
        return "" if value is None or pd.isna(value) else f"{100 * float(value):.2f}%"

    def signed(value: object) -> str:
        return "" if value is None or pd.isna(value) else f"{100 * float(value):+.2f} pts"

    def interval(low: object, high: object) -> str:
        return "" if low is None or pd.isna(low) else f"{100 * float(low):.1f}-{100 * float(high):.1f}"

    def number(value: object, spec: str) -> str:
        return "" if value is None or pd.isna(value) else format(value, spec)

    timed_on = sorted({str(value) for value in table["latency_measured_on"] if value is not None and not pd.isna(value)})
    lines = [
        f"# Leaderboard: {suite}",
        "",
        *([description, ""] if description else []),
        f"Test-set results, best {rank_by.replace('_', ' ')} first within each dataset. The interval is "
        "the 95% Wilson interval of our accuracy: a small test split gives a wide one. Course and "
        "published figures are test accuracy as reported (empty where unknown); the differences are "
        f"ours minus theirs. The champion is the registry's `{CHAMPION}` version for the dataset, chosen "
        "by the dataset's selection metric. ms/image is the latency at batch 1"
        + (f", timed with {' and '.join(timed_on)}" if timed_on else "")
        + (": compare it only between rows timed with the same (each such row names its own)." if len(timed_on) > 1 else "."),
        "",
        "| dataset | backbone | start | accuracy | 95% interval | balanced acc. | macro F1 | course | published "
        "| vs course | vs published | champion | test images | epochs | train s | train img/s | ms/image | parameters | MB |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|:-:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in table.itertuples(index=False):
        champion = f"yes (v{row.model_version}, by {row.selection_metric.replace('_', ' ')})" if row.champion else ""
        latency = number(row.latency_ms_batch1, ".2f")
        if len(timed_on) > 1 and isinstance(row.latency_measured_on, str):
            latency += f" ({row.latency_measured_on})"
        lines.append(
            f"| {row.dataset} | {row.backbone} | {'' if row.start is None or pd.isna(row.start) else row.start} | "
            f"{percent(row.accuracy)} | "
            f"{interval(row.accuracy_ci_low, row.accuracy_ci_high)} | {percent(row.balanced_accuracy)} | "
            f"{percent(row.macro_f1)} | {percent(row.reference_course)} | {percent(row.reference_published)} | "
            f"{signed(row.vs_course)} | {signed(row.vs_published)} | {champion} | {row.test_images} | "
            f"{row.epochs_run} | {number(row.train_seconds, '.1f')} | {number(row.train_images_per_second, ',.0f')} | "
            f"{latency} | {number(row.parameters, ',')} | {number(row.size_mb, '.1f')} |"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Candidate:
    version: int
    score: float
    data_version: str
    experiment: str = ""


def _candidate(version: object, metric: str) -> Candidate | None:
    tags = version.tags  # type: ignore[attr-defined]
    try:
        score = float(tags[f"test_{metric}"])
    except (KeyError, ValueError):
        return None
    return Candidate(
        int(version.version), score, tags.get("data_version", ""), tags.get("experiment", "")  # type: ignore[attr-defined]
    )


def choose_champion(current: Candidate | None, candidates: list[Candidate], data_version: str) -> Candidate | None:
    """The version that should hold the alias: the best candidate evaluated on `data_version`
    (of equals, the newest), if it beats the current champion or that one was scored on other
    data; else the current champion."""
    comparable = [c for c in candidates if c.data_version == data_version]
    if not comparable:
        return current
    best = max(comparable, key=lambda c: (c.score, c.version))
    if current is None or current.data_version != data_version or best.score > current.score:
        return best
    return current


def _live_runs(client: object, run_ids: set[str]) -> set[str]:
    """The runs of `run_ids` that are neither deleted nor purged."""
    from mlflow.exceptions import MlflowException

    live = set()
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)  # type: ignore[attr-defined]
        except MlflowException as error:
            if not tracking.is_gone(error):  # a server that did not answer is no purged run
                raise
            continue  # purged: the run is gone
        if run.info.lifecycle_stage != "deleted":
            live.add(run_id)
    return live


def update_champions(table: pd.DataFrame) -> dict[str, tuple[str, Candidate]]:
    """Move each dataset's `champion` alias where a better version exists; returns dataset ->
    (selection metric, the champion)."""
    from mlflow.exceptions import MlflowException

    client = tracking.mlflow_client().tracking.MlflowClient()
    champions: dict[str, tuple[str, Candidate]] = {}
    for dataset, rows in table.groupby("dataset", sort=True):
        metrics = set(rows["selection_metric"])
        if len(metrics) != 1:
            raise UserError(
                f"report: the experiments on {dataset} were evaluated with different selection metrics "
                f"{sorted(metrics)}; re-run their evaluate stages (dvc repro)"
            )
        metric = metrics.pop()
        versions = client.search_model_versions(f"name = '{dataset}'")
        by_number = {int(v.version): v for v in versions}
        missing = sorted(int(n) for n in rows["model_version"] if int(n) not in by_number)
        if missing:
            lost = rows[rows["model_version"].astype(int).isin(missing)]
            which = f" ({dataset} with {', '.join(sorted(lost['backbone']))})" if "backbone" in lost else ""
            raise UserError(
                f"report: the registered versions {missing} of {dataset} are missing from {tracking.shown_uri()} "
                "(a cleared store, or outputs DVC brought back from its run cache without running a stage); point "
                "MLFLOW_TRACKING_URI at the store that has them, or train and evaluate again there: "
                f"dvc repro --force --downstream train@<experiment> ..., naming the train stage of each{which}"
            )
        # Metrics files are kept in git and name a version by number, which means something only in the
        # store that evaluated them: in another (a cleared mlflow.db, another server) it can be another
        # experiment's version.
        if "backbone" in rows:
            strays = [
                (int(n), f"{dataset}-{backbone}", by_number[int(n)].tags.get("experiment", ""))
                for n, backbone in zip(rows["model_version"], rows["backbone"])
                if by_number[int(n)].tags.get("experiment", f"{dataset}-{backbone}") != f"{dataset}-{backbone}"
            ]
            if strays:
                raise UserError(
                    "report: "
                    + "; ".join(f"the metrics of {mine} name version {n} of {dataset}, which {tracking.shown_uri()} "
                                f"holds for {theirs}" for n, mine, theirs in strays)
                    + " (metrics from another tracking store); point MLFLOW_TRACKING_URI at the store that evaluated "
                    "them, or train and evaluate again there: dvc repro --force --downstream "
                    + " ".join(f"train@{mine}" for _, mine, _ in strays)
                )
        # The data the suite's evaluations saw: the data_version tag of their registered versions.
        data_versions = {by_number[int(n)].tags.get("data_version", "") for n in rows["model_version"]}
        if len(data_versions) != 1:
            raise UserError(
                f"report: the registered versions {sorted(rows['model_version'])} of {dataset} were evaluated on "
                f"different data {sorted(data_versions)}; re-run their evaluate stages (dvc repro --force)"
            )
        data_version = data_versions.pop()
        # A version whose run was deleted (a retrain with the same params, data and code replaces its
        # run) is no candidate, and gives up the alias: once `mlflow gc` purges the run, its files
        # are gone and predict could not load it.
        live = _live_runs(client, {v.run_id for v in versions if v.run_id})
        alive = [v for v in versions if not v.run_id or v.run_id in live]
        candidates = [c for c in (_candidate(v, metric) for v in alive) if c is not None]
        replaced = "first"  # what the alias leaves, for the line that says it moved
        deleted = False
        try:
            holder = client.get_model_version_by_alias(dataset, CHAMPION)
            current = _candidate(holder, metric) if not holder.run_id or holder.run_id in live else None
            if current is None:
                deleted = bool(holder.run_id and holder.run_id not in live)
                why = "whose run was deleted" if deleted else f"which has no test_{metric} tag"
                replaced = f"from version {holder.version}, {why}"
        except MlflowException as error:
            if tracking.is_unreachable(error):
                raise
            current = None
        chosen = choose_champion(current, candidates, data_version)
        if chosen is None:
            if deleted:  # no version to move it to, and predict must not load one `mlflow gc` removes
                client.delete_registered_model_alias(dataset, CHAMPION)
                print(f"report: {dataset}@{CHAMPION} removed from version {holder.version}, whose run was deleted; "
                      f"no other version of {dataset} can take it (train and evaluate one again: dvc repro)")
            continue
        if current is None or chosen.version != current.version:
            client.set_registered_model_alias(dataset, CHAMPION, str(chosen.version))
            before = f"from version {current.version} ({current.score:.4f})" if current else replaced
            print(f"report: {dataset}@{CHAMPION} -> version {chosen.version} ({metric} {chosen.score:.4f}; {before})")
        champions[str(dataset)] = (metric, chosen)
    return champions


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
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:  # a merge left conflict markers in it (it is kept in git)
            raise UserError(f"report@{suite}: {path} is not readable JSON ({error}); re-run evaluate@{name}") from None
        if not isinstance(record, dict) or "model_version" not in record or "selection_metric" not in record:
            raise UserError(f"report@{suite}: {path} has no registered model version; re-run evaluate@{name}")
        records.append({"dataset": spec.dataset, "backbone": spec.backbone, "start": start(params.experiment(name)), **record})
    if not records:
        raise UserError(f"report@{suite}: the suite has no experiments; add some under experiments: in {params_path}")
    # An experiment removed from params.yaml (or renamed, or moved to another suite) leaves its
    # metrics file here: DVC forgets the stage, not the file, and `dvc metrics show` on the folder
    # would list it beside the members as if current.
    written = {metrics_dir / params.experiments[name].dataset / f"{params.experiments[name].backbone}.json"
               for name in members}
    for path in sorted(set(metrics_dir.rglob("*.json")) - written):
        print(f"report@{suite}: {path} belongs to no experiment of the suite (one removed, renamed or moved to "
              "another suite left it; the leaderboard leaves it out); delete it (git rm) and the experiment's other "
              "outputs (README: Adding a dataset with YAML alone)", file=sys.stderr)
    table = leaderboard(records, config.rank_by)
    table["champion"] = False

    from stages import figures

    def write(table: pd.DataFrame, notes: list[str] | None = None) -> None:
        with atomic_path(out.with_suffix(".csv")) as temporary:
            table.to_csv(temporary, index=False)
        markdown = to_markdown(table, suite, config.description, config.rank_by)
        write_text_atomic(out.with_suffix(".md"), markdown + ("\n" + "\n".join(notes) + "\n" if notes else ""))

    # The leaderboard is written before the registry is asked, so it exists even if the server is away.
    write(table)
    figures.heatmap_figure(
        table, config.rank_by, out.with_suffix(".png"), f"{suite}: test {config.rank_by.replace('_', ' ')}"
    )
    consequence = f"the leaderboard is written ({out}.md); run the stage again when the server answers"
    with tracking.unavailable(f"set the {CHAMPION} aliases", consequence):
        champions = update_champions(table)
    held = {dataset: champion.version for dataset, (_, champion) in champions.items()}
    table["champion"] = [held.get(d) == int(v) for d, v in zip(table["dataset"], table["model_version"])]
    # Of rows tied on the rank metric, the champion first: its tie-break (the newest version, or the
    # one already holding the alias) is not the leaderboard's (backbone name).
    table = table.sort_values(
        ["dataset", config.rank_by, "champion", "backbone"], ascending=[True, False, False, True], kind="stable"
    ).reset_index(drop=True)
    # A champion that none of today's rows beat: from an earlier evaluation (other params, say), or
    # from another suite's experiment on the same dataset (the registered model is the dataset's).
    def registered_by(experiment: str) -> str:
        spec = params.experiments.get(experiment)
        if spec is not None and spec.suite != suite:
            return f"evaluate@{experiment} of suite {spec.suite}"
        return "an earlier evaluation"

    elsewhere = [
        f"- {dataset}: the champion is version {champion.version} ({champion.experiment or 'unknown experiment'}, "
        f"{metric.replace('_', ' ')} {100 * champion.score:.2f}%), registered by {registered_by(champion.experiment)}; "
        "none of the rows above beats it."
        for dataset, (metric, champion) in sorted(champions.items())
        if not table.loc[table["dataset"] == dataset, "champion"].any()
    ]
    write(table, elsewhere)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="the suite's metrics folder")
    parser.add_argument("--out", type=Path, required=True, help="leaderboard path without suffix")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    table = report(args.suite, args.params, args.metrics, args.out)
    print(
        f"report@{args.suite}: {len(table)} experiment{'' if len(table) == 1 else 's'} in {args.out}.md, .csv and .png; "
        + summary(table, load_params(args.params).suites[args.suite].rank_by)
    )


def summary(table: pd.DataFrame, rank_by: str) -> str:
    """Each dataset's first row, by the suite's `rank_by` (the leaderboard ranks within a dataset,
    never across datasets, so there is no one best row)."""
    metric = f"test {rank_by.replace('_', ' ')}"
    firsts = table.groupby("dataset", sort=True).head(1)
    rows = ", ".join(
        f"{row['dataset']} x {row['backbone']} at {100 * row[rank_by]:.2f}%" for _, row in firsts.iterrows()
    )
    return f"first by {metric}: {rows}"


if __name__ == "__main__":
    run_stage(main)
