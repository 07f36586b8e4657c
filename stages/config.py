"""params.yaml parsed into typed, validated objects.

Every stage reads its configuration through `load_params`. Parsing is strict: an unknown key, a
wrong type, or a name that points nowhere (an experiment's dataset or backbone, a source or layout
kind, a backbone's model) raises a `UserError` whose one line names the file, the dotted key and
the valid choices. Sources, layouts and backbones each own the schema of their options, so adding
one to a registry adds its keys here too.

`python -m stages.config` checks a whole params file at once: DVC checks only that each key a
stage declares exists, so a misspelt name otherwise surfaces as DVC's "Parameters ... are missing
from 'params.yaml'" rather than as the line naming the valid choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import unicodedata
import difflib
import math
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stages.errors import UserError, run_stage
from stages.expectations import RULES

PARAMS_FILE = "params.yaml"
SPLITS = ("train", "val", "test")


class ConfigError(UserError):
    """A problem in params.yaml, reported as `<file>: <key>: <what is wrong>`."""


# --------------------------------------------------------------------------------------------
# The schema. Defaults here are the documented defaults; params.yaml states the ones that matter.


@dataclass(frozen=True)
class ComponentConfig:
    """A registry entry chosen by `kind`, with the options that kind declares."""

    kind: str
    options: Any


@dataclass(frozen=True)
class SplitPolicy:
    # Fractions of the files whose split the source leaves open: with no source splits, of the
    # whole dataset; when the source defines train and test only, val is this share of train.
    val: float = 0.15
    test: float = 0.15
    seed: int = 42


@dataclass(frozen=True)
class ValidationRules:
    min_per_class: int = 1
    max_undecodable_fraction: float = 0.05
    min_side: int = 1
    max_side: int = 20000
    expected_count: int | None = None
    expected_count_tolerance: float = 0.02
    # Rules whose failure stops the pipeline; the others only warn in the report.
    hard: list[str] = field(
        default_factory=lambda: [
            "labels_in_class_set",
            "undecodable_fraction",
            "min_per_class",
            "image_size_bounds",
            "no_conflicting_labels",
        ]
    )


@dataclass(frozen=True)
class Augmentation:
    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    rotation: float = 0.0
    zoom: float = 0.0
    translation: float = 0.0
    contrast: float = 0.0


@dataclass(frozen=True)
class Reference:
    # Test accuracy as a fraction; None where the course or the literature does not say.
    course: float | None = None
    published: float | None = None
    note: str = ""


@dataclass(frozen=True)
class DatasetConfig:
    # Every key a stage declares in dvc.yaml is required here: DVC refuses to run a stage whose
    # declared param key is absent from params.yaml, so a default would only move the error.
    # An empty mapping (`augmentation: {}`) takes the documented defaults.
    source: ComponentConfig
    layout: ComponentConfig
    classes: list[str]
    image_size: int
    channels: Literal[1, 3]
    split: SplitPolicy
    validation: ValidationRules
    augmentation: Augmentation
    reference: Reference
    # The metric that picks the champion: auto is balanced accuracy for imbalanced classes.
    metric: Literal["auto", "accuracy", "balanced_accuracy", "macro_f1"]
    description: str = ""


@dataclass(frozen=True)
class HeadConfig:
    pool: Literal["avg", "flatten"] = "avg"
    dense: list[int] = field(default_factory=list)
    dropout: float = 0.2


@dataclass(frozen=True)
class BackboneConfig:
    model: str
    # None: the family's native size (224 for most keras.applications families, 299 for
    # InceptionV3), or the dataset's working resolution for a family with none (the custom CNNs).
    input_size: int | None = None
    weights: Literal["imagenet"] | None = None
    # Where the ImageNet weights file comes from when not from its published URL (a team's mirror,
    # say); the file's sha256 is then required. Both null: the published file and hash, pinned in
    # stages/weights.py.
    weights_url: str | None = None
    weights_sha256: str | None = None
    # Only a pretrained base is frozen; a base trained from scratch must learn.
    freeze: bool = True
    head: HeadConfig = field(default_factory=HeadConfig)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FineTuneConfig:
    """Phase 2 of transfer learning: after the head has trained on the frozen base, unfreeze the
    base's top layers and train on at a low learning rate. BatchNormalization stays frozen and in
    inference mode. Only a pretrained, frozen base has a phase 2."""

    epochs: int = 0  # 0: no phase 2
    learning_rate: float = 1.0e-5
    unfreeze: int = 20  # the base's top layers made trainable, widened to whole blocks (0: all of them)


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 20  # phase 1: the whole model from scratch, or the head on a frozen base
    batch_size: int = 64
    learning_rate: float = 0.001
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    early_stopping_patience: int = 5
    seed: int = 42
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)
    # "balanced": each class weighs n_images / (n_classes * n_class_images) in the loss.
    class_weight: Literal["none", "balanced"] = "none"
    # auto: bfloat16 on a GPU that supports it, else float16 on a GPU, float32 on a CPU.
    mixed_precision: Literal["auto", "off", "bfloat16", "float16"] = "auto"
    # XLA: Keras's "auto" compiles where the backend can.
    jit_compile: Literal["auto", "on", "off"] = "auto"
    # auto: with a frozen base and no augmentation, compute the base's features once and train
    # the head on them (the same model, many times faster).
    feature_cache: Literal["auto", "off"] = "auto"
    # data_parallel: replicate the model on every GPU the backend sees and split each batch
    # between them (MirroredStrategy on TensorFlow, keras.distribution.DataParallel on JAX).
    distribution: Literal["off", "data_parallel"] = "off"


@dataclass(frozen=True)
class ExperimentConfig:
    suite: str
    dataset: str
    backbone: str
    # Partial overrides, checked against TrainingConfig and BackboneConfig.
    train: dict[str, Any] = field(default_factory=dict)
    backbone_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteConfig:
    description: str = ""
    rank_by: Literal["accuracy", "balanced_accuracy", "macro_f1"] = "accuracy"


@dataclass(frozen=True)
class Experiment:
    """One experiment with everything it needs resolved: what train and evaluate read."""

    name: str
    suite: str
    dataset_name: str
    backbone_name: str
    dataset: DatasetConfig
    backbone: BackboneConfig
    training: TrainingConfig
    # The dotted keys the experiment's own `train:` block sets (the rest come from `training:`).
    train_overrides: frozenset[str] = frozenset()

    def training_key(self, key: str) -> str:
        """Where a training key's value comes from in params.yaml, for error messages."""
        return f"experiments.{self.name}.train.{key}" if key in self.train_overrides else f"training.{key}"


