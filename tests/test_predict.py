"""The predict stage without a trained pipeline: finding files, decoding them, classifying them
with a tiny real Keras model, naming the model to load, and failing clearly on a bad alias."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from stages import predict as predict_stage
from stages.errors import run_stage
from stages.predict import BATCH, LoadedModel, decode, image_files, model_uri, predict

pytest_plugins = ["mlflow_registry"]

CLASSES = ["a", "b", "c"]


def write_png(path: Path, value: int = 128, size: tuple[int, int] = (8, 8), mode: str = "L") -> Path:
    """A flat image of `value` (every channel) saved as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), value, dtype=np.uint8)
    Image.fromarray(pixels, mode=mode).save(path)
    return path


# --------------------------------------------------------------------------------------------
# image_files


def test_folders_are_searched_recursively_for_image_suffixes_in_any_case(tmp_path: Path) -> None:
    """Images at any depth, .PNG and .Jpeg alike, sorted; other files in a folder are left out,
    and listed as such."""
    folder = tmp_path / "photos"
    for name in ("b.png", "nested/deeper/c.JPEG", "a.Jpg", "nested/d.PNG"):
        write_png(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "nested" / "model.keras").write_bytes(b"\0")

    files, problems, left_out = image_files([folder])

    assert files == sorted(files)
    assert [f.relative_to(folder).as_posix() for f in files] == sorted(
        ["a.Jpg", "b.png", "nested/d.PNG", "nested/deeper/c.JPEG"]
    )
    assert problems == []
    assert left_out == [folder / "nested" / "model.keras", folder / "notes.txt"]


