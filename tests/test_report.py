"""The report stage: the leaderboard's table and markdown, and the registry's `champion` alias.

The champion tests run against a real MLflow registry in a temporary SQLite file; the registered
versions carry the tags evaluate gives them (test scores as "0.950000" strings, data_version,
experiment), with no model behind them, since the report only reads the tags.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from stages import report as report_stage
from stages.config import load_params
from stages.errors import UserError
from stages.report import CHAMPION, Candidate, choose_champion, leaderboard, to_markdown, update_champions

pytest_plugins = ["mlflow_registry"]

ROOT = Path(__file__).resolve().parents[1]
DATA = "data-1"


# --------------------------------------------------------------------------------------------
# choose_champion: which version should hold the alias.


def test_first_champion_is_the_best_candidate() -> None:
    """With no champion yet, the best candidate on the current data takes the alias."""
    candidates = [Candidate(1, 0.90, DATA), Candidate(2, 0.97, DATA), Candidate(3, 0.95, DATA)]
    assert choose_champion(None, candidates, DATA) == Candidate(2, 0.97, DATA)


def test_ties_between_candidates_go_to_the_newest_version() -> None:
    """Of candidates with the same score, the highest version number wins, whatever their order."""
    candidates = [
        Candidate(4, 0.95, DATA), Candidate(7, 0.95, DATA), Candidate(5, 0.95, DATA), Candidate(6, 0.90, DATA)
    ]
    assert choose_champion(None, candidates, DATA).version == 7  # type: ignore[union-attr]


def test_alias_moves_only_for_a_strictly_better_candidate() -> None:
    """A better candidate replaces the champion; an equal (even newer) or worse one does not."""
    current = Candidate(2, 0.95, DATA)
    assert choose_champion(current, [current, Candidate(3, 0.96, DATA)], DATA) == Candidate(3, 0.96, DATA)
    assert choose_champion(current, [current, Candidate(3, 0.95, DATA)], DATA) is current
    assert choose_champion(current, [current, Candidate(3, 0.94, DATA)], DATA) is current


def test_champion_scored_on_other_data_is_replaced_by_best_on_current_data() -> None:
    """Scores on different data are not comparable: the best on today's data wins even if lower."""
    current = Candidate(1, 0.99, "data-0")
    candidates = [current, Candidate(2, 0.80, DATA), Candidate(3, 0.85, DATA)]
    assert choose_champion(current, candidates, DATA) == Candidate(3, 0.85, DATA)


def test_candidates_on_other_data_are_ignored() -> None:
    """A high score on other data neither becomes champion nor blocks the best on current data."""
    candidates = [Candidate(5, 0.99, "data-0"), Candidate(2, 0.90, DATA)]
    assert choose_champion(None, candidates, DATA) == Candidate(2, 0.90, DATA)
    current = Candidate(2, 0.90, DATA)
    assert choose_champion(current, [current, Candidate(6, 0.999, "data-2")], DATA) is current


def test_no_comparable_candidates_keeps_the_current_champion_or_none() -> None:
    """Without a candidate on the current data nothing changes: the champion stays, or there is none."""
    current = Candidate(1, 0.90, "data-0")
    assert choose_champion(current, [Candidate(2, 0.95, "data-0")], DATA) is current
    assert choose_champion(None, [Candidate(2, 0.95, "data-0")], DATA) is None
    assert choose_champion(None, [], DATA) is None


# --------------------------------------------------------------------------------------------
# update_champions: the alias in a real (SQLite) MLflow registry.


@pytest.fixture()
def registry(registry: MlflowClient) -> MlflowClient:
    """mlflow_registry's fresh registry, holding the registered model `digits`."""
    registry.create_registered_model("digits")
    return registry


