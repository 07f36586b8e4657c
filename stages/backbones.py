"""Backbones: a registry of model families, and the one function that builds a classifier.

Every model takes raw uint8 images (0-255) at the dataset's working resolution. Inside the model:
cast to float, augmentation (active only in training), resizing to the backbone's input size,
grayscale to RGB where the backbone needs three channels, the backbone's own preprocessing, the
backbone, and a named head (`features`: pooling or flattening, `top_dropout`, `dense_<i>`, `predictions`).
A saved model therefore needs no preprocessing code beside it.

Keras 3 API only, so KERAS_BACKEND may be tensorflow, jax or torch. Importing this module does not
import Keras: config validation reads the registry without paying for it.
"""

from __future__ import annotations

import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Literal
from urllib.parse import urlparse

from stages import augmentation as augmentations
from stages.errors import UserError
from stages.registry import Registry

Preprocessing = Literal["unit", "tf", "torch", "caffe", "none"]


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    # build(input_shape, weights file or None, options, seed=...): the base, without a top.
    build: Callable[..., Any]
    # How the family wants its input: "unit" scales to [0, 1], "tf" to [-1, 1], "torch" is
    # ImageNet mean/std on [0, 1], "caffe" is BGR minus ImageNet means, "none" means the model
    # rescales 0-255 input itself.
    preprocessing: Preprocessing
    native_input_size: int | None  # None: any size (the dataset's working resolution)
    min_input_size: int = 1
    rgb: bool = True  # needs three channels
    pretrained: bool = True  # has ImageNet weights
    tensorflow_only: bool = False  # imports TensorFlow itself (KERAS_BACKEND must be tensorflow)
    options: tuple[str, ...] = ()  # the option names params may give its build (the cnn's: CNN_OPTIONS)
    # check(options): what is wrong with their values, as (option, problem), or None.
    check: Callable[[dict[str, Any]], tuple[str, str] | None] | None = None


REGISTRY: Registry[BackboneSpec] = Registry("backbone model")


def register_backbone(
    name: str,
    *,
    preprocessing: Preprocessing,
    native_input_size: int | None,
    min_input_size: int = 1,
    rgb: bool = True,
    pretrained: bool = True,
    tensorflow_only: bool = False,
    options: tuple[str, ...] = (),
    check: Callable[[dict[str, Any]], tuple[str, str] | None] | None = None,
) -> Callable:
    """Register `build(input_shape, weights_file or None, options, seed=0)` as backbone model
    `name`: the base without a top, taking raw input after the `preprocessing` named (the model
    applies it). `options`: the names a params entry's `options:` may give it; any other is
    refused when params are read. `check(options)`: what is wrong with their values, as
    (option, "what is wrong; the values it takes"), or None; a bad value is then refused when
    params are read, not by Keras in the middle of the build."""

    def decorate(build: Callable) -> Callable:
        REGISTRY[name] = BackboneSpec(
            name, build, preprocessing, native_input_size, min_input_size, rgb, pretrained, tensorflow_only, options,
            check,
        )
        return build

    return decorate


def get_backbone(name: str) -> BackboneSpec:
    return REGISTRY.lookup(name)


def list_backbones() -> list[str]:
    return sorted(REGISTRY)


# --------------------------------------------------------------------------------------------
# Families.


CNN_OPTIONS = ("filters", "convs_per_block", "batch_norm", "dropout")
# The options a pretrained family takes from params: only MobileNetV2's width multiplier. The rest
# of its factory's arguments are the pipeline's: the input shape, the weights, no top (the head is
# ours), and the preprocessing, applied by the model's own layer before the base.
APPLICATION_OPTIONS = {"mobilenetv2": ("alpha",)}
# The widths Keras publishes MobileNetV2's ImageNet weights for (any other trains from scratch only).
MOBILENETV2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


