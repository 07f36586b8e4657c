"""`python -m stages.plots show|diff` writes a DVC plots page that needs no network.

A scratch git + DVC project has one stage whose `plots:` are a training-curve CSV and a folder of
PNGs, declared as the pipeline declares them; it is committed once, then rerun with another
colour so that the workspace differs from HEAD.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.errors import UserError
from stages.plots import BUNDLE, VEGA_LITE_VERSION, main, split_out

MAKE = '''\
"""make.py COLOUR: a training curve and two figures."""
import sys
from pathlib import Path
from PIL import Image

colour = int(sys.argv[1])
Path("history.csv").write_text("epoch,loss\\n0,1.0\\n1,0.5\\n2,0.%d\\n" % colour)
Path("figures").mkdir(exist_ok=True)
for name in ("confusion", "curves"):
    Image.new("RGB", (8, 6), (colour * 20, 80, 160)).save(f"figures/{name}.png")
'''

DVC_YAML = """\
stages:
  make:
    cmd: python make.py ${colour}
    deps: [make.py]
    params: [colour]
    plots:
      - figures
      - history.csv:
          cache: false
          x: epoch
"""

ROOT = Path(__file__).resolve().parents[1]

# A script or stylesheet fetched from anywhere but beside the page.
REMOTE_REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def dvc_env() -> dict[str, str]:
    """The environment for dvc and this checkout's stages (not the ones the shared virtual
    environment was installed from), without the caller's DVC_ variables."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DVC_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A committed git + DVC project whose workspace plots differ from HEAD's."""
    root = tmp_path_factory.mktemp("plots")
    env = dvc_env()
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], root, env)
    run([*dvc, "init", "-q"], root, env)
    (root / "make.py").write_text(MAKE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text("colour: 1\n")
    (root / ".gitignore").write_text("/dvc_plots\n")
    run([*dvc, "repro", "-q"], root, env)
    run([*git, "add", "-A"], root, env)
    run([*git, "commit", "-qm", "first"], root, env)
    (root / "params.yaml").write_text("colour: 5\n")
    run([*dvc, "repro", "-q"], root, env)
    return root, env


def plots(project: tuple[Path, dict[str, str]], *args: str) -> str:
    """Run `python -m stages.plots ARGS` in the project; the page's text."""
    root, env = project
    result = run([sys.executable, "-m", "stages.plots", *args], root, env)
    page = root / "dvc_plots" / "index.html"
    assert f"Open {page}" in result.stdout
    return page.read_text()


def assert_offline(page: str, folder: Path) -> None:
    assert not REMOTE_REFERENCE.search(page), REMOTE_REFERENCE.search(page)
    assert "cdn.jsdelivr.net" not in page
    assert f'<script src="{BUNDLE}"></script>' in page
    bundle = (folder / BUNDLE).read_text()
    assert "window.vegaEmbed=" in bundle.replace(" ", "") and len(bundle) > 100_000
    for source in re.findall(r'<img src="([^"]+)"', page):
        assert (folder / source).stat().st_size > 0, source


def test_show_renders_the_csv_plot_and_the_pngs_from_local_files(project: tuple[Path, dict[str, str]]) -> None:
    page = plots(project, "show")
    assert "{plot_divs}" not in page and "vegaEmbed('#history_csv'" in page
    assert re.findall(r'<img src="([^"]+)"', page) == [
        "static/workspace_figures_confusion.png",
        "static/workspace_figures_curves.png",
    ]
    assert_offline(page, project[0] / "dvc_plots")


def test_diff_shows_head_beside_the_workspace(project: tuple[Path, dict[str, str]]) -> None:
    page = plots(project, "diff")
    images = re.findall(r'<img src="([^"]+)"', page)
    assert "static/HEAD_figures_confusion.png" in images and "static/workspace_figures_confusion.png" in images
    assert '"rev": "HEAD"' in page and '"rev": "workspace"' in page
    assert_offline(page, project[0] / "dvc_plots")


def test_out_is_taken_from_the_arguments() -> None:
    assert split_out(["HEAD~1", "-o", "here", "--open"]) == (["HEAD~1", "--open"], "here")
    assert split_out(["--out=there"]) == ([], "there")
    assert split_out([]) == ([], "dvc_plots")


