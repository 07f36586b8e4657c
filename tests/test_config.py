"""params.yaml parsing: the repository's file loads, and every kind of mistake is one clear line."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from stages.config import RULES, ConfigError, Params, load_params, parse_params
from stages.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


@pytest.fixture(scope="module")
def repository_raw() -> dict[str, Any]:
    """The repository's params.yaml as plain data, loaded once."""
    return yaml.safe_load(PARAMS.read_text(encoding="utf-8"))


@pytest.fixture
def raw(repository_raw) -> dict[str, Any]:
    """A private deep copy of the repository's params, free to mutate."""
    return copy.deepcopy(repository_raw)


def config_error(raw: dict[str, Any]) -> str:
    """Parse `raw`, expecting a ConfigError; return its message after checking it is one line."""
    with pytest.raises(ConfigError) as caught:
        parse_params(raw, "params.yaml")
    message = str(caught.value)
    assert isinstance(caught.value, UserError)
    assert "\n" not in message
    assert message.startswith("params.yaml: ")
    return message


# --------------------------------------------------------------------------------------------
# The repository's params.yaml.


def test_repository_params_load_with_the_demo_catalog():
    """params.yaml loads: digits is a dataset, and both demo experiments are in suite demo."""
    params = load_params(PARAMS)

    assert isinstance(params, Params)
    assert "digits" in params.datasets
    assert set(params.experiments) >= {"digits-small_cnn", "digits-mobilenetv2"}
    assert params.experiments["digits-small_cnn"].suite == "demo"
    assert params.experiments["digits-mobilenetv2"].suite == "demo"
    assert set(params.suite_experiments("demo")) >= {"digits-small_cnn", "digits-mobilenetv2"}
    digits = params.dataset("digits")
    assert digits.source.kind == "sklearn"
    assert digits.layout.kind == "folders"
    # Bare YAML numbers in the class list are class names, not numbers.
    assert digits.classes == [str(i) for i in range(10)]
    assert digits.channels == 1


def test_experiment_merges_backbone_and_training_overrides():
    """experiment() applies backbone_overrides and train over the backbone and training defaults."""
    params = load_params(PARAMS)

    experiment = params.experiment("digits-mobilenetv2")

    assert experiment.name == "digits-mobilenetv2"
    assert experiment.dataset_name == "digits" and experiment.backbone_name == "mobilenetv2"
    assert experiment.backbone.model == "mobilenetv2"
    assert experiment.backbone.input_size == 32
    assert experiment.backbone.weights is None
    assert experiment.backbone.freeze is False
    assert experiment.backbone.options["alpha"] == 0.35
    # The head is not overridden, so it stays the backbone's.
    assert experiment.backbone.head == params.backbones["mobilenetv2"].head
    assert experiment.training.learning_rate == 0.002
    assert experiment.training.epochs == 15
    # Keys the experiment does not override keep the training defaults.
    assert experiment.training.batch_size == params.training.batch_size
    assert experiment.training.optimizer == params.training.optimizer
    # The registry entry itself is untouched by the experiment's overrides.
    assert params.backbones["mobilenetv2"].input_size == 224
    assert params.backbones["mobilenetv2"].weights == "imagenet"


def test_unknown_experiment_lists_the_valid_ones():
    """Params.experiment('nope') raises a one-line ConfigError naming the valid experiments."""
    params = load_params(PARAMS)

    with pytest.raises(ConfigError) as caught:
        params.experiment("nope")

    message = str(caught.value)
    assert "\n" not in message
    assert "'nope'" in message
    assert "digits-small_cnn" in message and "digits-mobilenetv2" in message


# --------------------------------------------------------------------------------------------
# Mistakes in the parsed mapping: each names the file, the dotted key and the valid choices.


def set_key(dotted: list[str], value: Any) -> Callable[[dict], None]:
    """A mutation setting raw[dotted[0]][dotted[1]]... to `value`."""

    def mutate(raw: dict) -> None:
        node = raw
        for key in dotted[:-1]:
            node = node[key]
        node[dotted[-1]] = value

    return mutate


def rename_experiment(old: str, new: str) -> Callable[[dict], None]:
    """A mutation renaming an experiment key, keeping its contents."""

    def mutate(raw: dict) -> None:
        raw["experiments"][new] = raw["experiments"].pop(old)

    return mutate