def test_named_files_are_kept_as_given_even_without_an_image_suffix(tmp_path: Path) -> None:
    """A file named on the command line is tried (and reported later if unreadable), in the given order."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    image = write_png(tmp_path / "z.png")
    files, problems, left_out = image_files([image, notes])
    assert files == [image, notes]
    assert problems == [] and left_out == []


def test_hidden_files_are_left_out_and_each_image_is_classified_once(tmp_path: Path) -> None:
    """As validate: `._b.png` (macOS's metadata beside b.png) is not an image, nor is a copy in a
    notebook's hidden `.ipynb_checkpoints/`. A file named and also inside a folder given is
    classified once."""
    folder = tmp_path / "photos"
    image = write_png(folder / "b.png")
    (folder / "._b.png").write_bytes(b"\0\5\26\7 AppleDouble")
    checkpoint = write_png(folder / ".ipynb_checkpoints" / "b-checkpoint.png")

    files, problems, left_out = image_files([image, folder, folder / ".." / "photos" / "b.png"])

    assert files == [image]
    assert problems == [] and left_out == [folder / "._b.png", checkpoint]


def test_missing_path_and_empty_folder_are_reported_with_their_paths(tmp_path: Path) -> None:
    """A path that does not exist and a folder with no images each give one message naming it;
    the rest are still listed."""
    missing = tmp_path / "nowhere.png"
    empty = tmp_path / "empty"
    empty.mkdir()
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "readme.md").write_text("# no images")
    image = write_png(tmp_path / "ok.png")

    files, problems, left_out = image_files([missing, empty, image, only_text])

    assert files == [image] and left_out == [only_text / "readme.md"]
    assert problems[0] == f"{missing}: no such file or folder"
    assert problems[1].startswith(f"{empty}: no image files in this folder (looked for .png, .jpg")
    assert problems[2].startswith(f"{only_text}: no image files in this folder")
    assert len(problems) == 3


def test_a_broken_link_in_a_folder_is_reported_not_silently_dropped(tmp_path: Path, loaded: LoadedModel) -> None:
    """A folder of links whose targets are absent (a git-annex or DVC symlink checkout whose data
    was never fetched). Before: the dangling links were neither classified, nor left out, nor
    errors; a folder of nothing else was "no image files in this folder". Now each is a file that
    cannot be read, named with the reason."""
    folder = tmp_path / "photos"
    image = write_png(folder / "a.png", 0)
    (folder / "b.png").symlink_to(tmp_path / "annex" / "b.png")

    files, problems, left_out = image_files([folder])
    assert files == [image, folder / "b.png"] and problems == [] and left_out == []
    results, unreadable = predict(loaded, files)
    assert [path for path, _, _ in results] == [image]
    assert len(unreadable) == 1 and unreadable[0].startswith(f"{folder / 'b.png'}: cannot read this image (")
    assert "No such file or directory" in unreadable[0]


def test_a_named_pipe_is_named_as_not_a_file_not_missing_or_dropped(tmp_path: Path) -> None:
    """`predict --dataset digits <(curl ...)` names a pipe (/dev/fd/63); a folder may hold a FIFO.
    Before: the one named was "no such file or folder", which it is not, and the one in a folder
    was passed over in silence, neither classified, left out nor counted. Now each is named as not
    a regular file, and never opened (opening a FIFO with no writer waits for good)."""
    import os

    folder = tmp_path / "photos"
    image = write_png(folder / "a.png", 0)
    os.mkfifo(folder / "b.png")
    os.mkfifo(tmp_path / "piped")

    files, problems, left_out = image_files([folder, tmp_path / "piped"])

    assert files == [image] and left_out == []
    assert problems == [f"{path}: not a regular file (a named pipe, socket or device), so not read; save what it "
                        "holds to a file and name that" for path in (folder / "b.png", tmp_path / "piped")]


def test_a_link_to_a_folder_in_a_folder_given_is_followed_once(tmp_path: Path) -> None:
    """`photos/more -> /elsewhere/more`: before, rglob did not enter it, and its images were
    neither classified nor left out, with no word. A link back up (a loop) ends."""
    elsewhere = tmp_path / "elsewhere"
    image = write_png(elsewhere / "c.png", 0)
    folder = tmp_path / "photos"
    own = write_png(folder / "a.png", 0)
    (folder / "more").symlink_to(elsewhere)
    (folder / "loop").symlink_to(folder)

    files, problems, left_out = image_files([folder])
    assert files == [own, folder / "more" / "c.png"] and problems == [] and left_out == []
    assert files[1].resolve() == image.resolve()


def test_a_folder_predict_may_not_read_is_named_not_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subfolder another user made private (mode 700), or a folder given that is: the listing
    is refused (as root it is not, so the refusal is made here as a user gets it). Before: os.walk
    passed over it without a word, its images neither classified nor counted, and the folder
    given was "no image files in this folder". Now each is named with the reason."""
    import errno
    import os

    folder = tmp_path / "photos"
    image = write_png(folder / "open" / "a.png", 0)
    locked = folder / "locked"
    write_png(locked / "b.png", 0)
    scandir = os.scandir

    def refusing(path: object = ".") -> object:
        if Path(os.fsdecode(path)) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)

    files, problems, left_out = image_files([folder, locked])

    assert files == [image] and left_out == []
    assert problems == [f"{locked}: cannot list this folder ([Errno 13] Permission denied); its images were not classified"] * 2


def test_two_links_to_one_image_are_two_files_each_classified(tmp_path: Path) -> None:
    """A DVC checkout with `cache.type: symlink`: two images of the same bytes are two links to
    one cache file. Before: the second was dropped as "the same file", neither classified nor
    left out nor counted. A file reached twice by the same name (named, and in a folder given;
    through a link to its folder) is still one."""
    cached = write_png(tmp_path / "cache" / "ab12.png", 0).rename(tmp_path / "cache" / "ab12")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "one.png").symlink_to(cached)
    (folder / "two.png").symlink_to(cached)
    (tmp_path / "again").symlink_to(folder)

    files, problems, left_out = image_files([folder / "two.png", folder, tmp_path / "again"])

    assert files == [folder / "two.png", folder / "one.png"]
    assert problems == [] and left_out == []