@dataclass(frozen=True)
class Params:
    training: TrainingConfig
    datasets: dict[str, DatasetConfig]
    backbones: dict[str, BackboneConfig]
    experiments: dict[str, ExperimentConfig]
    suites: dict[str, SuiteConfig]
    # Where the params came from, for error messages; not a key of params.yaml.
    path: str = field(default=PARAMS_FILE, metadata={"internal": True})

    def dataset(self, name: str) -> DatasetConfig:
        return self.datasets[_choose(name, self.datasets, "dataset", self.path, "--dataset")]

    def experiment(self, name: str) -> Experiment:
        key = _choose(name, self.experiments, "experiment", self.path, "--experiment")
        spec = self.experiments[key]
        where = f"experiments.{key}"
        backbone = _parse_override(
            self.backbones[spec.backbone], spec.backbone_overrides, f"{where}.backbone_overrides", self.path
        )
        training = _parse_override(self.training, spec.train, f"{where}.train", self.path)
        return Experiment(
            name=key,
            suite=spec.suite,
            dataset_name=spec.dataset,
            backbone_name=spec.backbone,
            dataset=self.datasets[spec.dataset],
            backbone=backbone,
            training=training,
            train_overrides=frozenset(_override_keys(spec.train)),
        )

    def suite_experiments(self, suite: str) -> list[str]:
        _choose(suite, self.suites, "suite", self.path, "--suite")
        return [name for name, spec in self.experiments.items() if spec.suite == suite]