MISTAKES = {
    "unknown top-level key": (
        set_key(["trainig"], {"epochs": 3}),
        ["trainig: unknown key", "did you mean 'training'", "training, datasets, backbones, experiments, suites"],
    ),
    "unknown nested key": (
        set_key(["datasets", "digits", "sorce"], {"kind": "sklearn"}),
        ["datasets.digits.sorce: unknown key", "did you mean 'source'", "valid keys:", "layout"],
    ),
    "wrong type": (
        set_key(["training", "epochs"], "ten"),
        ["training.epochs:", "expected int", "'ten'"],
    ),
    "unknown backbone in an experiment": (
        set_key(["experiments", "digits-small_cnn", "backbone"], "small_cn"),
        ["experiments.digits-small_cnn.backbone:", "unknown backbone 'small_cn'", "valid: cifar10_cnn", "mobilenetv2", "small_cnn"],
    ),
    "unknown dataset in an experiment": (
        set_key(["experiments", "digits-small_cnn", "dataset"], "digitz"),
        ["experiments.digits-small_cnn.dataset:", "unknown dataset 'digitz'", "valid: birds", "digits", "ham10000"],
    ),
    "unknown suite": (
        set_key(["experiments", "digits-small_cnn", "suite"], "dmo"),
        ["experiments.digits-small_cnn.suite:", "unknown suite 'dmo'", "valid: course, demo"],
    ),
    "experiment not named dataset-backbone": (
        rename_experiment("digits-small_cnn", "digits-cnn"),
        ["experiments.digits-cnn:", "<dataset>-<backbone>", "'digits-small_cnn'"],
    ),
    "unknown source kind": (
        set_key(["datasets", "digits", "source"], {"kind": "kagle", "name": "x"}),
        ["datasets.digits.source.kind:", "unknown source kind 'kagle'", "local", "sklearn"],
    ),
    "bad source option": (
        set_key(["datasets", "digits", "source", "name"], "mnist"),
        ["datasets.digits.source.name:", "'mnist' is not allowed", "valid: digits"],
    ),
    "unknown layout kind": (
        set_key(["datasets", "digits", "layout"], {"kind": "cvs"}),
        ["datasets.digits.layout.kind:", "unknown layout kind 'cvs'", "did you mean 'csv'", "valid: csv, filename_pattern, folders, pixels_csv"],
    ),
    "unknown backbone model": (
        set_key(["backbones", "small_cnn", "model"], "vgg99"),
        ["backbones.small_cnn.model:", "unknown backbone model 'vgg99'", "cnn", "mobilenetv2", "resnet50v2"],
    ),
    "bad override key under train": (
        set_key(["experiments", "digits-small_cnn", "train", "epochz"], 3),
        ["experiments.digits-small_cnn.train.epochz:", "unknown key", "did you mean 'epochs'", "batch_size"],
    ),
    "bad override key under backbone_overrides": (
        set_key(["experiments", "digits-mobilenetv2", "backbone_overrides", "alpha"], 0.5),
        ["experiments.digits-mobilenetv2.backbone_overrides.alpha:", "unknown key", "input_size", "options"],
    ),
    "wrong type in an override": (
        set_key(["experiments", "digits-small_cnn", "train", "epochs"], "forty"),
        ["experiments.digits-small_cnn.train.epochs:", "expected int"],
    ),
    "bad Literal value": (
        set_key(["training", "optimizer"], "rmsprop"),
        ["training.optimizer:", "'rmsprop' is not allowed", "valid: adam, adamw, sgd"],
    ),
    "unknown hard validation rule": (
        set_key(["datasets", "digits", "validation", "hard"], ["min_per_class", "no_dupes"]),
        ["datasets.digits.validation.hard:", "unknown rule 'no_dupes'", ", ".join(RULES)],
    ),
    "a hard expected_count with no count to expect": (
        lambda raw: (set_key(["datasets", "digits", "validation", "hard"], ["min_per_class", "expected_count"])(raw),
                     set_key(["datasets", "digits", "validation", "expected_count"], None)(raw)),
        ["datasets.digits.validation.hard: 'expected_count' never runs without datasets.digits.validation.expected_count",
         "set the count the source documents, or remove it from hard"],
    ),
    "repeated class": (
        set_key(["datasets", "digits", "classes"], [0, 1, 1]),
        ["datasets.digits.classes:", "repeat"],
    ),
    "an image size of no pixels": (
        set_key(["datasets", "digits", "image_size"], 0),
        ["datasets.digits.image_size: 0 is out of range", "1 or more"],
    ),
    "split fractions summing to one": (
        set_key(["datasets", "digits", "split"], {"val": 0.5, "test": 0.5}),
        ["datasets.digits.split:", "sum below 1"],
    ),
    "zoom of a whole side": (
        set_key(["datasets", "digits", "augmentation", "zoom"], 1.0),
        ["datasets.digits.augmentation.zoom: 1.0 is out of range", "below 1"],
    ),
    "negative rotation": (
        set_key(["datasets", "digits", "augmentation", "rotation"], -5),
        ["datasets.digits.augmentation.rotation: -5", "0 to 180 (degrees)"],
    ),
    "contrast beyond what Keras can draw": (
        set_key(["datasets", "digits", "augmentation", "contrast"], 1.5),
        ["datasets.digits.augmentation.contrast: 1.5 is out of range", "0 to 1"],
    ),
    "a reference figure as a percentage": (
        set_key(["datasets", "digits", "reference"], {"course": 79, "published": 0.9}),
        ["datasets.digits.reference.course: 79 is not a fraction from 0 to 1", "write 0.79, not 79"],
    ),
    "a negative reference figure": (
        set_key(["datasets", "digits", "reference"], {"published": -0.2}),
        ["datasets.digits.reference.published: -0.2 is not a fraction from 0 to 1 (test accuracy)"],
    ),
    "no epochs": (
        set_key(["training", "epochs"], 0),
        ["training.epochs: 0 is out of range", "1 or more"],
    ),
    "negative epochs in an experiment": (
        set_key(["experiments", "digits-small_cnn", "train", "epochs"], -5),
        ["experiments.digits-small_cnn.train.epochs: -5 is out of range", "1 or more"],
    ),
    "empty batches": (
        set_key(["training", "batch_size"], 0),
        ["training.batch_size: 0 is out of range", "1 or more"],
    ),
    "negative learning rate": (
        set_key(["training", "learning_rate"], -1.0),
        ["training.learning_rate: -1.0 is out of range", "above 0"],
    ),
    "negative patience": (
        set_key(["training", "early_stopping_patience"], -1),
        ["training.early_stopping_patience: -1 is out of range", "0 or more"],
    ),
    "infinite learning rate": (
        set_key(["training", "learning_rate"], float("inf")),
        ["training.learning_rate: inf is out of range", "a finite number above 0"],
    ),
    "negative seed": (
        set_key(["training", "seed"], -1),
        ["training.seed: -1 is out of range", "use 0 to 2147482647"],
    ),
    "a seed the layers' seeds would overflow on PyTorch": (
        set_key(["training", "seed"], 2**31 - 1),
        ["training.seed: 2147483647 is out of range", "use 0 to 2147482647 (Keras's seeds are 32-bit"],
    ),
    "phase 2 asked of a base trained from scratch": (
        set_key(["experiments", "digits-small_cnn", "train", "fine_tune"], {"epochs": 3}),
        ["experiments.digits-small_cnn.train.fine_tune.epochs: 3 asks for phase 2, which only a pretrained frozen base has",
         "backbone small_cnn trains from scratch (weights: null); set it to 0 or remove it"],
    ),
    "negative fine-tuning layers in an experiment": (
        set_key(["experiments", "digits-small_cnn", "train", "fine_tune"], {"unfreeze": -1}),
        ["experiments.digits-small_cnn.train.fine_tune.unfreeze: -1 is out of range", "0 (every layer) or more"],
    ),
    "negative images per class": (
        set_key(["datasets", "digits", "validation", "min_per_class"], -100),
        ["datasets.digits.validation.min_per_class: -100 is out of range", "0 or more"],
    ),
    "undecodable fraction above one": (
        set_key(["datasets", "digits", "validation", "max_undecodable_fraction"], 5),
        ["datasets.digits.validation.max_undecodable_fraction: 5.0 is out of range", "[0, 1]"],
    ),
    "null where a number is required": (
        set_key(["datasets", "digits", "image_size"], None),
        ["datasets.digits.image_size:", "expected int", "None"],
    ),
    "head dropout of 1 or more": (
        set_key(["backbones", "mobilenetv2", "head", "dropout"], 1.5),
        ["backbones.mobilenetv2.head.dropout: 1.5 is out of range", "below 1"],
    ),
    "a dense layer of no units": (
        set_key(["backbones", "mobilenetv2", "head", "dense"], [0]),
        ["backbones.mobilenetv2.head.dense: [0] has a layer of no units", "1 or more"],
    ),
    "cnn filters that are not numbers": (
        set_key(["backbones", "small_cnn", "options", "filters"], ["a"]),
        ["backbones.small_cnn.options.filters: ['a'] is not a list of whole numbers of 1 or more"],
    ),
    "cnn dropout that is not a number": (
        set_key(["backbones", "small_cnn", "options", "dropout"], "x"),
        ["backbones.small_cnn.options.dropout: 'x' is not a number of 0 or more, below 1"],
    ),
    "cnn option misspelt": (
        set_key(["backbones", "small_cnn", "options", "filtres"], [8]),
        ["backbones.small_cnn.options.filtres: unknown option; valid: filters, convs_per_block"],
    ),
    "an experiment's backbone override out of range": (
        set_key(["experiments", "digits-mobilenetv2", "backbone_overrides", "head"], {"dropout": 1.0}),
        ["experiments.digits-mobilenetv2.backbone_overrides.head.dropout: 1.0 is out of range"],
    ),
    "an experiment's input size below 1": (
        set_key(["experiments", "digits-mobilenetv2", "backbone_overrides", "input_size"], -4),
        ["experiments.digits-mobilenetv2.backbone_overrides.input_size: -4 is out of range", "32 or more"],
    ),
    "an experiment's cnn option override": (
        set_key(["experiments", "digits-small_cnn", "backbone_overrides"], {"options": {"convs_per_block": 0}}),
        ["experiments.digits-small_cnn.backbone_overrides.options.convs_per_block: 0 is not a whole number"],
    ),
    "a pretrained family's option misspelt": (
        set_key(["experiments", "digits-mobilenetv2", "backbone_overrides", "options"], {"alpah": 0.35}),
        ["experiments.digits-mobilenetv2.backbone_overrides.options.alpah: unknown option; valid: alpha"],
    ),
    "an option the pipeline sets": (
        set_key(["backbones", "mobilenetv2", "options"], {"include_top": True}),
        ["backbones.mobilenetv2.options.include_top: is set by the pipeline, not an option; remove it"],
    ),
    "an option for a family that takes none": (
        set_key(["backbones", "efficientnetb0", "options"], {"alpha": 0.5}),
        ["backbones.efficientnetb0.options.alpha: unknown option; efficientnetb0 takes no options"],
    ),
    "a width multiplier that is not one": (
        set_key(["experiments", "digits-mobilenetv2", "backbone_overrides", "options"], {"alpha": 0}),
        ["experiments.digits-mobilenetv2.backbone_overrides.options.alpha: 0 is not a width multiplier"],
    ),
    "imagenet weights for the custom cnn": (
        set_key(["experiments", "digits-small_cnn", "backbone_overrides"], {"weights": "imagenet"}),
        ["experiments.digits-small_cnn.backbone_overrides.weights: cnn has no pretrained weights; set weights: null"],
    ),
    "a dataset name DVC stages cannot hold": (
        lambda raw: raw["datasets"].__setitem__("my digits", copy.deepcopy(raw["datasets"]["digits"])),
        ["datasets.my digits: 'my digits' cannot name DVC stages and folders", "use letters, digits and _"],
    ),
    "a dotted dataset name (DVC reads datasets.my.digits.source as a path)": (
        lambda raw: raw["datasets"].__setitem__("my.digits", copy.deepcopy(raw["datasets"]["digits"])),
        ["datasets.my.digits: 'my.digits' cannot name DVC stages and folders"],
    ),
    "a suite no experiment is in": (
        set_key(["suites", "empty"], {"rank_by": "accuracy"}),
        ["suites.empty: no experiment is in this suite", "give an experiment suite: empty, or remove the suite"],
    ),
    "a single class": (
        set_key(["datasets", "digits", "classes"], ["0"]),
        ["datasets.digits.classes: ['0'] has fewer than two classes"],
    ),
    "a cnn with more pooling blocks than its input has halvings": (
        set_key(["backbones", "small_cnn", "options", "filters"], [32, 64, 64, 64, 64]),
        ["experiments.digits-small_cnn: backbone small_cnn has 5 pooling blocks", "its input is 16 px; use at most 4"],
    ),
    "a class_map key yaml read as a boolean": (
        set_key(["datasets", "digits", "layout", "class_map"], {True: "0"}),
        ["datasets.digits.layout.class_map: the key True was read as a boolean", "quote it, e.g. 'yes':"],
    ),
    "a class yaml read as a boolean": (
        set_key(["datasets", "digits", "classes"], [False, "1"]),
        ["datasets.digits.classes[0]: expected str, got a boolean False; YAML reads bare yes/no", "quote it if it is a name"],
    ),
    "a weights_url that is a local file": (
        set_key(["backbones", "mobilenetv2", "weights_url"], "file:///tmp/w.h5"),
        ["backbones.mobilenetv2.weights_url: 'file:///tmp/w.h5' is not an http(s) URL", "where the weights stage says"],
    ),
    # What a source or layout can check with nothing fetched, checked as params.yaml is read.
    "a kaggle reference pasted as a URL": (
        set_key(["datasets", "gtsrb", "source", "dataset"], "https://www.kaggle.com/datasets/a/b"),
        ["params.yaml: datasets.gtsrb.source.dataset: 'https://www.kaggle.com/datasets/a/b' is not an <owner>/<slug>",
         "use the part after kaggle.com/datasets/"],
    ),
    "a kaggle source with both a dataset and a competition": (
        set_key(["datasets", "gtsrb", "source", "competition"], "gtsrb"),
        ["datasets.gtsrb.source: a kaggle source needs exactly one of"],
    ),
    "a kaggle file listed twice, once with ./": (
        set_key(["datasets", "gtsrb", "source", "files"], ["Train.csv", "./Train.csv"]),
        ["datasets.gtsrb.source.files: lists Train.csv twice ('./Train.csv'); list each file once"],
    ),
    "a url source whose sha256 is an md5": (
        set_key(["datasets", "digits", "source"],
                {"kind": "url", "url": "https://example.org/d.zip", "sha256": "d41d8cd98f00b204e9800998ecf8427e"}),
        ["datasets.digits.source.sha256: 'd41d8cd98f00b204e9800998ecf8427e' is not a sha256", "sha256sum <file>"],
    ),
    "a local source with no path": (
        set_key(["datasets", "mango", "source", "path"], ""),
        ["datasets.mango.source.path: empty; give the dataset's folder or archive"],
    ),
    "an open images source asking for no images": (
        set_key(["datasets", "openimages_animals", "source", "per_class"], 0),
        ["datasets.openimages_animals.source.per_class: 0 images per class; ask for at least 1"],
    ),
    "a file name pattern that does not compile": (
        set_key(["datasets", "food11", "layout", "pattern"], "(?P<label>\\d+_\\d+\\.jpg"),
        ["datasets.food11.layout.pattern:", "is not a regular expression (missing ), unterminated subpattern"],
    ),
    "a file name pattern without the label group": (
        set_key(["datasets", "food11", "layout", "pattern"], "(\\d+)_\\d+\\.jpg"),
        ["datasets.food11.layout.pattern:", "has no named group for the label; write (?P<label>...)"],
    ),
    "a group pattern without the group": (
        set_key(["datasets", "gtsrb", "layout", "group_pattern"], "Train/(\\d+)_"),
        ["datasets.gtsrb.layout.group_pattern: 'Train/(\\\\d+)_' has no named group; write (?P<group>...)"],
    ),
    "a csv layout with a path column and a template": (
        set_key(["datasets", "ham10000", "layout", "path_column"], "image_id"),
        ["datasets.ham10000.layout: set exactly one of datasets.ham10000.layout.path_column and"],
    ),
    "a layout root outside the raw folder": (
        set_key(["datasets", "garbage", "layout", "root"], "../elsewhere"),
        ["datasets.garbage.layout.root: '../elsewhere' is not a folder inside the raw folder"],
    ),
    "a csv file outside the raw folder": (
        set_key(["datasets", "covid19", "layout", "file"], "/home/me/metadata.csv"),
        ["datasets.covid19.layout.file: '/home/me/metadata.csv' is not a file inside the raw folder"],
    ),
    "a pixels csv split map to no split": (
        set_key(["datasets", "fer2013_csv", "layout", "split_map", "PublicTest"], "validation"),
        ["datasets.fer2013_csv.layout.split_map.PublicTest: 'validation' is not a split; valid: train, val, test"],
    ),
}