def mobilenetv2_alpha_problem(alpha: Any) -> str | None:
    """Why MobileNetV2 at width `alpha` has no ImageNet weights, or None where it has."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha not in MOBILENETV2_ALPHAS:
        return (f"{alpha!r} has no ImageNet weights; use one of {', '.join(str(a) for a in MOBILENETV2_ALPHAS)}, "
                f"or weights: null to train from scratch")
    return None
PIPELINE_ARGUMENTS = ("include_top", "weights", "input_tensor", "input_shape", "pooling", "classes",
                      "classifier_activation", "include_preprocessing", "name")


def options_problem(model: str, options: dict[str, Any]) -> tuple[str, str] | None:
    """What is wrong with a registry model's `options`, as (option, problem), or None. Every
    model's option names are checked here, and the values of ours (the custom CNN's, and
    MobileNetV2's alpha), before Keras sees them."""
    if model != "cnn":
        allowed = REGISTRY[model].options if model in REGISTRY else ()
        for option in sorted(options):
            if option in PIPELINE_ARGUMENTS:
                return option, "is set by the pipeline, not an option; remove it"
            if option not in allowed:
                valid = f"valid: {', '.join(allowed)}" if allowed else f"{model} takes no options"
                return option, f"unknown option; {valid}"
        check = REGISTRY[model].check if model in REGISTRY else None
        if check is not None and (problem := check(options)):
            return problem
        alpha = options.get("alpha", 1.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 4:
            return "alpha", f"{alpha!r} is not a width multiplier (a number above 0, e.g. 0.35 to 1.4)"
        return None
    unknown = sorted(set(options) - set(CNN_OPTIONS))
    if unknown:
        return unknown[0], f"unknown option; valid: {', '.join(CNN_OPTIONS)}"
    whole = lambda value: isinstance(value, int) and not isinstance(value, bool)  # noqa: E731
    filters = options.get("filters", [32, 64])
    if not isinstance(filters, list) or not filters or not all(whole(f) and f >= 1 for f in filters):
        return "filters", f"{filters!r} is not a list of whole numbers of 1 or more (one per block)"
    blocks = options.get("convs_per_block", 2)
    if not whole(blocks) or blocks < 1:
        return "convs_per_block", f"{blocks!r} is not a whole number of 1 or more"
    if not isinstance(options.get("batch_norm", False), bool):
        return "batch_norm", f"{options['batch_norm']!r} is not true or false"
    dropout = options.get("dropout", 0.25)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        return "dropout", f"{dropout!r} is not a number of 0 or more, below 1"
    return None


@register_backbone("cnn", preprocessing="unit", native_input_size=None, rgb=False, pretrained=False, options=CNN_OPTIONS)
def build_cnn(input_shape: tuple[int, int, int], weights: str | None, options: dict[str, Any], seed: int = 0) -> Any:
    """The course's custom CNNs: blocks of `convs_per_block` 3x3 convolutions, then pooling.

    options: filters (per block, default [32, 64]), convs_per_block (2), batch_norm (false),
    dropout after each block (0.25). The course's CIFAR-10 model is filters [32, 64]. Each dropout
    layer draws from its own seed (`seed` + block): see build_model's head.
    """
    import keras
    from keras import layers

    inputs = keras.Input(input_shape)  # options are checked by build_model (and when params are read)
    x = inputs
    for block, filters in enumerate(options.get("filters", [32, 64]), start=1):
        for conv in range(1, int(options.get("convs_per_block", 2)) + 1):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=not options.get("batch_norm", False),
                              name=f"block{block}_conv{conv}")(x)
            if options.get("batch_norm", False):
                x = layers.BatchNormalization(name=f"block{block}_bn{conv}")(x)
            x = layers.Activation("relu", name=f"block{block}_relu{conv}")(x)
        x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
        if options.get("dropout", 0.25):
            x = layers.Dropout(float(options.get("dropout", 0.25)), seed=seed + block, name=f"block{block}_dropout")(x)
    return keras.Model(inputs, x, name="cnn")