# --------------------------------------------------------------------------------------------
# Loading.


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping: PyYAML keeps the last
    silently, and DVC refuses the file later in a dozen lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        merges = 0
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged, its keys overridable
                merges += 1
                if merges > 1:  # DVC refuses a second one
                    raise yaml.constructor.ConstructorError(
                        None, None, "the merge key << is given twice in one mapping; merge several as <<: [*a, *b]",
                        key_node.start_mark,
                    )
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}: it is given twice in one mapping; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 (which DVC reads params.yaml as) reads 1e-3 as a number; PyYAML (YAML 1.1) as text,
# wanting 1.0e-3. Read it as DVC does. A quoted '1e-3' stays text.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """YAML 1.1's integers, less the spellings YAML 1.2 (DVC's reading) reads otherwise: 010 is
    8 to PyYAML and 10 to DVC, 1:04 is 64 to PyYAML and text to DVC. Those are refused: the
    stages would train on one value while DVC tracks another."""
    text = str(loader.construct_scalar(node)).replace("_", "")
    if ":" in text or re.fullmatch(r"[-+]?0[0-7]+", text):
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is a different number in YAML 1.1 and in YAML 1.2 (DVC's reading); write it "
            "without leading zeros or colons, or quote it if it is a name", node.start_mark,
        )
    return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, with _UniqueKeyLoader (a SafeLoader: it builds plain data only)."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ConfigError with one line on any problem."""
    path = Path(path)
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the repository root or pass --params") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot be read ({reason}); pass a params YAML file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}:{where} not valid YAML ({problem})") from None
    return parse_params(raw, str(path))