@pytest.mark.parametrize("case", list(MISTAKES), ids=list(MISTAKES))
def test_mistake_is_one_line_naming_file_key_and_choices(raw, case):
    """Each kind of mistake raises a one-line ConfigError with the file, dotted key and choices."""
    mutate, expected = MISTAKES[case]
    mutate(raw)

    message = config_error(raw)

    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


def test_required_key_missing_is_named(raw):
    """A dataset without its required classes names the missing key."""
    del raw["datasets"]["digits"]["classes"]

    message = config_error(raw)

    assert "datasets.digits.classes: required key is missing" in message


def declared_dataset_keys() -> list[str]:
    """The keys of a dataset entry that some stage of dvc.yaml declares as a param."""
    text = (REPO / "dvc.yaml").read_text(encoding="utf-8")
    return sorted(set(re.findall(r"datasets\.\$\{[\w.]+\}\.(\w+)", text)))


def test_dvc_yaml_declares_the_dataset_keys_expected():
    """The parametrization below is read from dvc.yaml; it must find the stages' keys."""
    assert {"source", "classes", "image_size", "augmentation", "metric"} <= set(declared_dataset_keys())


@pytest.mark.parametrize("key", declared_dataset_keys())
def test_every_key_a_stage_declares_is_required(raw, key):
    """A key dvc.yaml declares as a stage's param has no default: leaving it out is named up
    front, not by DVC when it reaches that stage after the ones before it have run."""
    del raw["datasets"]["digits"][key]

    message = config_error(raw)

    assert f"datasets.digits.{key}: required key is missing" in message