def _application(factory_name: str) -> Callable:
    """A keras.applications family without its top, with ImageNet weights or none.

    With a weights file the base is built as Keras builds it for `weights="imagenet"`, reading the
    pinned file where Keras would download its own: a family may be built differently for its
    ImageNet weights (EfficientNet B0-B7 then rescale by 1/sqrt(std) after their normalisation,
    tensorflow/tensorflow#49930), and a path given as `weights` would leave that out.
    """

    def build(input_shape: tuple[int, int, int], weights: str | None, options: dict[str, Any], seed: int = 0) -> Any:
        # `seed` is not needed: without a top, an application's only dropout is EfficientNet's
        # stochastic depth, whose noise_shape makes Keras draw it from the layer's own generator.
        import keras

        factory = getattr(keras.applications, factory_name)
        try:
            if weights is None:
                return factory(include_top=False, weights=None, input_shape=input_shape, **options)
            with _pinned_download(weights, f"backbone {factory_name}"):
                return factory(include_top=False, weights="imagenet", input_shape=input_shape, **options)
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - a wrong or damaged file fails in many ways
            failure = _build_error(f"backbone {factory_name}", options, weights, error)
            if failure is error:
                raise
            raise failure from None

    return build


# What loading says of a weights file that is not the base's: its layer count, names or shapes
# (ValueError, KeyError, IndexError), or HDF5 that does not open (h5py's OSError).
FILE_ERRORS = (ValueError, KeyError, IndexError, OSError)


def _build_error(what: str, options: dict[str, Any], weights: str | None, error: Exception) -> Exception:
    """What a family's factory raising `error` means: bad options (a TypeError), a weights file that
    does not load, or the error itself: without weights, or for what no file causes (memory
    running out while the base is built)."""
    if isinstance(error, TypeError):
        return UserError(f"{what}: bad options {options}: {error}")
    if weights is None or not isinstance(error, FILE_ERRORS):
        return error
    return UserError(
        f"{what}: could not load the weights file {weights} ({type(error).__name__}: {error}); run the weights "
        "stage again for this experiment"
    )


@contextmanager
def _pinned_download(path: str, what: str) -> Iterator[None]:
    """While keras.applications builds a model for its ImageNet weights, its download hands back
    the pinned file `path`, which must be the very file it asks for (by name)."""
    from keras.src.utils import file_utils  # what every keras.applications module downloads with

    def get_file(fname: str | None = None, origin: str | None = None, *args: Any, **kwargs: Any) -> str:
        asked = fname or PurePosixPath(urlparse(origin or "").path).name
        if asked != Path(path).name:
            raise UserError(
                f"{what}: Keras loads its ImageNet weights from {asked}, but the pinned file is {path}; "
                "run the weights stage again for this experiment"
            )
        return str(path)

    original = file_utils.get_file
    file_utils.get_file = get_file
    try:
        yield
    finally:
        file_utils.get_file = original