def test_a_name_with_a_tab_or_newline_keeps_its_line_whole() -> None:
    """predict's lines are path, label, confidence, tab-separated: a name holding a tab gave four
    columns, one holding a newline two lines. Such a name is written escaped; others as they are."""
    from stages.predict import shown

    assert shown(Path("photos/a\tb.png")) == "photos/a\\tb.png"
    assert shown(Path("photos/x\\y\nz\r.png")) == "photos/x\\\\y\\nz\\r.png"
    assert shown(Path("photos/x\\y café.png")) == "photos/x\\y café.png"


# --------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3), ("L", 3), ("RGB", 1)])
def test_good_png_decodes_to_uint8_at_the_working_size_and_channels(
    tmp_path: Path, mode: str, channels: int
) -> None:
    """Any PNG comes back as uint8 (size, size, channels), whatever its own size and mode."""
    path = write_png(tmp_path / "image.png", value=200, size=(20, 12), mode=mode)
    pixels = decode(path, 16, channels)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (16, 16, channels)
    assert int(pixels.min()) == int(pixels.max()) == 200


def test_unreadable_files_raise_value_error_with_the_reason(tmp_path: Path) -> None:
    """A zero-byte file, text named .png and a truncated PNG are refused with a reason, not decoded."""
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("this is not a PNG\n")
    # Noise, so the compressed pixel data is large and cutting the file in half cuts into it.
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    assert decode(good, 8, 1).shape == (8, 8, 1)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    for path in (empty, text, truncated):
        with pytest.raises(ValueError, match="undecodable: .+"):
            decode(path, 8, 1)
    with pytest.raises(ValueError, match="truncated"):
        decode(truncated, 8, 1)


# --------------------------------------------------------------------------------------------
# predict


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    """A real Keras model on 8x8 gray images that answers by brightness: black "a", mid-grey "b",
    white "c" (logits linear in the pixel sum s in [0, 64]: a = 2 - 0.1 s, b = 0, c = 0.1 s - 4.4)."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    kernel = np.zeros((64, 3), dtype="float32")
    kernel[:, 0], kernel[:, 2] = -0.1, 0.1
    model.layers[-1].set_weights([kernel, np.array([2.0, 0.0, -4.4], dtype="float32")])
    return LoadedModel(model, CLASSES, image_size=8, channels=1, uri="models:/toy/1")


def test_predict_labels_each_good_file_with_a_confidence(tmp_path: Path, loaded: LoadedModel) -> None:
    """Each readable file gets its path, the model's label and a confidence in (0, 1]."""
    black = write_png(tmp_path / "black.png", 0)
    grey = write_png(tmp_path / "grey.png", 128, size=(32, 32))  # resized to 8x8 first
    white = write_png(tmp_path / "white.png", 255, mode="RGB")  # converted to one channel first

    results, problems = predict(loaded, [black, grey, white])

    assert problems == []
    assert [(path, label) for path, label, _ in results] == [(black, "a"), (grey, "b"), (white, "c")]
    for _, label, confidence in results:
        assert label in CLASSES
        assert 0 < confidence <= 1
    # Black (s = 0): the softmax of logits (2, 0, -4.4).
    assert results[0][2] == pytest.approx(np.exp(2) / (np.exp(2) + 1 + np.exp(-4.4)), rel=1e-5)


def test_unreadable_files_are_reported_and_the_rest_classified(tmp_path: Path, loaded: LoadedModel) -> None:
    """A bad file is named with its reason and skipped; the files around it are still classified."""
    first = write_png(tmp_path / "1.png", 0)
    broken = tmp_path / "2.png"
    broken.write_text("not an image")
    notes = tmp_path / "3.txt"
    notes.write_text("named by mistake")
    last = write_png(tmp_path / "4.png", 255)

    results, problems = predict(loaded, [first, broken, notes, last])

    assert [(path, label) for path, label, _ in results] == [(first, "a"), (last, "c")]
    assert len(problems) == 2
    assert problems[0].startswith(f"{broken}: cannot read this image (undecodable: ")
    assert problems[0].endswith("); skipped")
    assert problems[1].startswith(f"{notes}: cannot read this image (")