def test_top_level_must_be_a_mapping():
    """A params file holding a list, not a mapping, is a ConfigError."""
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        parse_params(["training"], "params.yaml")


def test_the_source_name_is_used_in_messages(raw):
    """The file name passed to parse_params is the one the message starts with."""
    raw["training"]["epochs"] = "ten"

    with pytest.raises(ConfigError) as caught:
        parse_params(raw, "elsewhere/custom.yaml")

    assert str(caught.value).startswith("elsewhere/custom.yaml: training.epochs:")


def test_unknown_top_level_key_does_not_offer_the_internal_path_field(raw):
    """The valid keys offered for a top-level typo are only the ones a user may write."""
    raw["trainig"] = {}

    message = config_error(raw)

    assert message.endswith("valid keys: training, datasets, backbones, experiments, suites")


def test_overridden_backbone_model_is_checked_against_the_registry(raw):
    """backbone_overrides.model naming no registered model is refused when params are loaded."""
    raw["experiments"]["digits-mobilenetv2"]["backbone_overrides"]["model"] = "mobilenetv9"

    message = config_error(raw)

    assert "experiments.digits-mobilenetv2.backbone_overrides.model" in message
    assert "mobilenetv2" in message


def test_float_channels_are_refused(raw):
    """channels: 1.0 is refused with the values allowed, never kept as a float (the arrays'
    shape and the models' input take an integer)."""
    raw["datasets"]["digits"]["channels"] = 1.0

    assert config_error(raw) == "params.yaml: datasets.digits.channels: 1.0 is not allowed; valid: 1, 3"