# keras.applications families: registry name -> (factory, preprocessing, native size, minimum size).
# Preprocessing follows each family's own `preprocess_input`: "tf" scales to [-1, 1], "torch" is
# ImageNet mean/std, "caffe" is BGR minus the ImageNet means, and "none" means the model does it.
APPLICATIONS = {
    "vgg16": ("VGG16", "caffe", 224, 32),
    "resnet50v2": ("ResNet50V2", "tf", 224, 32),
    "resnet101v2": ("ResNet101V2", "tf", 224, 32),
    "resnet152v2": ("ResNet152V2", "tf", 224, 32),
    "mobilenetv2": ("MobileNetV2", "tf", 224, 32),
    "inceptionv3": ("InceptionV3", "tf", 299, 75),
    "densenet121": ("DenseNet121", "torch", 224, 32),
    "densenet169": ("DenseNet169", "torch", 224, 32),
    "densenet201": ("DenseNet201", "torch", 224, 32),
    "nasnetmobile": ("NASNetMobile", "tf", 224, 32),
    "nasnetlarge": ("NASNetLarge", "tf", 331, 32),
    "efficientnetb0": ("EfficientNetB0", "none", 224, 32),
    "efficientnetb1": ("EfficientNetB1", "none", 240, 32),
    "efficientnetb2": ("EfficientNetB2", "none", 260, 32),
    "efficientnetb3": ("EfficientNetB3", "none", 300, 32),
    "efficientnetb4": ("EfficientNetB4", "none", 380, 32),
    "efficientnetb5": ("EfficientNetB5", "none", 456, 32),
    "efficientnetb6": ("EfficientNetB6", "none", 528, 32),
    "efficientnetb7": ("EfficientNetB7", "none", 600, 32),
    # Modern choices beside the course's: EfficientNetV2 and ConvNeXt rescale 0-255 input themselves.
    "efficientnetv2b0": ("EfficientNetV2B0", "none", 224, 32),
    "efficientnetv2b1": ("EfficientNetV2B1", "none", 240, 32),
    "efficientnetv2b2": ("EfficientNetV2B2", "none", 260, 32),
    "efficientnetv2b3": ("EfficientNetV2B3", "none", 300, 32),
    "efficientnetv2s": ("EfficientNetV2S", "none", 384, 32),
    "efficientnetv2m": ("EfficientNetV2M", "none", 480, 32),
    "efficientnetv2l": ("EfficientNetV2L", "none", 480, 32),
    "convnexttiny": ("ConvNeXtTiny", "none", 224, 32),
}
# The layers of each pretrained base (include_top=False, built with weights=None), so that params
# are checked against phase 2's `unfreeze` without building a base (which imports the backend and
# takes seconds). The input size and MobileNetV2's alpha do not change them (tests/test_backbones.py
# checks each base it builds against this table). The custom CNN is not listed: it has no
# pretrained weights, so no phase 2 (train.plan_phases).
BASE_LAYERS = {
    "vgg16": 19, "resnet50v2": 190, "resnet101v2": 377, "resnet152v2": 564, "mobilenetv2": 154,
    "inceptionv3": 311, "densenet121": 427, "densenet169": 595, "densenet201": 707, "nasnetmobile": 769,
    "nasnetlarge": 1039, "efficientnetb0": 237, "efficientnetb1": 339, "efficientnetb2": 339,
    "efficientnetb3": 384, "efficientnetb4": 474, "efficientnetb5": 576, "efficientnetb6": 666,
    "efficientnetb7": 813, "efficientnetv2b0": 270, "efficientnetv2b1": 334, "efficientnetv2b2": 349,
    "efficientnetv2b3": 409, "efficientnetv2s": 513, "efficientnetv2m": 740, "efficientnetv2l": 1028,
    "convnexttiny": 133,
    # The efficientnet package's (efn_b*, below); its ImageNet weights are loaded into the same layers.
    "efn_b0": 230, "efn_b1": 332, "efn_b2": 332, "efn_b3": 377, "efn_b4": 467, "efn_b5": 569, "efn_b6": 659,
    "efn_b7": 806,
}
# Built for ImageNet weights, these have one layer more: Keras adds a Rescaling (see _application).
RESCALED_FOR_IMAGENET = {f"efficientnetb{i}" for i in range(8)}


def base_layers(model: str, pretrained: bool) -> int | None:
    """How many layers registry model `model`'s base has, built with ImageNet weights or without;
    None where BASE_LAYERS does not say."""
    if model not in BASE_LAYERS:
        return None
    return BASE_LAYERS[model] + (1 if pretrained and model in RESCALED_FOR_IMAGENET else 0)


for _name, (_factory, _preprocessing, _native, _minimum) in APPLICATIONS.items():
    register_backbone(_name, preprocessing=_preprocessing, native_input_size=_native, min_input_size=_minimum,
                      options=APPLICATION_OPTIONS.get(_name, ()))(_application(_factory))