def test_more_files_than_a_batch_are_all_classified_in_order(tmp_path: Path, loaded: LoadedModel) -> None:
    """Over BATCH files go through in several batches, including a last batch with nothing readable."""
    values = [0, 128, 255]
    files = [write_png(tmp_path / f"{i:03d}.png", values[i % 3]) for i in range(2 * BATCH)]
    broken = tmp_path / "999.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")  # the signature and nothing else: alone in the third batch
    files.append(broken)

    results, problems = predict(loaded, files)

    assert [path for path, _, _ in results] == files[: 2 * BATCH]
    assert [label for _, label, _ in results] == [CLASSES[i % 3] for i in range(2 * BATCH)]
    assert len(problems) == 1 and problems[0].startswith(f"{broken}: cannot read this image")


# --------------------------------------------------------------------------------------------
# model_uri and main, against a real (SQLite) MLflow registry.


def test_model_uri_names_alias_or_version() -> None:
    """Champion by default, a named alias, or a version number: no registry needed."""
    assert model_uri("digits", None, None, None) == "models:/digits@champion"
    assert model_uri("digits", "staging", None, None) == "models:/digits@staging"
    assert model_uri("digits", None, 3, None) == "models:/digits/3"


def test_model_uri_for_a_run_prefers_its_registered_version(registry: MlflowClient, tmp_path: Path) -> None:
    """A run with no registered version is loaded from its artifacts; once registered (twice,
    say), from its newest version, never from another run's."""
    experiment = registry.create_experiment("digits", artifact_location=(tmp_path / "artifacts").as_uri())
    run = registry.create_run(experiment).info.run_id
    other = registry.create_run(experiment).info.run_id
    registry.create_registered_model("digits")
    source = str(tmp_path / "m")

    assert model_uri("digits", None, None, run) == f"runs:/{run}/model"

    registry.create_model_version("digits", source=source, run_id=other)  # version 1, another run
    assert model_uri("digits", None, None, run) == f"runs:/{run}/model"
    registry.create_model_version("digits", source=source, run_id=run)  # version 2
    registry.create_model_version("digits", source=source, run_id=other)  # version 3
    registry.create_model_version("digits", source=source, run_id=run)  # version 4
    assert model_uri("digits", None, None, run) == "models:/digits/4"
    assert model_uri("digits", None, None, other) == "models:/digits/3"