# --------------------------------------------------------------------------------------------
# Files: invalid YAML, a missing file, and the one-line error contract of a stage.


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("training:\n  epochs: [1, 2\n", "line 3: not valid YAML ("),
        # PyYAML keeps the last of two equal keys silently (a stage would train with it); DVC
        # refuses the file in a dozen lines.
        ("training:\n  epochs: 5\n  seed: 1\n  epochs: 50\n", "line 4: not valid YAML (duplicate key 'epochs'"),
    ],
    ids=["syntax error", "key given twice"],
)
def test_invalid_yaml_is_one_line_with_file_and_line(tmp_path, text, said):
    """A YAML syntax error, or a key given twice, is a one-line ConfigError naming the file and the line."""
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_params(path)

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {said}")


def test_missing_file_is_one_line_naming_it(tmp_path):
    """A params path that does not exist is a one-line ConfigError naming the path."""
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError) as caught:
        load_params(path)

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not found")


def test_stage_reports_a_broken_params_file_in_one_line_without_traceback(tmp_path, repository_raw):
    """A stage run on a broken params file exits 1 with exactly one 'error:' line on stderr."""
    broken = copy.deepcopy(repository_raw)
    broken["datasets"]["digits"]["sorce"] = {"kind": "sklearn"}
    params = tmp_path / "broken.yaml"
    params.write_text(yaml.safe_dump(broken), encoding="utf-8")
    out = tmp_path / "raw"

    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.fetch",
            "--dataset",
            "digits",
            "--out",
            str(out),
            "--provenance",
            str(tmp_path / "provenance.json"),
            "--params",
            str(params),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 1
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: ")
    assert "datasets.digits.sorce" in lines[0] and "Traceback" not in completed.stderr
    assert not out.exists()


def test_unquoted_on_and_off_mean_the_settings_not_booleans(raw):
    """YAML 1.1 reads `off` as false; settings that offer on/off take it as written."""
    training = yaml.safe_load("jit_compile: on\nmixed_precision: off\ndistribution: off\nfeature_cache: off\n")
    assert training["distribution"] is False  # what the YAML parser hands over
    raw["training"].update(training)
    parsed = parse_params(raw, "params.yaml").training
    assert (parsed.jit_compile, parsed.mixed_precision, parsed.distribution, parsed.feature_cache) == ("on", "off", "off", "off")
    raw["training"]["distribution"] = True  # `on` is not one of distribution's settings
    assert "training.distribution: True is not allowed; valid: off, data_parallel" in config_error(raw)