def _efficientnet_package(factory_name: str) -> Callable:
    """The `efficientnet` package's EfficientNet (efficientnet.tfkeras), as the course uses it.

    It is written against tf.keras, so it runs on the TensorFlow backend only. Its
    `preprocess_input` is ImageNet mean/std on [0, 1] ("torch"), unlike keras.applications'
    EfficientNet, which takes 0-255 input.
    """

    def build(input_shape: tuple[int, int, int], weights: str | None, options: dict[str, Any], seed: int = 0) -> Any:
        import keras  # `seed`: see _application

        if keras.backend.backend() != "tensorflow":
            raise UserError(
                f"backbone efficientnet package {factory_name}: runs on the TensorFlow backend only "
                f"(KERAS_BACKEND is {keras.backend.backend()}); use keras.applications' efficientnet entries"
            )
        import efficientnet.tfkeras as efn

        try:
            return getattr(efn, factory_name)(include_top=False, weights=weights, input_shape=input_shape, **options)
        except Exception as error:  # noqa: BLE001 - a wrong or damaged file fails in many ways
            failure = _build_error(f"backbone efficientnet package {factory_name}", options, weights, error)
            if failure is error:
                raise
            raise failure from None

    return build


# The `efficientnet` package's B0-B7 (ImageNet weights trained with AutoAugment), native sizes as
# in the paper.
EFFICIENTNET_PACKAGE = {f"efn_b{i}": (f"EfficientNetB{i}", size) for i, size in enumerate((224, 240, 260, 300, 380, 456, 528, 600))}
for _name, (_factory, _native) in EFFICIENTNET_PACKAGE.items():
    register_backbone(_name, preprocessing="torch", native_input_size=_native, min_input_size=32, tensorflow_only=True)(
        _efficientnet_package(_factory)
    )


# --------------------------------------------------------------------------------------------
# Assembling a classifier.

# The dtype of every layer before the base (cast, augmentation, resizing, to RGB, preprocessing).
# Under a mixed policy these would otherwise compute in bfloat16 or float16, which rounds pixel
# values above 128 to whole numbers (bfloat16) and VGG's channel means (103.939 to 104): the base
# would see other inputs than preprocess_input gives. The base casts to its own dtype.
INPUT_DTYPE = "float32"