def test_an_unknown_command_is_a_user_error() -> None:
    with pytest.raises(UserError) as caught:
        main(["render"])
    assert str(caught.value) == "usage: python -m stages.plots {show|diff} [dvc plots arguments...]"


HOSTILE_CLASSES = ["</script><b>bold</b>", "<!--<script>", "plain"]


def test_a_class_name_holding_markup_stays_data_in_the_page(tmp_path: Path) -> None:
    """A class name (a CSV layout's label, a folder name) is written by DVC into a <script> as
    json.dumps leaves it: "</script>" in per_class.csv ended the script there and the rest of the
    spec showed as HTML, and "<!--<script>" made the browser read the page's later scripts as one.
    Each spec has no "<" left, and still holds the names as they are."""
    root = tmp_path / "hostile"
    root.mkdir()
    env = dvc_env()
    run(["git", "init", "-q"], root, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    rows = "".join(f'"{name}",0.{i + 5}\n' for i, name in enumerate(HOSTILE_CLASSES))
    (root / "per_class.csv").write_text("class,f1\n" + rows, encoding="utf-8")
    (root / "dvc.yaml").write_text(
        "plots:\n  - per_class.csv:\n      template: bar_horizontal_sorted\n      x: f1\n      y: class\n"
    )
    page = plots((root, env), "show")
    specs = re.findall(r"^\s*var spec = (.*);$", page, re.MULTILINE)
    assert len(specs) == 1, page
    assert "<" not in specs[0], specs[0][:300]
    values = json.loads(specs[0])["data"]["values"]
    assert [value["class"] for value in values] == HOSTILE_CLASSES
    assert page.count("<script") == page.count("</script>") == 2


# params.yaml's order, not the order of the names as text: FER lists neutral after surprise, and a
# class "10" comes after "9" (GTSRB's and any numbered classes).
ORDERED_CLASSES = ["angry", "surprise", "neutral", "9", "10"]


def confusion_plot_definition() -> tuple[str, dict]:
    """The evaluate stage's own definition of its confusion plot: its file and its options."""
    plots_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]["do"]["plots"]
    (definition,) = [entry for entry in plots_yaml if isinstance(entry, dict) and
                     next(iter(entry.values())).get("template") == "confusion_ordered"]
    path, options = next(iter(definition.items()))
    # `cache` is an output's option, for a stage's plot; a top-level plot (these tests') has none.
    return path, {key: value for key, value in options.items() if key != "cache"}


def write_confusion_source(path: Path, pipeline_path: str, y_test: np.ndarray, y_pred: np.ndarray) -> None:
    """What evaluate writes at `pipeline_path` (the plot's file in dvc.yaml) for these predictions."""
    from stages.evaluate import confusion_table

    assert pipeline_path.endswith("/confusion.csv") and pipeline_path.startswith("reports/evaluation/")
    confusion_table(ORDERED_CLASSES, y_test, y_pred).to_csv(path, index=False)


def confusion_csv(path: Path, shift: int) -> None:
    """What evaluate writes for the confusion plot: each class mistaken once for every class
    (`shift` more often for the next)."""
    n = len(ORDERED_CLASSES)
    y_test = np.repeat(np.arange(n), n + shift)
    predicted = np.array([j for i in range(n) for j in [*range(n), *[(i + 1) % n] * shift]])
    write_confusion_source(path, confusion_plot_definition()[0], y_test, predicted)


def axes_in_order(page: str) -> list[list[str]]:
    """The class names on each axis of the page's one confusion plot, as drawn (Vega-Lite 5 to SVG)."""
    import vl_convert

    specs = re.findall(r"^\s*var spec = (.*);$", page, re.MULTILINE)
    assert len(specs) == 1, page
    svg = vl_convert.vegalite_to_svg(json.loads(specs[0]), vl_version=VEGA_LITE_VERSION)
    labels = [text for text in re.findall(r"<text[^>]*>([^<]*)</text>", svg) if text in ORDERED_CLASSES]
    n = len(ORDERED_CLASSES)
    assert labels and len(labels) % n == 0, labels
    return [labels[start:start + n] for start in range(0, len(labels), n)]