def test_main_with_unknown_alias_exits_1_with_one_error_line(
    registry: MlflowClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model the registry cannot give is one "error: cannot load ..." line and exit status 1,
    before any image is read."""
    image = write_png(tmp_path / "digit.png")

    with pytest.raises(SystemExit) as exit_info:
        run_stage(predict_stage.main, ["--dataset", "digits", "--alias", "nope", str(image)])

    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: cannot load models:/digits@nope from {registry.tracking_uri}: ")
    assert "make ui" in lines[0]


def register(registry: MlflowClient, tmp_path: Path, loaded: LoadedModel, name: str) -> None:
    """`loaded`'s model logged and registered as evaluate logs one (MLflow's Keras flavour, with
    the metadata predict reads), as version 1 of `name`, its champion."""
    import mlflow

    experiment = registry.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())
    run = registry.create_run(experiment).info.run_id
    local = tmp_path / "logged"
    metadata = {"classes": loaded.classes, "image_size": loaded.image_size, "channels": loaded.channels}
    mlflow.keras.save_model(loaded.model, str(local), metadata=metadata)
    registry.log_artifacts(run, str(local), artifact_path="model")
    registry.create_registered_model(name)
    registry.create_model_version(name, source=f"runs:/{run}/model", run_id=run)
    registry.set_registered_model_alias(name, "champion", "1")


def test_main_names_the_files_of_a_folder_it_left_out(
    registry: MlflowClient, tmp_path: Path, loaded: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder's non-image files are not classified, but said: one line with their count and the
    first three names. Not an error: the exit status stays 0 when every image was classified.
    The model is the registry's champion, downloaded and loaded the real way."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "black.png")
    for name in ("a.txt", "b.csv", "c.json", "d.md"):
        (folder / name).write_text("not an image")
    register(registry, tmp_path, loaded, "toy")
    capsys.readouterr()  # MLflow's own words while logging

    run_stage(predict_stage.main, ["--dataset", "toy", str(folder)])

    captured = capsys.readouterr()
    [line] = captured.out.splitlines()
    assert line.startswith(f"{folder / 'black.png'}\ta\t"), line  # black is "a"
    err = captured.err.strip().splitlines()
    assert err[0].startswith("predict: left out 4 files of the folders given, not images by their name (hidden, or a "
                             "suffix other than .png, ")
    assert err[0].endswith(f"{folder / 'a.txt'}, {folder / 'b.csv'}, {folder / 'c.json'} and 1 more; name a file to try it anyway")
    assert err[1] == "predict: 1 of 1 files classified with models:/toy@champion"


def test_a_full_disk_under_stdout_is_one_line_saying_the_results_are_cut_short(
    registry: MlflowClient, tmp_path: Path, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`predict ... > results.tsv` on a full disk (here /dev/full, which refuses every write so).
    Before: the stages' "no room left" line, which went on "nothing half-written was left under an
    output's name": untrue of what the shell redirected stdout to, which keeps the lines written
    before the disk filled. Now the line names stdout and says its file holds part of the results."""
    import io

    folder = tmp_path / "photos"
    for i in range(3):
        write_png(folder / f"{i}.png", 0)
    register(registry, tmp_path, loaded, "toy")
    capsys.readouterr()
    full = open("/dev/full", "w", encoding="utf-8")
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(full.buffer, encoding="utf-8"))

    with pytest.raises(SystemExit) as exit_info:
        run_stage(predict_stage.main, ["--dataset", "toy", str(folder)])

    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: cannot write the results to stdout ([Errno 28] No space left on device): what it goes "
                     "to holds part of them at most; make room there and run predict again (3 of 3 files were "
                     "classified with models:/toy@champion)"]