def test_config_command_checks_the_whole_file(tmp_path, repository_raw):
    """`python -m stages.config` passes the repository's params.yaml and names a misspelt
    backbone, the error DVC would otherwise report only as a missing param."""
    ok = subprocess.run([sys.executable, "-m", "stages.config"], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("params.yaml: ok (") and f"{len(repository_raw['experiments'])} experiments" in ok.stdout

    broken = copy.deepcopy(repository_raw)
    broken["experiments"]["digits-small_cnn"]["backbone"] = "small_cn"
    params = tmp_path / "broken.yaml"
    params.write_text(yaml.safe_dump(broken), encoding="utf-8")
    failed = subprocess.run([sys.executable, "-m", "stages.config", "--params", str(params)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)

    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.splitlines() == [failed.stderr.strip()]
    assert failed.stderr.startswith(
        f"error: {params}: experiments.digits-small_cnn.backbone: unknown backbone 'small_cn' (did you mean 'small_cnn'?)")


def test_a_number_written_1e_3_is_read_as_dvc_reads_it(tmp_path, raw):
    """YAML 1.2, which DVC reads params.yaml as, reads `1e-3` as a number; PyYAML alone would
    read text and the learning rate would be refused. A quoted '1e-3' is still text."""
    text = yaml.safe_dump(raw, sort_keys=False).replace(
        f"learning_rate: {raw['training']['learning_rate']}", "learning_rate: 1e-3", 1
    )
    assert "learning_rate: 1e-3" in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").training.learning_rate == 0.001

    (tmp_path / "params.yaml").write_text(text.replace("learning_rate: 1e-3", "learning_rate: '1e-3'", 1))
    with pytest.raises(ConfigError, match="training.learning_rate: expected float, got a string '1e-3'"):
        load_params(tmp_path / "params.yaml")


def test_yaml_merge_keys_are_read_and_their_keys_can_be_overridden(tmp_path, raw):
    """`<<: *anchor` (a backbone entry built on another): DVC reads it, and so do the stages. It
    was refused as "not valid YAML"; a key given beside the merge overrides the merged one."""
    text = yaml.safe_dump(raw, sort_keys=False)
    text = text.replace("  small_cnn:\n", "  small_cnn: &small\n", 1)
    text = text.replace("\nexperiments:\n", "\n  tiny_cnn:\n    <<: *small\n    head: {pool: avg}\nexperiments:\n", 1)
    (tmp_path / "params.yaml").write_text(text)

    params = load_params(tmp_path / "params.yaml")

    assert params.backbones["tiny_cnn"].options == params.backbones["small_cnn"].options
    assert params.backbones["tiny_cnn"].head.pool == "avg" and params.backbones["small_cnn"].head.pool == "flatten"


def test_two_merge_keys_in_one_mapping_are_refused_as_dvc_refuses_them(tmp_path, raw):
    text = yaml.safe_dump(raw, sort_keys=False).replace("  small_cnn:\n", "  small_cnn: &small\n", 1)
    text = text.replace("\nexperiments:\n", "\n  tiny_cnn:\n    <<: *small\n    <<: *small\nexperiments:\n", 1)
    (tmp_path / "params.yaml").write_text(text)

    with pytest.raises(ConfigError, match=r"line \d+: not valid YAML \(the merge key << is given twice .*<<: \[\*a, \*b\]\)"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(("written", "dvc_reads"), [("010", "10"), ("1:04", "'1:04' (text)")])
def test_an_integer_yaml_1_1_and_dvc_read_differently_is_refused(tmp_path, raw, written, dvc_reads):
    """PyYAML reads 010 as 8 and 1:04 as 64; DVC (YAML 1.2) reads {dvc_reads}. The stages would
    train on one value while DVC tracks the other."""
    text = yaml.safe_dump(raw, sort_keys=False).replace("batch_size: 64", f"batch_size: {written}", 1)
    assert f"batch_size: {written}" in text
    (tmp_path / "params.yaml").write_text(text)

    with pytest.raises(ConfigError) as caught:
        load_params(tmp_path / "params.yaml")

    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'params.yaml'}: line ")
    assert f"'{written}' is a different number in YAML 1.1 and in YAML 1.2 (DVC's reading)" in message


def test_a_bare_yes_key_in_a_class_map_is_refused_with_how_to_quote_it(tmp_path, raw):
    """Folders named yes/ and no/ (a brain-MRI dataset) mapped with `class_map: {yes: tumor}`: the
    bare key was read as True, became 'True', and matched no folder: every image set aside."""
    text = yaml.safe_dump(raw, sort_keys=False).replace(
        "kind: folders\n", "kind: folders\n      class_map: {yes: '0', no: '1'}\n", 1
    )
    assert "class_map: {yes: '0'" in text
    (tmp_path / "params.yaml").write_text(text)

    with pytest.raises(ConfigError, match=r"layout.class_map: the key True was read as a boolean .*quote it"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(text.replace("{yes: '0', no: '1'}", "{'yes': '0', 'no': '1'}"))
    assert load_params(tmp_path / "params.yaml").datasets["digits"].layout.options.class_map == {"yes": "0", "no": "1"}


@pytest.mark.parametrize(
    "quoted", ["class_map: {'yes': '0', 'no': '1'}", "class_map: {'0': 'no', '1': 'yes'}"], ids=["key", "value"]
)
def test_a_quoted_yes_that_dvc_exp_run_set_wrote_bare_says_so(tmp_path, raw, quoted):
    """`dvc exp run -S <any key>=...` writes params.yaml back through DVC's YAML 1.2 writer, which
    drops the quotes the refusal above asks for (to YAML 1.2 a bare yes is text). The refusal then
    told the user to quote what they had quoted; it says -S removed them and what to do instead."""
    from dvc.utils.hydra import apply_overrides

    text = yaml.safe_dump(raw, sort_keys=False).replace("kind: folders\n", f"kind: folders\n      {quoted}\n", 1)
    params = tmp_path / "params.yaml"
    params.write_text(text)
    load_params(params)
    apply_overrides(params, ["experiments.digits-small_cnn.train.epochs=1"])  # what `dvc exp run -S` runs
    assert "'yes'" not in params.read_text() and "'no'" not in params.read_text()  # the quotes are gone

    with pytest.raises(ConfigError) as caught:
        load_params(params)
    message = str(caught.value)
    assert "\n" not in message and "quote it" in message
    assert "dvc exp run -S" in message and "edit params.yaml by hand" in message

# --------------------------------------------------------------------------------------------
# Mistakes that passed `python -m stages.config` and failed later, or whose line misled.

DIGITS_ENTRY = """
  2020:
    source: {kind: sklearn, name: digits}
    layout: {kind: folders}
    classes: [0, 1, 2]
    image_size: 16
    channels: 1
    split: {}
    validation: {}
    augmentation: {}
    reference: {}
    metric: auto
"""


def test_a_bare_numeric_dataset_name_is_refused_with_how_to_quote_it(tmp_path):
    """`2020:` is read as the number 2020. The stages took it as the name '2020', but DVC's
    foreach makes no fetch@/validate@/split@ stage for a number key: train@2020-small_cnn then
    failed in DVC with "No such file or directory: data/processed/2020"."""
    text = PARAMS.read_text(encoding="utf-8")
    text = text.replace("datasets:\n", "datasets:" + DIGITS_ENTRY, 1)
    text = text.replace("experiments:\n", "experiments:\n  2020-small_cnn: {suite: demo, dataset: 2020, backbone: small_cnn}\n", 1)
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_params(tmp_path / "params.yaml")

    message = str(caught.value)
    assert "datasets.2020:" in message and "quote" in message


def test_a_bare_numeric_suite_name_is_config_error(raw):
    raw["suites"][2024] = {}
    raw["experiments"]["digits-small_cnn"]["suite"] = 2024

    assert "suites.2024:" in config_error(raw)


def test_a_mobilenetv2_width_with_no_imagenet_file_is_refused_when_params_are_read(raw):
    """alpha 0.3 is a valid width, but Keras publishes ImageNet weights for 0.35, 0.5, 0.75, 1.0,
    1.3 and 1.4 only. `python -m stages.config` said ok; weights@ refused it, after DVC had run
    fetch@ and validate@ of the dataset (plan_repro order for train@ham10000-mobilenetv2)."""
    raw["experiments"]["ham10000-mobilenetv2"]["backbone_overrides"] = {"options": {"alpha": 0.3}}

    message = config_error(raw)

    assert "experiments.ham10000-mobilenetv2.backbone_overrides.options.alpha" in message
    assert "0.35" in message and "1.4" in message


@pytest.mark.parametrize(
    ("pins", "said"),
    [
        ({"weights_url": "https://mirror.example/w.h5"}, "backbones.vgg16.weights_sha256: required with weights_url"),
        ({"weights_url": "https://mirror.example/w.h5", "weights_sha256": "abc"},
         "backbones.vgg16.weights_sha256: 'abc' is not a sha256"),
    ],
    ids=["url without sha256", "sha256 not a sha256"],
)
def test_a_mirror_without_a_usable_pin_is_refused_when_params_are_read(raw, pins, said):
    raw["backbones"]["vgg16"].update(pins)

    assert said in config_error(raw)


def test_weights_none_says_that_null_is_the_way_to_train_from_scratch(raw):
    """`weights: none` (as class_weight: none and flip: none are written) said
    "valid: imagenet", as if ImageNet weights were the only choice."""
    raw["backbones"]["vgg16"]["weights"] = "none"

    message = config_error(raw)

    assert "backbones.vgg16.weights:" in message and "null" in message


def test_an_optional_number_given_as_text_says_null_is_allowed(raw):
    raw["backbones"]["vgg16"]["input_size"] = "auto"

    message = config_error(raw)

    assert "backbones.vgg16.input_size:" in message and "null" in message


def test_dataset_names_differing_only_in_case_are_config_error(raw):
    """data/raw/Digits and data/raw/digits are one folder on macOS's and Windows' file systems."""
    raw["datasets"]["Digits"] = copy.deepcopy(raw["datasets"]["digits"])

    message = config_error(raw)

    assert "datasets.Digits" in message and "digits" in message


def test_a_numeric_name_is_not_shown_quoted_as_its_number_but_as_written(tmp_path):
    """`2020_01:` is the number 202001 to YAML (DVC's too): it was refused with "quote it as
    written, e.g. '202001':", a name the file never had; so is `1e3:`, with "'1000.0':"."""
    for written, read in (("2020_01", "'202001'"), ("1e3", "'1000.0'")):
        text = PARAMS.read_text(encoding="utf-8").replace("datasets:\n", "datasets:" + DIGITS_ENTRY.replace("2020:", f"{written}:"), 1)
        (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            load_params(tmp_path / "params.yaml")
        assert "quote" in str(caught.value) and read not in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    "pins", [{}, {"weights_url": "https://mirror.example/mnv3_no_top.h5", "weights_sha256": "a" * 64}],
    ids=["published", "weights_url"],
)
def test_a_pretrained_family_with_no_weights_file_listed_is_refused_when_params_are_read(raw, monkeypatch, pins):
    """A keras.applications row added as docs/extending.md shows, `weights: imagenet`, and no file
    in stages/weights.py's PUBLISHED: "ok" here, then the weights stage's refusal, which DVC may
    run after the dataset's download (a weights_url does not stand in: the stage needs the file name
    Keras asks for)."""
    from stages import backbones

    monkeypatch.setitem(backbones.REGISTRY, "mobilenetv3small", None)  # removed again after the test
    backbones.register_backbone("mobilenetv3small", preprocessing="none", native_input_size=224,
                                min_input_size=32)(backbones._application("MobileNetV3Small"))
    raw["backbones"]["mnv3"] = {"model": "mobilenetv3small", "weights": "imagenet", **pins}

    message = config_error(raw)

    assert message.startswith("params.yaml: backbones.mnv3.weights: mobilenetv3small has no ImageNet weights file "
                              "listed in stages/weights.py (PUBLISHED); add it there, or set weights: null")


def test_a_phase_two_unfreezing_more_layers_than_the_base_has_is_refused_when_params_are_read(raw):
    """The default `unfreeze: 20` is more than VGG16's 19 layers: an experiment that inherits it
    was refused by train@, after fetch, validate, split and weights had run. The line names the
    inherited key, the experiment, and the key to set."""
    raw["experiments"]["food11-vgg16"].pop("train")

    message = config_error(raw)

    assert message == (
        "params.yaml: training.fine_tune.unfreeze: 20 (inherited by experiments.food11-vgg16) is more than the 19 "
        "layers of vgg16's base; set experiments.food11-vgg16.train.fine_tune.unfreeze to at most 19, or 0 for all of them"
    )


def test_an_experiments_own_unfreeze_beyond_its_base_is_named_under_the_experiment(raw):
    raw["experiments"]["food11-vgg16"]["train"] = {"fine_tune": {"unfreeze": 25}}

    assert config_error(raw) == (
        "params.yaml: experiments.food11-vgg16.train.fine_tune.unfreeze: 25 is more than the 19 layers of vgg16's "
        "base; use at most 19, or 0 for all of them"
    )


@pytest.mark.parametrize(
    "change",
    [
        {"train": {"fine_tune": {"epochs": 0}}},  # no phase 2
        {"backbone_overrides": {"freeze": False}},  # the whole base trains in phase 1: no phase 2
        {"backbone_overrides": {"weights": None, "freeze": False}},  # from scratch: no phase 2
        {"train": {"fine_tune": {"unfreeze": 19}}},  # every layer, counted
        {"train": {"fine_tune": {"unfreeze": 0}}},  # every layer
    ],
    ids=["no fine-tuning epochs", "not frozen", "from scratch", "all 19 layers", "unfreeze 0"],
)
def test_an_unfreeze_beyond_the_base_is_only_refused_where_there_is_a_phase_two(raw, change):
    raw["experiments"]["food11-vgg16"].pop("train")
    raw["experiments"]["food11-vgg16"].update(change)

    parse_params(raw, "params.yaml")


def test_an_unfreeze_beyond_an_efficientnet_package_base_is_refused_when_params_are_read(raw):
    """The efficientnet package's bases (TensorFlow only) have their layer counts in the table
    too: B7's has 806, none of them a Rescaling added for the ImageNet weights."""
    raw["experiments"]["food11-efn_b7"]["train"] = {"fine_tune": {"unfreeze": 807}}

    assert config_error(raw) == (
        "params.yaml: experiments.food11-efn_b7.train.fine_tune.unfreeze: 807 is more than the 806 layers of efn_b7's "
        "base; use at most 806, or 0 for all of them"
    )
    raw["experiments"]["food11-efn_b7"]["train"] = {"fine_tune": {"unfreeze": 806}}
    parse_params(raw, "params.yaml")


def test_every_family_with_a_phase_two_has_its_layer_count_for_params():
    """Phase 2 is for a pretrained base only, so each pretrained family needs its count for the
    check when params are read; the custom CNN has no pretrained weights (weights: imagenet is
    refused for it), so no phase 2 and no count."""
    from stages import backbones

    for name in backbones.list_backbones():
        pretrained = backbones.get_backbone(name).pretrained
        assert (backbones.base_layers(name, pretrained=True) is not None) == pretrained, name


def test_a_custom_cnns_unfreeze_is_not_refused_by_params_and_train_says_it_is_not_applied(raw, capsys):
    """A custom CNN trains from scratch: it never has a phase 2, so no `unfreeze` is too many for
    it when params are read, and train@ says in one line that the key is not applied."""
    from stages.train import _check_plan, plan_phases

    raw["experiments"]["cifar10-cifar10_cnn"]["train"]["fine_tune"] = {"unfreeze": 100000}

    experiment = parse_params(raw, "params.yaml").experiment("cifar10-cifar10_cnn")
    _check_plan(experiment, plan_phases(experiment), None, train_images=10**6)

    assert [phase.number for phase in plan_phases(experiment)] == [1]
    assert capsys.readouterr().out.splitlines()[-1] == (
        "train@cifar10-cifar10_cnn: experiments.cifar10-cifar10_cnn.train.fine_tune.unfreeze is not applied: there is "
        "no phase 2, as it trains from scratch (phase 2 is for a pretrained frozen base)"
    )