def parse_params(raw: Any, source: str = PARAMS_FILE) -> Params:
    """Validate an already-loaded params mapping (a test can pass a dict)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    if "path" in raw:
        raise ConfigError(f"{source}: path: unknown key; valid keys: training, datasets, backbones, experiments, suites")
    for kind in ("datasets", "backbones", "suites"):
        names = raw.get(kind)
        for name in names if isinstance(names, dict) else ():
            if isinstance(name, (int, float)) and not isinstance(name, bool):
                # DVC's foreach makes no stage for a key that is not text: fetch@2020 would not exist.
                raise ConfigError(
                    f"{source}: {kind}.{name}: the name was read as the number {name} (YAML reads bare digits so, "
                    "and 2020_01 or 1e3 as other numbers), and DVC makes no stages for a number; quote the name as "
                    "you wrote it in the file, e.g. 2020: as '2020':"
                )
    params = _parse(Params, {**raw, "path": source}, "", source)
    for dataset in params.datasets.values():
        # One spelling per name: "é" typed as one code point or as "e" + accent (as macOS
        # writes file names) is the same class. The layouts normalise labels the same way.
        dataset.classes[:] = [unicodedata.normalize("NFC", name) for name in dataset.classes]
    _check_references(params, source)
    return params


def _check_references(params: Params, source: str) -> None:
    """Names that must point at other entries, and component kinds that must be registered."""
    from stages import backbones, layouts, sources  # registries; cheap to import

    for kind, names in (("datasets", params.datasets), ("backbones", params.backbones), ("suites", params.suites)):
        folded: dict[str, str] = {}
        for name in names:
            # data/raw/Digits and data/raw/digits are one folder on macOS's and Windows' file systems.
            other = folded.setdefault(name.casefold(), name)
            if other != name:
                raise ConfigError(
                    f"{source}: {kind}.{name}: differs from {kind}.{other} only in case, and they would share "
                    "folders on a case-insensitive file system (macOS, Windows); rename one"
                )
            if not NAME.fullmatch(name):
                raise ConfigError(
                    f"{source}: {kind}.{name}: {name!r} cannot name DVC stages and folders (fetch@<dataset>, "
                    "models/<dataset>/<backbone>, report@<suite>, the param datasets.<dataset>.source); use letters, "
                    "digits and _, starting with a letter or digit"
                )
    for name in params.suites:
        if not any(spec.suite == name for spec in params.experiments.values()):
            raise ConfigError(
                f"{source}: suites.{name}: no experiment is in this suite, so report@{name} has nothing to rank; "
                f"give an experiment suite: {name}, or remove the suite"
            )
    for name, dataset in params.datasets.items():
        if len(set(dataset.classes)) != len(dataset.classes):
            raise ConfigError(f"{source}: datasets.{name}.classes: class names repeat; list each once")
        if not dataset.classes:
            raise ConfigError(f"{source}: datasets.{name}.classes: list at least one class")
        if dataset.image_size < 1:
            raise ConfigError(
                f"{source}: datasets.{name}.image_size: {dataset.image_size} is out of range; use the side in "
                "pixels the images are stored at, 1 or more (the course's 32, 48, 224, ...)"
            )
        policy = dataset.split
        if not (0 <= policy.val < 1 and 0 <= policy.test < 1 and policy.val + policy.test < 1):
            raise ConfigError(
                f"{source}: datasets.{name}.split: val and test must be fractions in [0, 1) that sum below 1"
            )
        augment = dataset.augmentation
        for key, value, allowed, within in (
            ("rotation", augment.rotation, "0 to 180 (degrees)", 0 <= augment.rotation <= 180),
            ("zoom", augment.zoom, "0 or more, below 1", 0 <= augment.zoom < 1),
            ("translation", augment.translation, "0 or more, below 1 (a fraction of the side)", 0 <= augment.translation < 1),
            ("contrast", augment.contrast, "0 to 1 (a fraction: factors from 1 - contrast to 1 + contrast)",
             0 <= augment.contrast <= 1),
        ):
            if not within:
                raise ConfigError(f"{source}: datasets.{name}.augmentation.{key}: {value} is out of range; use {allowed}")
        for key in ("course", "published"):
            figure = getattr(dataset.reference, key)
            if figure is not None and not 0 <= figure <= 1:
                hint = f"; write {figure / 100:g}, not {figure:g}" if 1 < figure <= 100 else ""
                raise ConfigError(
                    f"{source}: datasets.{name}.reference.{key}: {figure:g} is not a fraction from 0 to 1 "
                    f"(test accuracy){hint}"
                )
        rules = dataset.validation
        for key, value, allowed, within in (
            ("min_per_class", rules.min_per_class, "0 or more", rules.min_per_class >= 0),
            ("max_undecodable_fraction", rules.max_undecodable_fraction, "a fraction in [0, 1]",
             0 <= rules.max_undecodable_fraction <= 1),
            ("min_side", rules.min_side, "1 or more", rules.min_side >= 1),
            ("max_side", rules.max_side, "at least min_side", rules.max_side >= rules.min_side),
            ("expected_count", rules.expected_count, "1 or more, or null",
             rules.expected_count is None or rules.expected_count >= 1),
            ("expected_count_tolerance", rules.expected_count_tolerance, "a fraction in [0, 1]",
             0 <= rules.expected_count_tolerance <= 1),
        ):
            if not within:
                raise ConfigError(f"{source}: datasets.{name}.validation.{key}: {value} is out of range; use {allowed}")
        for rule in dataset.validation.hard:
            if rule not in RULES:
                raise ConfigError(
                    f"{source}: datasets.{name}.validation.hard: unknown rule {rule!r}; valid: {', '.join(RULES)}"
                )
        if "expected_count" in dataset.validation.hard and dataset.validation.expected_count is None:
            raise ConfigError(
                f"{source}: datasets.{name}.validation.hard: 'expected_count' never runs without "
                f"datasets.{name}.validation.expected_count; set the count the source documents, or remove it from hard"
            )
    _check_training(params.training, "training", set(), source)
    for name, backbone in params.backbones.items():
        _choose(backbone.model, backbones.REGISTRY, "backbone model", source, f"backbones.{name}.model")
        _check_backbone(backbone, f"backbones.{name}", set(), "", source)
    for name, spec in params.experiments.items():
        where = f"experiments.{name}"
        _choose(spec.dataset, params.datasets, "dataset", source, f"{where}.dataset")
        _choose(spec.backbone, params.backbones, "backbone", source, f"{where}.backbone")
        _choose(spec.suite, params.suites, "suite", source, f"{where}.suite")
        # dvc.yaml names stages train@<key>; the key must say what the stage trains.
        expected = f"{spec.dataset}-{spec.backbone}"
        if name != expected:
            raise ConfigError(f"{source}: {where}: an experiment is named <dataset>-<backbone>; rename it {expected!r}")
        classes = params.datasets[spec.dataset].classes
        if len(classes) < 2:
            raise ConfigError(
                f"{source}: datasets.{spec.dataset}.classes: {classes} has fewer than two classes, and {where} "
                "trains a classifier, which needs two or more to choose between"
            )
        experiment = params.experiment(name)  # validates the overrides
        _check_training(experiment.training, f"{where}.train", _override_keys(spec.train), source)
        tune = experiment.training.fine_tune
        if tune.epochs and "fine_tune.epochs" in experiment.train_overrides and not (
            experiment.backbone.weights and experiment.backbone.freeze
        ):
            base = "trains from scratch (weights: null)" if not experiment.backbone.weights else "is not frozen (freeze: false)"
            raise ConfigError(
                f"{source}: {where}.train.fine_tune.epochs: {tune.epochs} asks for phase 2, which only a pretrained "
                f"frozen base has, and backbone {spec.backbone} {base}; set it to 0 or remove it"
            )
        if "model" in spec.backbone_overrides:
            _choose(
                experiment.backbone.model, backbones.REGISTRY, "backbone model", source,
                f"{where}.backbone_overrides.model",
            )
        if spec.backbone_overrides:  # the backbone as the experiment has it (the entry itself is checked above)
            _check_backbone(experiment.backbone, f"{where}.backbone_overrides", _override_keys(spec.backbone_overrides),
                            f"backbones.{spec.backbone}", source)
        _check_unfreeze(experiment, source)
        if experiment.backbone.model == "cnn":
            # Each block halves the side: past log2 of it, a pooling layer gets nothing to pool.
            side = experiment.backbone.input_size or experiment.dataset.image_size
            filters = experiment.backbone.options.get("filters", [32, 64])
            blocks = len(filters)  # a list of numbers: _check_backbone saw to it
            if 2**blocks > side:
                raise ConfigError(
                    f"{source}: {where}: backbone {spec.backbone} has {blocks} pooling blocks (options.filters), each "
                    f"halving the side, and its input is {side} px; use at most {max(side.bit_length() - 1, 0)} blocks, "
                    f"or a larger input_size"
                )
    # Component options were parsed against their registries in _parse_component.
    del sources, layouts


# A dataset, backbone or suite name: part of DVC stage names (fetch@<dataset>) and of paths.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")  # no dots: DVC reads datasets.<name>.source as a path
SEED_OFFSETS = 1000  # augmentation.py uses seed + 200..202; backbones.py seed + 1.. and seed + 100..
MAX_SEED = 2**31 - 1 - SEED_OFFSETS


def _check_training(training: TrainingConfig, where: str, overridden: set[str], source: str) -> None:
    """Numbers training needs in range. `overridden`: the dotted keys `where` (an experiment's
    train: block) sets itself; a value it inherits is named under `training.`."""
    tune = training.fine_tune
    for key, value, allowed, within in (
        ("epochs", training.epochs, "1 or more", training.epochs >= 1),
        ("batch_size", training.batch_size, "1 or more", training.batch_size >= 1),
        ("learning_rate", training.learning_rate, "a finite number above 0", 0 < training.learning_rate < math.inf),
        # Keras holds a layer's seed as a 32-bit integer (int32 on PyTorch), and the layers' seeds
        # are this one plus up to SEED_OFFSETS (dropout, augmentation).
        ("seed", training.seed, f"0 to {MAX_SEED} (Keras's seeds are 32-bit, and the layers add up to "
         f"{SEED_OFFSETS} to it)", 0 <= training.seed <= MAX_SEED),
        ("early_stopping_patience", training.early_stopping_patience, "0 or more", training.early_stopping_patience >= 0),
        ("fine_tune.epochs", tune.epochs, "0 (no phase 2) or more", tune.epochs >= 0),
        ("fine_tune.learning_rate", tune.learning_rate, "a finite number above 0", 0 < tune.learning_rate < math.inf),
        ("fine_tune.unfreeze", tune.unfreeze, "0 (every layer) or more", tune.unfreeze >= 0),
    ):
        if not within:
            raise ConfigError(f"{source}: {where if key in overridden else 'training'}.{key}: {value} is out of range; use {allowed}")


def _check_unfreeze(experiment: Experiment, source: str) -> None:
    """Phase 2's `unfreeze` against the layers of the base (backbones.BASE_LAYERS, which lists
    every family with ImageNet weights): train@ refuses more, but only after fetch, validate, split
    and weights have run. The default (20) is more than VGG16's 19 layers, so an experiment may
    inherit it without a word."""
    from stages import backbones

    tune, backbone = experiment.training.fine_tune, experiment.backbone
    if not (tune.epochs and backbone.weights and backbone.freeze):  # no phase 2 (train.plan_phases)
        return
    layers = backbones.base_layers(backbone.model, pretrained=True)
    if layers is None or tune.unfreeze <= layers:
        return
    what = f"is more than the {layers} layers of {backbone.model}'s base"
    own = f"experiments.{experiment.name}.train.fine_tune.unfreeze"
    if "fine_tune.unfreeze" in experiment.train_overrides:
        raise ConfigError(f"{source}: {own}: {tune.unfreeze} {what}; use at most {layers}, or 0 for all of them")
    raise ConfigError(
        f"{source}: training.fine_tune.unfreeze: {tune.unfreeze} (inherited by experiments.{experiment.name}) {what}; "
        f"set {own} to at most {layers}, or 0 for all of them"
    )


def _check_backbone(backbone: BackboneConfig, where: str, overridden: set[str], inherited: str, source: str) -> None:
    """A backbone's numbers in range and its family's options well-typed, before Keras sees them.
    `overridden`: the keys `where` (an experiment's backbone_overrides) sets; the others are
    named under `inherited` (the backbones entry)."""
    from stages import backbones

    def key(name: str) -> str:
        return f"{where if name in overridden or not inherited else inherited}.{name}"

    head = backbone.head
    spec = backbones.get_backbone(backbone.model)
    if backbone.weights and not spec.pretrained:
        raise ConfigError(f"{source}: {key('weights')}: {backbone.model} has no pretrained weights; set weights: null")
    if backbone.weights:
        from stages import weights  # it imports this module: here, not at the top

        if not weights.lists_weights(backbone.model):  # the weights stage needs the file name Keras asks for
            raise ConfigError(
                f"{source}: {key('weights')}: {backbone.model} has no ImageNet weights file listed in "
                "stages/weights.py (PUBLISHED); add it there, or set weights: null"
            )
    if backbone.weights_url is not None:
        parts = urllib.parse.urlsplit(backbone.weights_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"{source}: {key('weights_url')}: {backbone.weights_url!r} is not an http(s) URL; for a file "
                f"you have, set the URL it came from and put the file where the weights stage says"
            )
    # What the weights stage would refuse, refused before DVC fetches the dataset it runs after.
    pinned = (backbone.weights_sha256 or "").strip()
    if backbone.weights and pinned and not re.fullmatch(r"[0-9a-fA-F]{64}", pinned):
        raise ConfigError(
            f"{source}: {key('weights_sha256')}: {backbone.weights_sha256!r} is not a sha256 (64 hexadecimal "
            f"characters); pin the file's checksum (`sha256sum <file>`) in params.yaml"
        )
    if backbone.weights and backbone.weights_url and not pinned:
        raise ConfigError(
            f"{source}: {key('weights_sha256')}: required with weights_url; pin the file's checksum "
            f"(`sha256sum <file>`) in params.yaml"
        )
    alpha = backbone.options.get("alpha", 1.0)
    if backbone.weights and backbone.model == "mobilenetv2" and type(alpha) in (int, float) and (
        problem := backbones.mobilenetv2_alpha_problem(alpha)
    ):
        raise ConfigError(f"{source}: {key('options.alpha')}: {problem}")
    smallest = spec.min_input_size
    if backbone.input_size is not None and backbone.input_size < smallest:
        raise ConfigError(
            f"{source}: {key('input_size')}: {backbone.input_size} is out of range; use {smallest} or more "
            f"(the smallest {backbone.model} takes), or null"
        )
    if not 0 <= head.dropout < 1:
        raise ConfigError(f"{source}: {key('head.dropout')}: {head.dropout} is out of range; use 0 or more, below 1")
    if any(units < 1 for units in head.dense):
        raise ConfigError(f"{source}: {key('head.dense')}: {head.dense} has a layer of no units; list 1 or more per layer")
    problem = backbones.options_problem(backbone.model, backbone.options)
    if problem:
        option, what = problem
        raise ConfigError(f"{source}: {key('options.' + option)}: {what}")


def _override_keys(overrides: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in overrides.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _override_keys(value, f"{prefix}{key}.")
    return keys


def _choose(name: str, valid: typing.Mapping[str, Any] | typing.Iterable[str], what: str, source: str, key: str) -> str:
    names = sorted(valid)
    if name in names:
        return name
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{source}: {key}: unknown {what} {name!r}{hint}; valid: {', '.join(names) or '(none)'}")


def _parse_override(base: Any, overrides: dict[str, Any], where: str, source: str) -> Any:
    merged = dataclasses.asdict(base)
    if isinstance(base, BackboneConfig):
        merged["options"] = dict(base.options)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "options":
            merged[key] = {**merged[key], **value}
        elif key == "options" and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    # An unknown override key is reported by the strict parse, under `where`.
    return _parse(type(base), merged, where, source)


# --------------------------------------------------------------------------------------------
# The generic strict parser: dataclasses, Literal, Optional, list, dict and scalars.


# DVC reads params.yaml as YAML 1.2, to which a bare yes is text, so `dvc exp run -S` writes the
# file back without the quotes the lines above ask for.
UNQUOTED_BY_DVC = (" (quoted before? `dvc exp run -S` writes params.yaml back without such quotes: quote it again, "
                   "edit params.yaml by hand and run `dvc exp run` without -S)")


def _parse(tp: Any, value: Any, where: str, source: str, nullable: bool = False) -> Any:
    """`value` as type `tp`; `nullable`: `tp` is one side of an Optional, and messages offer null."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if tp is ComponentConfig:
        return _parse_component(value, where, source)
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, where, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        errors = []
        for option in options:
            try:
                return _parse(option, value, where, source, nullable=type(None) in args)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        # YAML 1.1 reads an unquoted on/off as true/false: a setting that offers on or off means it.
        if isinstance(value, bool) and ("on" if value else "off") in args:
            return "on" if value else "off"
        for allowed in args:
            # `1.0 == 1` and `True == 1` in Python; a Literal wants the value as written.
            if value == allowed and type(value) is type(allowed):
                return value
        shown = ", ".join("null" if a is None else str(a) for a in (*args, *((None,) if nullable else ())))
        raise ConfigError(f"{source}: {where}: {value!r} is not allowed; valid: {shown}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where}: expected a list, got {_kind(value)}")
        return [_parse(args[0], item, f"{where}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a mapping, got {_kind(value)}")
        for k in value:
            if k is None or isinstance(k, bool):
                # A folder named yes/no (a brain-MRI dataset's) mapped by class_map: YAML 1.1 reads
                # the bare key as a boolean, and its str() would match no folder.
                raise ConfigError(
                    f"{source}: {where}: the key {k!r} was read as {'null' if k is None else 'a boolean'} (YAML reads "
                    f"bare yes/no/on/off/true/false/null so); quote it, e.g. 'yes':{UNQUOTED_BY_DVC}"
                )
        return {str(k): _parse(args[1], v, f"{where}.{k}", source) for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # Class names like 0..9 are written bare in YAML; they are names, not numbers.
            return str(value)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported schema type {tp!r}")
    quote = (f"; YAML reads bare yes/no/on/off/true/false/null so: quote it if it is a name{UNQUOTED_BY_DVC}"
             if tp is str and (value is None or isinstance(value, bool)) else "")
    expected = f"{tp.__name__} or null" if nullable else tp.__name__
    raise ConfigError(f"{source}: {where}: expected {expected}, got {_kind(value)} {value!r}{quote}")


def _parse_dataclass(tp: type, value: Any, where: str, source: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {where or '(top level)'}: expected a mapping, got {_kind(value)}")
    fields = {f.name: f for f in dataclasses.fields(tp)}
    hints = typing.get_type_hints(tp)
    public = [name for name, spec in fields.items() if not spec.metadata.get("internal")]
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), public, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{source}: {_join(where, key)}: unknown key{hint}; valid keys: {', '.join(public)}"
            )
    kwargs = {}
    for name, spec in fields.items():
        if name in value:
            kwargs[name] = _parse(hints[name], value[name], _join(where, name), source)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {_join(where, name)}: required key is missing")
    return tp(**kwargs)


def _parse_component(value: Any, where: str, source: str) -> ComponentConfig:
    from stages import layouts, sources

    registry = sources.REGISTRY if where.endswith(".source") else layouts.REGISTRY
    what = "source kind" if where.endswith(".source") else "layout kind"
    if not isinstance(value, dict) or "kind" not in value:
        raise ConfigError(f"{source}: {where}.kind: required key is missing; valid: {', '.join(sorted(registry))}")
    kind = _choose(value["kind"], registry, what, source, f"{where}.kind")
    options = _parse(registry[kind].options, {k: v for k, v in value.items() if k != "kind"}, where, source)
    try:
        registry[kind].check(options, where)  # what needs no data: a reference's form, a regex, a sha256
    except UserError as error:
        raise ConfigError(f"{source}: {error}") from None
    return ComponentConfig(kind=kind, options=options)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.config",
        description="Check a params file: every key, type and name, the way each stage reads it.",
    )
    parser.add_argument("--params", default=PARAMS_FILE, help="the params YAML file (default: params.yaml)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    counts = {"datasets": params.datasets, "backbones": params.backbones, "experiments": params.experiments,
              "suites": params.suites}
    print(f"{args.params}: ok (" + ", ".join(f"{len(v)} {k}" for k, v in counts.items()) + ")")


if __name__ == "__main__":
    run_stage(main)