def build_model(
    backbone: Any,
    *,
    image_size: int,
    channels: int,
    num_classes: int,
    augmentation: Any,
    seed: int,
    weights_file: str | None = None,
) -> Any:
    """A classifier that takes (image_size, image_size, channels) uint8 images.

    `backbone` is a config.BackboneConfig and `augmentation` a config.Augmentation. A pretrained
    backbone (`weights: imagenet`) loads its weights from `weights_file`, the file the weights
    stage pinned; nothing is downloaded here.
    """
    import keras
    from keras import layers

    spec = get_backbone(backbone.model)
    size = backbone.input_size or spec.native_input_size or image_size
    if size < spec.min_input_size:
        raise UserError(f"backbone {backbone.model}: input_size {size} is below its minimum {spec.min_input_size}")
    if backbone.weights and not spec.pretrained:
        raise UserError(f"backbone {backbone.model}: has no pretrained weights; set weights: null")
    problem = options_problem(backbone.model, dict(backbone.options))
    if problem:  # params.yaml's options are checked when it is read; this is for other callers
        raise UserError(f"backbone {backbone.model}: options.{problem[0]}: {problem[1]}")
    if backbone.weights and not weights_file:
        raise UserError(
            f"backbone {backbone.model}: weights: {backbone.weights} needs the pinned weights file; "
            f"run the weights stage (dvc repro weights@<experiment>) first"
        )
    base_channels = 3 if spec.rgb else channels

    inputs = keras.Input((image_size, image_size, channels), dtype="uint8", name="image")
    # Everything before the base computes in float32 (INPUT_DTYPE), whatever the dtype policy.
    x = layers.Rescaling(1.0, dtype=INPUT_DTYPE, name="to_float")(inputs)
    augment = augmentations.augmentation_layers(augmentation, seed, dtype=INPUT_DTYPE)
    if augment is not None:
        x = augment(x)
    if size != image_size:
        x = layers.Resizing(size, size, dtype=INPUT_DTYPE, name="resize")(x)
    if base_channels == 3 and channels == 1:
        x = custom_layers()["GrayscaleToRGB"](dtype=INPUT_DTYPE, name="to_rgb")(x)
    x = preprocessing_layer(spec.preprocessing)(x)

    base = spec.build((size, size, base_channels), weights_file if backbone.weights else None, dict(backbone.options),
                      seed=seed)
    if not backbone.weights:
        # From scratch on a small dataset, the applications' slow BatchNormalization momentum
        # (0.999) leaves the moving statistics far from the data for thousands of steps, and the
        # model predicts one class in inference mode; 0.9 tracks them within an epoch or two.
        for layer in base.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = min(layer.momentum, 0.9)
    frozen = bool(backbone.weights) and backbone.freeze
    base.trainable = not frozen
    # A frozen base runs in inference mode, in phase 2 too: its BatchNormalization statistics stay
    # as trained and its own dropout stays off, so its features are what it computes in predict.
    x = custom_layers()["InferenceMode"](base, name="base_inference")(x) if frozen else base(x)

    head = backbone.head
    if head.pool == "avg":
        x = layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(x)
    else:
        x = layers.Flatten(name=FEATURES_LAYER)(x)
    # Every dropout layer of ours has a seed of its own. Unseeded, Keras's PyTorch backend draws
    # dropout from torch's global generator, which no checkpoint holds: a resumed run, or a head
    # trained on cached features, would then drop other units than an uninterrupted run. Seeded,
    # each layer draws from a generator whose state is one of the model's variables.
    for i, units in enumerate(head.dense, start=1):
        x = layers.Dense(units, activation="relu", name=f"dense_{i}")(x)
        if head.dropout:
            x = layers.Dropout(head.dropout, seed=seed + 100 + i, name=f"dense_{i}_dropout")(x)
    if head.dropout and not head.dense:
        x = layers.Dropout(head.dropout, seed=seed + 100, name="top_dropout")(x)
    # float32 output keeps the softmax stable under mixed precision.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"{backbone.model}_classifier")


# The layer whose output is the backbone's pooled (or flattened) features: everything up to it
# has no trainable weights when the base is frozen, everything after it is the head.
FEATURES_LAYER = "features"


def base_of(model: Any) -> Any:
    """The backbone sub-model inside a classifier built by build_model."""
    import keras

    wrapper = custom_layers()["InferenceMode"]
    (base,) = [
        layer for layer in model.layers
        if isinstance(layer, wrapper) or isinstance(layer, keras.Model) and layer.name != "augmentation"
    ]
    return base.backbone if isinstance(base, wrapper) else base


def split_at_features(model: Any) -> tuple[Any, Any]:
    """(features, head): two models sharing `model`'s layers, with head(features(x)) == model(x).

    Training the head model trains the classifier's own head layers.
    """
    import keras

    features = keras.Model(model.inputs, model.get_layer(FEATURES_LAYER).output, name="features")
    names = [layer.name for layer in model.layers]
    head_layers = model.layers[names.index(FEATURES_LAYER) + 1 :]
    head_input = keras.Input(features.output.shape[1:], name="features_in")
    x = head_input
    for layer in head_layers:
        x = layer(x)
    return features, keras.Model(head_input, x, name="head")


def unfreeze_top(model: Any, count: int) -> int:
    """Phase 2 of transfer learning: make the base's top `count` layers trainable (all when 0),
    widened down to whole blocks (see tuned_layers).

    BatchNormalization layers stay frozen, and the base keeps running in inference mode (inside
    InferenceMode), so their statistics stay those of the pretrained weights.
    Returns the number of base layers left trainable that hold weights.
    """
    base = base_of(model)
    base.trainable = True
    chosen = tuned_layers(base, count)
    for layer in base.layers:
        layer.trainable = layer in chosen
    return sum(1 for layer in base.layers if layer.trainable and layer.weights)