def register(
    client: MlflowClient,
    accuracy: float,
    balanced_accuracy: float | None = None,
    data_version: str = DATA,
    experiment: str = "digits-small_cnn",
    run_id: str | None = None,
) -> int:
    """A new version of `digits` tagged the way evaluate tags one; returns its number."""
    balanced = accuracy if balanced_accuracy is None else balanced_accuracy
    tags = {
        "test_accuracy": f"{accuracy:.6f}",
        "test_balanced_accuracy": f"{balanced:.6f}",
        "test_macro_f1": f"{balanced:.6f}",
        "data_version": data_version,
        "experiment": experiment,
    }
    source = Path(client.tracking_uri.removeprefix("sqlite:///")).parent / "m"
    version = client.create_model_version("digits", source=str(source), run_id=run_id, tags=tags)
    return int(version.version)


def table(versions: list[int], metric: str = "accuracy", dataset: str = "digits") -> pd.DataFrame:
    """The columns of the leaderboard that update_champions reads."""
    return pd.DataFrame({"dataset": dataset, "selection_metric": metric, "model_version": versions})


def champion(client: MlflowClient) -> int:
    return int(client.get_model_version_by_alias("digits", CHAMPION).version)


def test_first_report_points_champion_at_the_best_version(
    registry: MlflowClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first call sets `digits@champion` to the best version and says so."""
    versions = [register(registry, 0.95), register(registry, 0.97), register(registry, 0.96)]
    champions = update_champions(table(versions))
    assert champion(registry) == 2
    metric, chosen = champions["digits"]
    assert metric == "accuracy" and chosen == Candidate(2, 0.97, DATA, "digits-small_cnn")
    assert "report: digits@champion -> version 2 (accuracy 0.9700; first)" in capsys.readouterr().out


def test_alias_moves_to_a_better_version_and_not_to_a_worse_one(
    registry: MlflowClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """A later, better version takes the alias; a later, worse one leaves it where it is."""
    update_champions(table([register(registry, 0.95)]))
    assert champion(registry) == 1

    better = register(registry, 0.98)
    capsys.readouterr()
    update_champions(table([better]))
    assert champion(registry) == better == 2
    assert "-> version 2 (accuracy 0.9800; from version 1 (0.9500))" in capsys.readouterr().out

    worse = register(registry, 0.90)
    champions = update_champions(table([worse]))
    assert champion(registry) == 2
    assert champions["digits"][1].version == 2
    assert "->" not in capsys.readouterr().out


def test_equal_score_keeps_the_current_champion(registry: MlflowClient) -> None:
    """A newer version that only matches the champion's score does not take the alias."""
    update_champions(table([register(registry, 0.95)]))
    update_champions(table([register(registry, 0.95)]))
    assert champion(registry) == 1


def test_a_version_whose_run_was_deleted_gives_up_the_alias(registry: MlflowClient) -> None:
    """A forced retrain with the same params and data deletes the old run and registers the new
    model, which only ties the old one's score: the alias leaves the version of the deleted run
    (its files go with the run at `mlflow gc`), and such a version is never chosen."""
    experiment = registry.create_experiment("digits")
    old_run = registry.create_run(experiment).info.run_id
    update_champions(table([register(registry, 0.95, run_id=old_run)]))
    assert champion(registry) == 1

    registry.delete_run(old_run)
    new_run = registry.create_run(experiment).info.run_id
    retrained = register(registry, 0.95, run_id=new_run)
    metric, chosen = update_champions(table([retrained]))["digits"]
    assert champion(registry) == retrained == 2 and chosen.version == 2

    # A better version whose run is deleted is not chosen either.
    gone = registry.create_run(experiment).info.run_id
    register(registry, 0.99, run_id=gone)
    registry.delete_run(gone)
    update_champions(table([retrained]))
    assert champion(registry) == 2


def test_selection_metric_column_decides_the_champion(registry: MlflowClient) -> None:
    """The same versions give different champions by accuracy and by balanced accuracy."""
    high_accuracy = register(registry, accuracy=0.95, balanced_accuracy=0.80)
    high_balanced = register(registry, accuracy=0.93, balanced_accuracy=0.90)
    versions = [high_accuracy, high_balanced]

    update_champions(table(versions, "accuracy"))
    assert champion(registry) == high_accuracy
    metric, chosen = update_champions(table(versions, "balanced_accuracy"))["digits"]
    assert metric == "balanced_accuracy"
    assert champion(registry) == chosen.version == high_balanced
    assert chosen.score == pytest.approx(0.90)


def test_champion_on_other_data_is_replaced(registry: MlflowClient) -> None:
    """A champion scored on earlier data gives way to the best version on the table's data."""
    old = register(registry, 0.99, data_version="data-0")
    update_champions(table([old]))
    assert champion(registry) == old
    new = [register(registry, 0.85), register(registry, 0.88)]
    update_champions(table(new))
    assert champion(registry) == new[1]


def test_mixed_selection_metrics_within_a_dataset_are_a_user_error(registry: MlflowClient) -> None:
    """Rows of one dataset evaluated with different selection metrics cannot be compared."""
    versions = [register(registry, 0.95), register(registry, 0.96)]
    rows = pd.DataFrame(
        {"dataset": "digits", "selection_metric": ["accuracy", "balanced_accuracy"], "model_version": versions}
    )
    with pytest.raises(UserError, match=r"different selection metrics \['accuracy', 'balanced_accuracy'\]"):
        update_champions(rows)
    with pytest.raises(Exception, match="alias"):
        registry.get_model_version_by_alias("digits", CHAMPION)


def test_version_missing_from_the_registry_is_a_user_error(registry: MlflowClient) -> None:
    """A row naming a version the registry does not hold (another tracking URI, say) fails clearly."""
    register(registry, 0.95)
    with pytest.raises(UserError, match=r"registered versions \[7\] of digits are missing from sqlite:///") as error:
        update_champions(table([7]).assign(backbone="small_cnn"))
    assert str(error.value).endswith(
        "dvc repro --force --downstream train@<experiment> ..., naming the train stage of each (digits with small_cnn)"
    )


def test_versions_evaluated_on_different_data_are_a_user_error(registry: MlflowClient) -> None:
    """Rows whose versions saw different prepared data have no one data version to compare on."""
    versions = [register(registry, 0.95, data_version="data-0"), register(registry, 0.96)]
    with pytest.raises(UserError, match="evaluated on different data"):
        update_champions(table(versions))


# --------------------------------------------------------------------------------------------
# leaderboard and to_markdown.


def record(dataset: str, backbone: str, accuracy: float, **extra: object) -> dict[str, object]:
    """A metrics record as evaluate writes it (the fields the leaderboard shows)."""
    return {
        "dataset": dataset,
        "backbone": backbone,
        "start": "scratch",
        "accuracy": accuracy,
        "accuracy_ci_low": accuracy - 0.025,
        "accuracy_ci_high": accuracy + 0.0125,
        "balanced_accuracy": accuracy - 0.01,
        "macro_f1": accuracy - 0.005,
        "reference_course": None,
        "reference_published": 0.98,
        "selection_metric": "accuracy",
        "model_version": 1,
        "test_images": 291,
        "epochs_run": 20,
        "train_seconds": 19.98,
        "train_images_per_second": 1420.5,
        "latency_ms_batch1": 2.4203,
        "latency_measured_on": "tensorflow on cpu",
        "parameters": 197482,
        "size_mb": 2.455,
        **extra,
    }


def markdown_rows(markdown: str) -> list[dict[str, str]]:
    """The leaderboard's table as one {header: cell} dict per row."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_leaderboard_sorts_by_dataset_then_rank_metric_descending() -> None:
    """Datasets alphabetically, best first within each by the suite's rank metric."""
    records = [
        record("digits", "mobilenetv2", 0.914, balanced_accuracy=0.95),
        record("digits", "small_cnn", 0.976, balanced_accuracy=0.90),
        record("cifar10", "vgg16", 0.80),
        record("cifar10", "cifar10_cnn", 0.85),
    ]
    by_accuracy = leaderboard(records, "accuracy")
    assert list(zip(by_accuracy["dataset"], by_accuracy["backbone"])) == [
        ("cifar10", "cifar10_cnn"), ("cifar10", "vgg16"), ("digits", "small_cnn"), ("digits", "mobilenetv2"),
    ]
    by_balanced = leaderboard(records, "balanced_accuracy")
    assert list(by_balanced.loc[by_balanced["dataset"] == "digits", "backbone"]) == ["mobilenetv2", "small_cnn"]
    assert list(by_accuracy.columns) == report_stage.COLUMNS
    assert by_accuracy["vs_published"].iloc[0] == pytest.approx(0.85 - 0.98)
    assert by_accuracy["vs_course"].isna().all()


def test_markdown_formats_interval_differences_and_champion() -> None:
    """Interval as "95.1-98.8", differences in signed points, the champion's version and metric,
    and an empty course figure where there is none."""
    records = [
        record("digits", "small_cnn", 0.975945, accuracy_ci_low=0.951188, accuracy_ci_high=0.9883, model_version=2),
        record("digits", "mobilenetv2", 0.914089, model_version=3, start="imagenet, frozen + 5 fine-tune epochs"),
        record("cifar10", "cifar10_cnn", 0.85, reference_course=0.80, reference_published=None, model_version=4,
               selection_metric="balanced_accuracy"),
    ]
    board = leaderboard(records, "accuracy")
    board["champion"] = [backbone in ("small_cnn", "cifar10_cnn") for backbone in board["backbone"]]
    markdown = to_markdown(board, "demo", "The embedded demo.", "accuracy")

    assert markdown.startswith("# Leaderboard: demo\n\nThe embedded demo.\n")
    assert "best accuracy first within each dataset" in markdown
    rows = markdown_rows(markdown)
    assert [(row["dataset"], row["backbone"]) for row in rows] == [
        ("cifar10", "cifar10_cnn"), ("digits", "small_cnn"), ("digits", "mobilenetv2"),
    ]
    cifar, small, mobile = rows
    assert small["accuracy"] == "97.59%"
    assert small["95% interval"] == "95.1-98.8"
    assert small["published"] == "98.00%"
    assert small["vs published"] == "-0.41 pts"
    assert small["course"] == "" and small["vs course"] == ""
    assert small["champion"] == "yes (v2, by accuracy)"
    assert mobile["champion"] == ""
    assert cifar["course"] == "80.00%" and cifar["vs course"] == "+5.00 pts"
    assert cifar["published"] == "" and cifar["vs published"] == ""
    assert cifar["champion"] == "yes (v4, by balanced accuracy)"
    assert small["train img/s"] == "1,420" and small["parameters"] == "197,482" and small["MB"] == "2.5"
    assert small["ms/image"] == "2.42" and small["train s"] == "20.0" and small["test images"] == "291"
    assert small["start"] == "scratch" and mobile["start"] == "imagenet, frozen + 5 fine-tune epochs"


def test_start_says_what_each_course_model_started_from() -> None:
    params = load_params(ROOT / "params.yaml")
    assert report_stage.start(params.experiment("birds-mobilenetv2")) == "imagenet, frozen + 10 fine-tune epochs"
    assert report_stage.start(params.experiment("cifar10-cifar10_cnn")) == "scratch"
    assert report_stage.start(params.experiment("digits-mobilenetv2")) == "scratch"


def test_markdown_says_where_latency_was_timed_and_warns_when_rows_differ() -> None:
    one = to_markdown(leaderboard([record("digits", "small_cnn", 0.97)], "accuracy"), "demo", "", "accuracy")
    assert "ms/image is the latency at batch 1, timed with tensorflow on cpu." in one
    mixed = [
        record("digits", "small_cnn", 0.97),
        record("digits", "mobilenetv2", 0.91, latency_measured_on="jax on NVIDIA H100 80GB HBM3"),
    ]
    markdown = to_markdown(leaderboard(mixed, "accuracy"), "demo", "", "accuracy")
    assert ("timed with jax on NVIDIA H100 80GB HBM3 and tensorflow on cpu: compare it only between rows timed "
            "with the same (each such row names its own).") in markdown
    # Each row's cell says where it was timed, once the rows differ.
    assert "| 2.42 (tensorflow on cpu) |" in markdown and "| 2.42 (jax on NVIDIA H100 80GB HBM3) |" in markdown
    assert "| 2.42 |" in one
    # A metrics file from before the field was recorded names no backend.
    older = record("digits", "small_cnn", 0.97)
    del older["latency_measured_on"]
    assert "ms/image is the latency at batch 1.\n" in to_markdown(leaderboard([older], "accuracy"), "demo", "", "accuracy")


# --------------------------------------------------------------------------------------------
# report(): the stage end to end on the demo suite.


def write_metrics(folder: Path, backbone: str, accuracy: float, version: int) -> None:
    """The metrics JSON evaluate@digits-<backbone> leaves, naming its registered version."""
    metrics = {
        key: value for key, value in record("digits", backbone, accuracy, model_version=version).items()
        if key not in ("dataset", "backbone")
    }
    metrics.update({"selection_score": accuracy, "weighted_f1": accuracy, "latency_ms_batch64": 0.14})
    path = folder / "digits" / f"{backbone}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics), encoding="utf-8")


@pytest.fixture()
def suite(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of params.yaml, the demo suite's metrics folder and the leaderboard path."""
    params = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", params)
    return params, tmp_path / "metrics", tmp_path / "leaderboard" / "demo"


def test_report_writes_leaderboard_and_marks_the_champion(
    registry: MlflowClient, suite: tuple[Path, Path, Path]
) -> None:
    """The demo suite gives .md, .csv and .png, with the best row marked as the new champion."""
    params, metrics, out = suite
    small = register(registry, 0.975945, experiment="digits-small_cnn")
    mobile = register(registry, 0.914089, experiment="digits-mobilenetv2")
    write_metrics(metrics, "small_cnn", 0.975945, small)
    write_metrics(metrics, "mobilenetv2", 0.914089, mobile)

    board = report_stage.report("demo", str(params), metrics, out)

    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(out.with_suffix(".csv"))
    assert list(csv["backbone"]) == ["small_cnn", "mobilenetv2"]
    assert list(csv["champion"]) == [True, False]
    assert list(csv["start"]) == ["scratch", "scratch"]  # the demo's MobileNetV2 trains from scratch
    assert list(board["champion"]) == [True, False]
    markdown = out.with_suffix(".md").read_text(encoding="utf-8")
    assert f"yes (v{small}, by accuracy)" in markdown
    assert "registered by an earlier evaluation" not in markdown
    assert champion(registry) == small


def test_report_notes_an_earlier_better_champion(registry: MlflowClient, suite: tuple[Path, Path, Path]) -> None:
    """When an earlier, better version on the same data holds the alias, no row is champion and
    the markdown says which version is."""
    params, metrics, out = suite
    earlier = register(registry, 0.99, experiment="digits-small_cnn")
    registry.set_registered_model_alias("digits", CHAMPION, str(earlier))
    small = register(registry, 0.975945, experiment="digits-small_cnn")
    mobile = register(registry, 0.914089, experiment="digits-mobilenetv2")
    write_metrics(metrics, "small_cnn", 0.975945, small)
    write_metrics(metrics, "mobilenetv2", 0.914089, mobile)

    report_stage.report("demo", str(params), metrics, out)

    assert champion(registry) == earlier
    assert not pd.read_csv(out.with_suffix(".csv"))["champion"].any()
    markdown = out.with_suffix(".md").read_text(encoding="utf-8")
    assert (
        f"- digits: the champion is version {earlier} (digits-small_cnn, accuracy 99.00%), registered by an "
        "earlier evaluation; none of the rows above beats it."
    ) in markdown
    assert "yes (v" not in markdown


def test_report_without_a_metrics_file_names_the_missing_file(suite: tuple[Path, Path, Path]) -> None:
    """A suite member with no evaluation fails with the file to make and the stage that makes it."""
    params, metrics, out = suite
    write_metrics(metrics, "small_cnn", 0.97, 1)
    with pytest.raises(UserError, match=r"mobilenetv2\.json is missing; run evaluate@digits-mobilenetv2"):
        report_stage.report("demo", str(params), metrics, out)
    assert not out.with_suffix(".md").exists()


def test_report_names_metrics_files_no_experiment_of_the_suite_writes(
    registry: MlflowClient, suite: tuple[Path, Path, Path], capsys: pytest.CaptureFixture
) -> None:
    """An experiment removed from params.yaml (or renamed, or moved to another suite) leaves its
    metrics file in the suite's folder: DVC forgets the stage but not the file, and the README's
    `dvc metrics show reports/metrics/demo` listed it beside the members as if current. The
    leaderboard leaves it out, and the report names it with what to do."""
    params, metrics, out = suite
    small = register(registry, 0.975945, experiment="digits-small_cnn")
    mobile = register(registry, 0.914089, experiment="digits-mobilenetv2")
    write_metrics(metrics, "small_cnn", 0.975945, small)
    write_metrics(metrics, "mobilenetv2", 0.914089, mobile)
    write_metrics(metrics, "vgg16", 0.99, register(registry, 0.99, experiment="digits-vgg16"))

    board = report_stage.report("demo", str(params), metrics, out)

    assert list(board["backbone"]) == ["small_cnn", "mobilenetv2"]
    err = capsys.readouterr().err
    stale = metrics / "digits" / "vgg16.json"
    assert f"report@demo: {stale} belongs to no experiment of the suite" in err
    assert "delete it" in err and "small_cnn.json" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# report: a suite member's metrics file that cannot be read.


def test_report_names_an_unreadable_metrics_file(suite: tuple[Path, Path, Path]) -> None:
    """reports/metrics/*.json are DVC metrics kept in git: a merge conflict leaves markers in one.
    The report names the file and the evaluate to re-run (before: a bare JSONDecodeError)."""
    params, metrics, out = suite
    (metrics / "digits").mkdir(parents=True)
    good = {"accuracy": 0.97, "selection_metric": "accuracy", "model_version": 1}
    (metrics / "digits" / "small_cnn.json").write_text(json.dumps(good))
    (metrics / "digits" / "mobilenetv2.json").write_text('<<<<<<< HEAD\n{"accuracy": 0.91}\n=======\n')
    with pytest.raises(UserError, match="mobilenetv2.json"):
        report_stage.report("demo", str(params), metrics, out)


def test_a_timed_out_lookup_does_not_hand_the_champion_to_a_worse_version(
    registry: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only "does not exist" means a run was purged. Before, any get_run error not recognised as
    an unanswering server counted as purged: MLflow's connect-timeout error (its words copied from
    a real one, see test_evaluate.py) dropped the live champion from the candidates, and the alias
    moved to a worse version."""
    from mlflow.exceptions import MlflowException

    exp = registry.create_experiment("digits")
    runs = [registry.create_run(exp).info.run_id for _ in range(2)]
    source = str(Path(registry.tracking_uri.removeprefix("sqlite:///")).parent / "m")

    def register(accuracy: float, run_id: str) -> int:
        tags = {f"test_{k}": f"{accuracy:.6f}" for k in ("accuracy", "balanced_accuracy", "macro_f1")}
        tags.update(data_version="d1", experiment="digits-small_cnn")
        return int(registry.create_model_version("digits", source=source, run_id=run_id, tags=tags).version)

    best, worse = register(0.97, runs[0]), register(0.90, runs[1])
    table = pd.DataFrame({"dataset": "digits", "selection_metric": "accuracy", "model_version": [best]})
    update_champions(table)
    assert int(registry.get_model_version_by_alias("digits", CHAMPION).version) == best

    real_get_run = MlflowClient.get_run

    def flaky_get_run(self, run_id):  # type: ignore[no-untyped-def]
        if run_id == runs[0]:
            raise MlflowException(
                "API request to http://mlflow.example:5000/api/2.0/mlflow/runs/get failed with timeout exception "
                "HTTPConnectionPool(host='mlflow.example', port=5000): Max retries exceeded with url: "
                "/api/2.0/mlflow/runs/get (Caused by ConnectTimeoutError(<HTTPConnection>, 'Connection to "
                "mlflow.example timed out. (connect timeout=120)')). To increase the timeout, set the environment "
                "variable MLFLOW_HTTP_REQUEST_TIMEOUT (default: 120) to a larger value."
            )
        return real_get_run(self, run_id)

    monkeypatch.setattr(MlflowClient, "get_run", flaky_get_run)
    try:
        update_champions(table.assign(model_version=[worse]))
    except MlflowException:
        pass  # failing is fine; moving the alias is not
    assert int(registry.get_model_version_by_alias("digits", CHAMPION).version) == best


def test_on_a_tie_the_leaderboards_first_row_is_the_champion(registry, suite) -> None:
    """Two backbones with the same accuracy (common on small or easy test splits: 100% each):
    the champion is the newer version, but the leaderboard put the other one first."""
    params, metrics, out = suite
    mobile = register(registry, 0.975945, experiment="digits-mobilenetv2")
    small = register(registry, 0.975945, experiment="digits-small_cnn")
    write_metrics(metrics, "small_cnn", 0.975945, small)
    write_metrics(metrics, "mobilenetv2", 0.975945, mobile)

    report_stage.report("demo", str(params), metrics, out)

    csv = pd.read_csv(out.with_suffix(".csv"))
    assert champion(registry) == small
    assert list(csv["champion"]) == [True, False], list(zip(csv["backbone"], csv["champion"]))


def test_the_closing_line_names_each_datasets_first_row_by_the_suites_rank_metric() -> None:
    """report@<suite>'s last line. Before, it named the table's first row (the alphabetically first
    dataset) as "first" with its plain accuracy whatever rank_by said: a suite ranked by balanced
    accuracy over flowers (33% balanced) and shapes (50% balanced) said `first: flowers x
    mobilenetv2 at 33.33% test accuracy`."""
    rows = [
        record("flowers", "mobilenetv2", 0.3333),
        record("shapes", "tiny16", 0.3077),
        record("shapes", "small_cnn", 0.30),
    ]
    rows[0]["balanced_accuracy"], rows[1]["balanced_accuracy"], rows[2]["balanced_accuracy"] = 0.3333, 0.50, 0.60
    line = report_stage.summary(leaderboard(rows, "balanced_accuracy"), "balanced_accuracy")
    assert line == "first by test balanced accuracy: flowers x mobilenetv2 at 33.33%, shapes x small_cnn at 60.00%"
    one = report_stage.summary(leaderboard(rows[:1], "accuracy"), "accuracy")
    assert one == "first by test accuracy: flowers x mobilenetv2 at 33.33%"


def test_a_metrics_file_naming_another_experiments_version_is_a_user_error(
    registry: MlflowClient, suite: tuple[Path, Path, Path]
) -> None:
    """Metrics files are kept in git and name their registered version by number, which is only
    meaningful in the store that evaluated them. After a cleared mlflow.db (or a switch to another
    tracking server) in which only some experiments were trained and evaluated again, a number from
    the old store can name another experiment's version in the new one. Before, the report took it
    as the row's own: both rows were marked `yes (v1, ...)` champion, with the other's scores."""
    params, metrics, out = suite
    mobile = register(registry, 0.914089, experiment="digits-mobilenetv2")  # version 1 in the new store
    write_metrics(metrics, "mobilenetv2", 0.914089, mobile)
    write_metrics(metrics, "small_cnn", 0.975945, 1)  # from the old store, where version 1 was small_cnn's

    with pytest.raises(UserError, match=r"the metrics of digits-small_cnn name version 1 of digits, which "
                       r"sqlite:///\S+ holds for digits-mobilenetv2 \(metrics from another tracking store\)") as error:
        report_stage.report("demo", str(params), metrics, out)
    assert "dvc repro --force --downstream train@digits-small_cnn" in str(error.value)


def test_a_champion_from_another_suites_experiment_is_named_so(
    registry: MlflowClient, suite: tuple[Path, Path, Path]
) -> None:
    """Two suites with experiments on one dataset share its registered model and its champion:
    report@demo may leave the alias on the other suite's better version. Before, the leaderboard
    said it was "registered by an earlier evaluation", though the other suite's evaluate made it,
    whenever it ran; it now names that experiment and its suite."""
    params, metrics, out = suite
    text = params.read_text(encoding="utf-8")
    marker = "  digits-mobilenetv2:\n    suite: demo\n"
    assert marker in text
    params.write_text(text.replace(marker, "  digits-mobilenetv2:\n    suite: course\n"), encoding="utf-8")
    small = register(registry, 0.90, experiment="digits-small_cnn")
    other = register(registry, 0.95, experiment="digits-mobilenetv2")
    write_metrics(metrics, "small_cnn", 0.90, small)

    report_stage.report("demo", str(params), metrics, out)

    assert champion(registry) == other
    markdown = out.with_suffix(".md").read_text(encoding="utf-8")
    assert (
        f"- digits: the champion is version {other} (digits-mobilenetv2, accuracy 95.00%), registered by "
        "evaluate@digits-mobilenetv2 of suite course; none of the rows above beats it."
    ) in markdown


def test_the_alias_taken_from_a_deleted_runs_version_is_not_called_the_first(
    registry: MlflowClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the alias leaves a version whose run was deleted, the report's line says so. Before, it
    said `first`, as if the dataset had had no champion."""
    experiment = registry.create_experiment("digits")
    old_run = registry.create_run(experiment).info.run_id
    update_champions(table([register(registry, 0.95, run_id=old_run)]))
    registry.delete_run(old_run)
    capsys.readouterr()

    update_champions(table([register(registry, 0.95, run_id=registry.create_run(experiment).info.run_id)]))

    assert "report: digits@champion -> version 2 (accuracy 0.9500; from version 1, whose run was deleted)" in (
        capsys.readouterr().out
    )


def test_the_alias_leaves_a_deleted_runs_version_even_with_no_other_to_take_it(
    registry: MlflowClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """The only version of a dataset, its run deleted in MLflow's UI: the alias is removed, with a
    line saying so. Before, it stayed there, and predict kept loading a model `mlflow gc` removes."""
    from mlflow.exceptions import MlflowException

    run = registry.create_run(registry.create_experiment("digits")).info.run_id
    rows = table([register(registry, 0.95, run_id=run)])
    update_champions(rows)
    registry.delete_run(run)
    capsys.readouterr()

    assert update_champions(rows) == {}

    assert capsys.readouterr().out == (
        "report: digits@champion removed from version 1, whose run was deleted; no other version of digits can take "
        "it (train and evaluate one again: dvc repro)\n")
    with pytest.raises(MlflowException):
        registry.get_model_version_by_alias("digits", "champion")