def test_main_rejects_alias_and_version_together(capsys: pytest.CaptureFixture[str]) -> None:
    """--alias, --version and --run name one model: two of them is a usage error (status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        predict_stage.main(["--dataset", "digits", "--alias", "x", "--version", "2", "a.png"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("version", ["0", "-1"])
def test_a_version_below_one_is_a_usage_error(capsys: pytest.CaptureFixture[str], version: str) -> None:
    """Registered versions count from 1: --version 0 or -1 is a usage error saying so (before,
    MLflow's 'Invalid Model Version stage: -1. Value must be one of None, Staging, ...')."""
    with pytest.raises(SystemExit) as exit_info:
        predict_stage.main(["--dataset", "digits", "--version", version, "a.png"])
    assert exit_info.value.code == 2
    assert f"argument --version: {version} is not a version number (1, 2, ...)" in capsys.readouterr().err


def test_a_version_whose_files_are_gone_is_one_error_line(
    registry: MlflowClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A registered version whose run's artifacts were purged (a retrain replaced the run, then
    `mlflow gc`): one line saying so and what to do, not MLflow's traceback about MLmodel."""
    experiment = registry.create_experiment("digits", artifact_location=(tmp_path / "artifacts").as_uri())
    run = registry.create_run(experiment).info.run_id
    registry.create_registered_model("digits")
    purged = tmp_path / "artifacts" / run / "artifacts" / "model"
    purged.mkdir(parents=True)  # the folder is there, its files are not
    registry.create_model_version("digits", source=purged.as_uri(), run_id=run)
    image = write_png(tmp_path / "digit.png")

    with pytest.raises(SystemExit) as exit_info:
        run_stage(predict_stage.main, ["--dataset", "digits", "--version", "1", str(image)])

    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot load models:/digits/1 from {registry.tracking_uri}: its files are missing")
    assert lines[0].endswith("choose another version (--version) or evaluate again (dvc repro)")


def test_with_no_mlflow_database_predict_says_so_and_creates_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a clone where nothing was evaluated, predict is one line naming the missing database
    and what to run; it does not leave an empty mlflow.db behind."""
    database = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    image = write_png(tmp_path / "digit.png")

    with pytest.raises(SystemExit) as exit_info:
        run_stage(predict_stage.main, ["--dataset", "digits", str(image)])

    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"error: cannot load the digits model: there is no MLflow database at {database}, so nothing has been "
        "evaluated here; run dvc repro (evaluate logs and registers the models), or point MLFLOW_TRACKING_URI "
        "at the tracking server or database that holds them"
    ]
    assert not database.exists()


class _NanModel:
    """Answers class "b" with confidence 0.8, except NaN for the first image of each batch."""

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        probabilities = np.tile(np.array([[0.1, 0.8, 0.1]], dtype="float32"), (len(images), 1))
        probabilities[0] = np.nan
        return probabilities


def test_predict_does_not_label_a_nan_output_as_the_first_class(tmp_path: Path) -> None:
    """Before: the NaN row's argmax is 0, so the image was printed as class "a" with confidence
    nan, and the run exited 0 as if it had been classified."""
    loaded = LoadedModel(_NanModel(), ["a", "b", "c"], image_size=8, channels=1, uri="models:/toy/1")
    first, second = write_png(tmp_path / "1.png", 0), write_png(tmp_path / "2.png", 255)

    results, problems = predict(loaded, [first, second])

    assert [(path, label) for path, label, _ in results] == [(second, "b")]
    assert len(problems) == 1 and problems[0].startswith(f"{first}: ")


def test_a_run_of_another_dataset_is_refused_not_classified_with(
    registry: MlflowClient, tmp_path: Path, loaded: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--dataset digits --run <a toy run>` (an id pasted from the wrong experiment): before, the
    toy model classified the digits with toy's labels, exit 0. Now one line naming the run's own
    dataset. A run id MLflow cannot parse (a stray quote) is one line too, not a traceback."""
    register(registry, tmp_path, loaded, "toy")
    run = registry.get_model_version("toy", "1").run_id
    image = write_png(tmp_path / "digit.png")
    capsys.readouterr()

    for run_id, expected in [
        (run, f"error: run {run} is of the dataset toy, not digits: pass --dataset toy, or a run of the digits experiment"),
        (f"{run}'", f"error: cannot load the run {run}' from {registry.tracking_uri}: "),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run_stage(predict_stage.main, ["--dataset", "digits", "--run", run_id, str(image)])
        assert exit_info.value.code == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, captured.err
        assert lines[0].startswith(expected), lines[0]


def test_a_file_name_that_is_not_utf8_is_printed_as_its_bytes_not_a_traceback(
    registry: MlflowClient, tmp_path: Path, loaded: LoadedModel
) -> None:
    """`café.png` named in Latin-1 (a zip made on Windows, an old camera's card): its name is not
    UTF-8. In a UTF-8 locale (en_US.UTF-8; PYTHONIOENCODING=utf-8 here, which this machine's C
    locale would not be) Python's stdout refuses it. Before: UnicodeEncodeError's traceback at its
    line, the files after it and the summary lost, exit 1. Now its line holds the name's own bytes,
    as ls and find print it, so that the path can be used."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "photos"
    write_png(folder / "a.png", 0)
    write_png(Path(os.fsdecode(bytes(folder) + b"/caf\xe9.png")), 255)
    write_png(folder / "z.png", 0)
    register(registry, tmp_path, loaded, "toy")
    done = subprocess.run(
        [sys.executable, "-m", "stages.predict", "--dataset", "toy", str(folder)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, timeout=600,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 0, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "predict: 3 of 3 files classified with models:/toy@champion"
    lines = [line.split(b"\t")[:2] for line in done.stdout.splitlines()]
    assert lines == [[bytes(folder / "a.png"), b"a"], [bytes(folder) + b"/caf\xe9.png", b"c"], [bytes(folder / "z.png"), b"a"]]


def test_a_reader_that_stops_early_is_no_traceback(registry: MlflowClient, tmp_path: Path, loaded: LoadedModel) -> None:
    """`predict ... | head -1`: the reader closes the pipe before predict has written its lines.
    Before: BrokenPipeError's traceback (or Python's "Exception ignored ... BrokenPipeError") on
    stderr. Now the lines nobody reads are dropped, stderr says what it always says, exit 0."""
    import subprocess
    import sys

    folder = tmp_path / "photos"
    for i in range(3):
        write_png(folder / f"{i}.png", 0)
    register(registry, tmp_path, loaded, "toy")
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.predict", "--dataset", "toy", str(folder)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    process.stdout.close()  # as `head` does once it has its lines
    err = process.stderr.read()
    assert process.wait(600) == 0, err
    assert "BrokenPipeError" not in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "predict: 3 of 3 files classified with models:/toy@champion"


@pytest.mark.parametrize("level", [None, "0"])
def test_tensorflow_start_up_lines_are_hidden_unless_the_user_asks_for_them(
    registry: MlflowClient, tmp_path: Path, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, level: str | None
) -> None:
    """predict sets TF_CPP_MIN_LOG_LEVEL to 2 before TensorFlow is imported, but the lines its
    native libraries log while loading (abseil's notice, oneDNN's and cuda's info lines) ignore it
    (abseil/abseil-cpp#1957): they came on stderr, twice, on every call, among the files it could
    not classify. Now they are left out below the level. A level the user set is theirs: at 0
    they stay."""
    import subprocess
    import sys

    write_png(tmp_path / "photo.png", 0)
    register(registry, tmp_path, loaded, "toy")
    if level is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    done = subprocess.run(
        [sys.executable, "-m", "stages.predict", "--dataset", "toy", str(tmp_path / "photo.png")],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    below_errors = [line for line in done.stderr.splitlines() if line[:1] in "IW" and line[1:5].isdigit()]
    if level is None:
        assert below_errors == [] and "absl::InitializeLog" not in done.stderr, done.stderr
    else:
        # Which lines come depends on the processor (oneDNN's is said only where TensorFlow turns
        # oneDNN on: not on an AVX2-only AMD EPYC), but some always do (cuda's, the CPU guard's).
        assert below_errors, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "predict: 1 of 1 files classified with models:/toy@champion"


NGINX_404 = (b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n<center><h1>404 Not Found</h1>"
             b"</center>\r\n<hr><center>nginx/1.18.0</center>\r\n</body>\r\n</html>\r\n")
MLFLOW_401 = b"You are not authenticated. Please see https://www.mlflow.org/docs/latest/auth/index.html on how to authenticate."


@pytest.mark.parametrize(
    ("status", "body", "says"),
    [(401, MLFLOW_401, "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
     (404, NGINX_404, "is MLFLOW_TRACKING_URI the address of an MLflow tracking server")],
    ids=["401-not-authenticated", "nginx-404-page"],
)
@pytest.mark.parametrize("which", [[], ["--run", "0123456789abcdef0123456789abcdef"]], ids=["champion", "run"])
def test_a_server_that_refuses_us_or_is_not_mlflow_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, body: bytes, says: str, which: list[str],
) -> None:
    """A tracking server that wants a password (401), or a web server that is not MLflow (an nginx
    404 page): before, `--run` was MLflow's traceback (the HTML page printed in it), and the
    champion was "cannot load ...; evaluate and report first (dvc repro)", advice that misleads.
    Now one line naming the URI, without its password, and what to set; in a real process."""
    import subprocess
    import sys

    from tests.test_evaluate import answering

    write_png(tmp_path / "photo.png", 0)
    with answering(monkeypatch, status, body, userinfo="team:s3cret") as uri:
        done = subprocess.run(
            [sys.executable, "-m", "stages.predict", "--dataset", "digits", *which, str(tmp_path / "photo.png")],
            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    shown = uri.replace("s3cret", "***")
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith(f"error: MLflow tracking server {shown} answered {status}"), done.stderr
    assert says in done.stderr and "nothing was classified" in done.stderr and "s3cret" not in done.stderr