# Phase 2 trains whole blocks: the cut `count` layers from the top moves down to the start of the
# block it falls in, so that no residual, dense or inception block is trained in part. Blocks are
# read from the layers' names, as keras.applications writes them: a run of layers sharing a key
# (VGG16's block5, ResNetV2's and DenseNet's conv5_block3, MobileNetV2's block_16, EfficientNet's
# block7a and top, ConvNeXt's stage_3_block_2), or, in a base without keys, the layers up to a
# merge that ends a block (InceptionV3's mixed10, NASNet's normal_concat_12). Any other layer is a
# block of its own.
BLOCK_KEY = re.compile(r"^(block\d+[a-z]?|block_\d+|expanded_conv|conv\d+_block\d+|stem|top)_|_(stage_\d+_block_\d+)_")
BLOCK_END = re.compile(r"^(mixed\d+|(normal|reduction)_concat_\d+)$")


def block_starts(layers: list[Any]) -> list[int]:
    """The index in `layers` (a base's, in order) where each block begins."""

    def key(layer: Any) -> str | None:
        found = BLOCK_KEY.search(layer.name)
        return (found.group(1) or found.group(2)) if found else None

    keys = [key(layer) for layer in layers]
    ends = [bool(BLOCK_END.match(layer.name)) for layer in layers]
    grouped_by_ends = any(ends)
    starts = []
    for i, this in enumerate(keys):
        if i == 0:
            starts.append(i)
        elif this is not None:
            if this != keys[i - 1]:
                starts.append(i)
        elif keys[i - 1] is not None or ends[i - 1] or not grouped_by_ends:
            starts.append(i)
    return starts


def tuned_layers(base: Any, count: int) -> list[Any]:
    """The layers of `base` that phase 2 trains: its top `count` (all when 0), widened down to
    the start of the block the cut falls in, but BatchNormalization."""
    from keras import layers

    start = 0 if count == 0 else max(len(base.layers) - count, 0)
    start = max(i for i in block_starts(base.layers) if i <= start)
    return [layer for layer in base.layers[start:] if not isinstance(layer, layers.BatchNormalization)]