def test_the_confusion_plot_orders_its_axes_as_params_yaml(tmp_path: Path) -> None:
    """evaluate's confusion.png lists the classes in params.yaml's order; DVC's `confusion`
    template sorted them as text, so its plot of the same predictions put "10" before "9" and
    "neutral" before "surprise", and a cell did not sit where it does in the PNG. With the
    pipeline's definition of the confusion plot, `show` and `diff` draw both axes in
    params.yaml's order."""
    root = tmp_path / "ordered"
    root.mkdir()
    env = dvc_env()
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", "init", "-q"], root, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    if (ROOT / ".dvc" / "plots").is_dir():  # the project's own plot templates
        shutil.copytree(ROOT / ".dvc" / "plots", root / ".dvc" / "plots")
    # The evaluate stage's own definition of the confusion plot, for this one file.
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": [{"confusion.csv": confusion_plot_definition()[1]}]}))
    (root / ".gitignore").write_text("/dvc_plots\n")
    confusion_csv(root / "confusion.csv", shift=0)
    assert axes_in_order(plots((root, env), "show")) == [ORDERED_CLASSES] * 2

    run([*git, "add", "-A"], root, env)
    run([*git, "commit", "-qm", "first"], root, env)
    confusion_csv(root / "confusion.csv", shift=2)
    drawn = axes_in_order(plots((root, env), "diff"))
    assert drawn == [ORDERED_CLASSES] * len(drawn) and len(drawn) >= 3  # one y axis, an x axis per revision


def cells_drawn(page: str) -> dict[tuple[str, str], int]:
    """The count in each (actual, predicted) cell of the page's one confusion plot, as drawn."""
    import vl_convert

    (spec,) = re.findall(r"^\s*var spec = (.*);$", page, re.MULTILINE)
    svg = vl_convert.vegalite_to_svg(json.loads(spec), vl_version=VEGA_LITE_VERSION)
    found = re.findall(r'aria-label="predicted: ([^;"]*); actual: ([^;"]*); xy_count: (\d+)"', svg)
    return {(actual, predicted): int(count) for predicted, actual, count in found}


def test_the_confusion_plot_shows_every_class_with_zero_cells(tmp_path: Path) -> None:
    """confusion.png has a row and a column for every class of params.yaml; DVC's plot of the
    predictions CSV had only the classes found in it, so a class never predicted had no column
    and one absent from the test split no row. With the pipeline's definition of the plot, every
    class is on both axes, in params.yaml's order, and a pair nothing fell in is a 0 cell."""
    root = tmp_path / "every"
    root.mkdir()
    env = dvc_env()
    run(["git", "init", "-q"], root, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    shutil.copytree(ROOT / ".dvc" / "plots", root / ".dvc" / "plots")
    pipeline_path, definition = confusion_plot_definition()
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": [{"plot.csv": definition}]}))
    # "neutral" is never predicted, "10" has no test image; "9" is mistaken for "angry" twice.
    y_test = np.array([0, 0, 1, 1, 1, 2, 3, 3, 3])
    y_pred = np.array([0, 1, 1, 1, 3, 0, 0, 0, 3])
    write_confusion_source(root / "plot.csv", pipeline_path, y_test, y_pred)
    page = plots((root, env), "show")
    assert axes_in_order(page) == [ORDERED_CLASSES] * 2
    n = len(ORDERED_CLASSES)
    expected = {(ORDERED_CLASSES[i], ORDERED_CLASSES[j]): 0 for i in range(n) for j in range(n)}
    for i, j in zip(y_test, y_pred):
        expected[ORDERED_CLASSES[i], ORDERED_CLASSES[j]] += 1
    assert cells_drawn(page) == expected

    # A commit from before confusion.csv plotted the predictions CSV, one row per image, with this
    # template: `diff` against it still counts its rows (only the classes found in them).
    from stages.evaluate import predictions_table

    probabilities = np.eye(n)[y_pred] * 0.9 + 0.1 / n
    paths = [f"{i}.png" for i in range(len(y_test))]
    predictions_table(paths, ORDERED_CLASSES, y_test, probabilities).to_csv(root / "plot.csv", index=False)
    found = {pair: count for pair, count in expected.items() if count}
    assert {pair: count for pair, count in cells_drawn(plots((root, env), "show")).items() if count} == found