def preprocessing_layer(mode: Preprocessing) -> Any:
    from keras import layers

    if mode == "unit":
        return layers.Rescaling(1.0 / 255.0, dtype=INPUT_DTYPE, name="preprocess")
    if mode == "tf":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, dtype=INPUT_DTYPE, name="preprocess")
    if mode == "torch":
        mean = [0.485 * 255, 0.456 * 255, 0.406 * 255]
        variance = [(0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2]
        return layers.Normalization(mean=mean, variance=variance, dtype=INPUT_DTYPE, name="preprocess")
    if mode == "caffe":
        return custom_layers()["CaffePreprocess"](dtype=INPUT_DTYPE, name="preprocess")
    return layers.Identity(dtype=INPUT_DTYPE, name="preprocess")


_CUSTOM_LAYERS: dict[str, type] = {}


def custom_layers() -> dict[str, type]:
    """Our serializable layers, registered with Keras; call before loading a saved model."""
    if not _CUSTOM_LAYERS:
        import keras

        @keras.saving.register_keras_serializable(package="classmatrix")
        class GrayscaleToRGB(keras.layers.Layer):
            """Repeats a single channel three times, for RGB backbones on grayscale datasets."""

            def call(self, inputs: Any) -> Any:
                return keras.ops.repeat(inputs, 3, axis=-1)

            def compute_output_shape(self, input_shape: tuple) -> tuple:
                return (*input_shape[:-1], 3)

        @keras.saving.register_keras_serializable(package="classmatrix")
        class CaffePreprocess(keras.layers.Layer):
            """VGG's preprocessing: RGB to BGR, minus the ImageNet channel means, no scaling."""

            def call(self, inputs: Any) -> Any:
                bgr = keras.ops.flip(inputs, axis=-1)
                return bgr - keras.ops.convert_to_tensor([103.939, 116.779, 123.68], dtype=bgr.dtype)

        @keras.saving.register_keras_serializable(package="classmatrix")
        class InferenceMode(keras.layers.Layer):
            """Runs a backbone in inference mode whatever mode the classifier runs in: its
            BatchNormalization on the moving statistics, its own dropout off.

            `base(x, training=False)` inside a functional model does not do this in Keras 3: the
            functional model passes its own `training` to every layer it calls, overriding it.
            """

            def __init__(self, backbone: Any, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.backbone = backbone

            def call(self, inputs: Any) -> Any:
                return self.backbone(inputs, training=False)

            def compute_output_shape(self, input_shape: tuple) -> tuple:
                return self.backbone.compute_output_shape(input_shape)

            def get_config(self) -> dict:
                return {**super().get_config(), "backbone": keras.saving.serialize_keras_object(self.backbone)}

            @classmethod
            def from_config(cls, config: dict) -> Any:
                return cls(**{**config, "backbone": keras.saving.deserialize_keras_object(config["backbone"])})

        _CUSTOM_LAYERS["GrayscaleToRGB"] = GrayscaleToRGB
        _CUSTOM_LAYERS["InferenceMode"] = InferenceMode
        _CUSTOM_LAYERS["CaffePreprocess"] = CaffePreprocess
        _CUSTOM_LAYERS.update(augmentations.layer_classes())
    return dict(_CUSTOM_LAYERS)


def load_saved_model(path: Any, what: str) -> Any:
    """A `.keras` model this pipeline saved, loaded in Keras's safe mode: a file holding code
    (a Lambda layer's pickled function) is refused with one line, never run.

    Loaded for inference, without its optimizer (compile=False): a model trained under
    mixed_float16 saved Keras's loss-scaling wrapper's variables, which a plain optimizer
    rebuilt in a float32 process does not have, and loading them warned and skipped them."""
    import keras

    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{what}: {path} is not a Keras model file (missing, empty or cut short); restore it "
            "(dvc checkout) or train again"
        )
    try:
        # Keras reads the weights member by random access, which checks no CRC: bytes changed inside
        # it could load as wrong weights without an error.
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        damaged = f"{type(error).__name__}: {error}"
    if damaged is not None:
        raise UserError(
            f"{what}: {path} is a damaged Keras model file (bad member: {damaged}); restore it "
            "(dvc checkout) or train again"
        )
    if _uses_efficientnet_package(path):
        # Its FixedDropout layer is registered with Keras only by importing efficientnet.tfkeras,
        # which building the model did in the process that saved it, not in this one.
        if keras.backend.backend() != "tensorflow":
            raise UserError(
                f"{what}: {path} holds the efficientnet package's layers, which run on TensorFlow only "
                f"(KERAS_BACKEND is {keras.backend.backend()}); run it with KERAS_BACKEND=tensorflow"
            )
        import efficientnet.tfkeras  # noqa: F401

    try:
        return keras.saving.load_model(path, custom_objects=custom_layers(), compile=False, safe_mode=True)
    except ValueError as error:
        if "safe_mode" not in str(error):
            raise
        raise UserError(
            f"{what}: {path} holds code (a Lambda layer or another pickled function) that loading would run; "
            "refused. Only models this pipeline trained and saved load here"
        ) from None
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        # A zip damaged inside (a member's checksum) or lacking a member Keras writes.
        raise UserError(
            f"{what}: {path} is a damaged Keras model file ({type(error).__name__}: {error}); restore it "
            "(dvc checkout) or train again"
        ) from None


def _uses_efficientnet_package(path: Any) -> bool:
    """Whether a saved `.keras` file's model holds layers of the `efficientnet` package."""
    try:
        with zipfile.ZipFile(path) as archive:
            return b'"module": "efficientnet.' in archive.read("config.json")
    except (OSError, KeyError, zipfile.BadZipFile):
        return False  # no config.json: keras.saving.load_model says what is wrong with the file
