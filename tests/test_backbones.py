"""Every registered backbone builds a uint8-in, softmax-out classifier that trains, saves and reloads."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from stages import backbones  # noqa: E402  (after the log level, before Keras is imported)
from stages.augmentation import augmentation_layers  # noqa: E402
from stages.backbones import base_of, build_model, custom_layers, get_backbone, list_backbones, split_at_features  # noqa: E402
from stages.config import Augmentation, BackboneConfig, HeadConfig  # noqa: E402
from stages.errors import UserError  # noqa: E402

IMAGE_SIZE = 16
NUM_CLASSES = 3
# Small options so that each family builds and steps in seconds on a CPU.
SMALL_OPTIONS = {"cnn": {"filters": [8, 16], "convs_per_block": 1, "dropout": 0.1}, "mobilenetv2": {"alpha": 0.35}}


@pytest.fixture(scope="module")
def keras():
    """Keras, imported once for the module, with a fixed seed."""
    import keras

    keras.utils.set_random_seed(0)
    return keras


def small_input_size(spec: Any) -> int | None:
    """The smallest input each family accepts, at least 32 (None: the working size)."""
    return None if spec.native_input_size is None else max(32, spec.min_input_size)


def small_backbone(name: str, **overrides: Any) -> BackboneConfig:
    """The registry entry `name` at a small working size, trained from scratch."""
    spec = get_backbone(name)
    config = BackboneConfig(
        model=name,
        input_size=small_input_size(spec),
        weights=None,
        freeze=True,
        head=HeadConfig(pool="avg", dense=[16], dropout=0.2),
        options=SMALL_OPTIONS.get(name, {}),
    )
    return dataclasses.replace(config, **overrides)


def build(backbone: BackboneConfig, channels: int = 1, augmentation: Augmentation | None = None) -> Any:
    """build_model at the test's working size."""
    return build_model(
        backbone,
        image_size=IMAGE_SIZE,
        channels=channels,
        num_classes=NUM_CLASSES,
        augmentation=augmentation or Augmentation(),
        seed=0,
        weights_file="pinned.h5" if backbone.weights else None,
    )


def images(channels: int, count: int = 8, seed: int = 0) -> np.ndarray:
    """Random uint8 images at the working size."""
    return np.random.default_rng(seed).integers(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, channels), dtype=np.uint8)


def compiled(keras: Any, model: Any) -> Any:
    """The model compiled for one eager training step (tracing a graph costs more than the step)."""
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", run_eagerly=True)
    return model


CASES = [(name, 1) for name in list_backbones()] + [("cnn", 3)]


def test_the_registry_holds_the_documented_families():
    """The registry lists the custom CNN and the three keras.applications families."""
    assert list_backbones() == sorted(backbones.REGISTRY)
    assert {"cnn", "mobilenetv2", "resnet50v2", "efficientnetb0"} <= set(list_backbones())


@pytest.mark.parametrize(("name", "channels"), CASES, ids=[f"{n}-{c}ch" for n, c in CASES])
def test_backbone_builds_trains_one_step_and_predicts_probabilities(keras, name, channels):
    """The classifier takes uint8 images, trains one step, and predicts rows that sum to 1."""
    spec = get_backbone(name)
    model = compiled(keras, build(small_backbone(name), channels))
    batch = images(channels)
    targets = np.array([0, 1, 2, 0, 1, 2, 0, 1])

    assert model.inputs[0].dtype == "uint8"
    assert tuple(model.inputs[0].shape) == (None, IMAGE_SIZE, IMAGE_SIZE, channels)
    assert tuple(model.output.shape) == (None, NUM_CLASSES)
    base = base_of(model)
    size = small_input_size(spec) or IMAGE_SIZE
    assert tuple(base.inputs[0].shape[1:]) == (size, size, 3 if spec.rgb else channels)
    names = {layer.name for layer in model.layers}
    assert ("resize" in names) == (size != IMAGE_SIZE)
    assert ("to_rgb" in names) == (spec.rgb and channels == 1)
    assert {"to_float", "preprocess", "features", "dense_1", "predictions"} <= names
    # The table params check phase 2's `unfreeze` against, without building a base (here at a
    # small input, and MobileNetV2 at alpha 0.35: neither changes the count), for every family
    # with ImageNet weights, keras.applications' and the efficientnet package's.
    if spec.pretrained:
        assert len(base.layers) == backbones.base_layers(name, pretrained=False)
    assert base.trainable  # no pretrained weights: the base must learn
    # From scratch, BatchNormalization momentum is lowered to 0.9 so its statistics track the data.
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert all(layer.momentum <= 0.9 for layer in norms)

    before = [np.array(w) for w in model.trainable_weights]
    loss = model.train_on_batch(batch, targets)
    after = [np.array(w) for w in model.trainable_weights]
    assert np.isfinite(float(np.ravel(loss)[0]))
    assert any(not np.array_equal(b, a) for b, a in zip(before, after))
    assert any(not np.array_equal(b, a) for b, a in zip(before[:2], after[:2]))  # the base moved too

    probabilities = model.predict(batch, verbose=0)
    assert probabilities.shape == (8, NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities >= 0).all()


# --------------------------------------------------------------------------------------------
# Phase 2 unfreezes whole blocks.

# (backbone, unfreeze, where the trained range must begin: the first layer of the block the cut
# falls in, or the layer after the merge ending the block below, how many trained layers hold weights)
WHOLE_BLOCKS = [
    ("vgg16", 2, ("block5_conv1", None), 3),  # block5's three convolutions
    ("resnet50v2", 20, ("conv5_block2_preact_bn", None), 6),  # blocks 2 and 3 of conv5, three convolutions each
    ("densenet121", 20, ("conv5_block14_0_bn", None), 6),  # dense layers 14 to 16, two convolutions each
    ("mobilenetv2", 20, ("block_15_expand", None), 7),  # blocks 15 and 16, and Conv_1
    ("efficientnetb0", 20, ("block6d_expand_conv", None), 11),  # block6d, block7a and top_conv
    ("convnexttiny", 20, ("convnext_tiny_stage_3_block_0_depthwise_conv", None), 16),
    ("inceptionv3", 20, (None, "mixed9"), 9),  # every branch of mixed10
    ("nasnetmobile", 20, (None, "normal_concat_11"), 12),  # the whole last cell
]


@pytest.mark.parametrize(("name", "count", "start", "weighted"), WHOLE_BLOCKS, ids=[case[0] for case in WHOLE_BLOCKS])
def test_phase_two_trains_whole_blocks(keras, name, count, start, weighted):
    """`unfreeze` counts layers from the top, as the Keras guide does, and the cut moves down to
    the start of the block it falls in: no residual, dense, inception or NASNet block is trained
    in part (20 layers cut ResNet50V2's conv5_block2 after its first convolution)."""
    spec = get_backbone(name)
    size = max(spec.min_input_size, 32)
    base = spec.build((size, size, 3), None, dict(SMALL_OPTIONS.get(name, {})), seed=0)
    first, after = start
    begin = base.layers.index(base.get_layer(first)) if first else base.layers.index(base.get_layer(after)) + 1

    tuned = backbones.tuned_layers(base, count)

    expected = [layer for layer in base.layers[begin:] if not isinstance(layer, keras.layers.BatchNormalization)]
    assert tuned == expected
    assert sum(1 for layer in tuned if layer.weights) == weighted
    assert begin in backbones.block_starts(base.layers)


def test_every_phase_two_in_params_fits_its_base(keras):
    """Each experiment of params.yaml with a phase 2 asks to unfreeze no more layers than its base
    has, and some with weights: train would refuse it before phase 1 (VGG16's base has 19 layers,
    and the default `unfreeze: 20` once stopped all three VGG16 experiments)."""
    from stages.config import load_params
    from stages.train import _check_plan, plan_phases

    params = load_params("params.yaml")
    bases: dict[str, Any] = {}
    checked = 0
    for experiment in (params.experiment(name) for name in params.experiments):
        phases = plan_phases(experiment)
        if not any(phase.number == 2 and phase.unfreeze for phase in phases):
            continue
        model = experiment.backbone.model
        if model not in bases:
            spec = get_backbone(model)
            size = max(spec.min_input_size, 32)
            bases[model] = spec.build((size, size, 3), None, dict(experiment.backbone.options), seed=0)
            keras.backend.clear_session()
        _check_plan(experiment, phases, bases[model], train_images=10**6)  # raises UserError if it cannot run
        checked += 1
    assert checked >= 25 and {"vgg16", "nasnetlarge", "inceptionv3", "efn_b7"} <= set(bases)


# --------------------------------------------------------------------------------------------
# Freezing a pretrained base, without downloading weights.


@pytest.fixture
def fake_pretrained(keras, monkeypatch):
    """mobilenetv2's registry entry returning a tiny 'pretrained' model when given a weights file."""
    spec = backbones.REGISTRY["mobilenetv2"]
    calls = []

    def fake_build(input_shape, weights, options, seed=0):
        calls.append(weights)
        if weights is None:
            return spec.build(input_shape, weights, options)
        inputs = keras.Input(input_shape)
        features = keras.layers.Conv2D(4, 3, name="fake_conv")(inputs)
        features = keras.layers.BatchNormalization(momentum=0.99, name="fake_bn")(features)
        features = keras.layers.Dropout(0.5, name="fake_dropout")(features)  # as EfficientNet's blocks have
        return keras.Model(inputs, features, name="fake_pretrained")

    monkeypatch.setitem(backbones.REGISTRY, "mobilenetv2", dataclasses.replace(spec, build=fake_build))
    return calls


def test_frozen_pretrained_base_is_not_trained(keras, fake_pretrained):
    """weights imagenet + freeze: the base is non-trainable, only the head learns, BN stats stay put."""
    model = compiled(keras, build(small_backbone("mobilenetv2", weights="imagenet", freeze=True)))
    base = base_of(model)

    assert fake_pretrained == ["pinned.h5"]
    assert base.trainable is False
    assert base.get_layer("fake_bn").momentum == 0.99  # pretrained statistics are not re-tuned
    head = {"dense_1", "predictions"}
    owners = {layer.name for layer in model.layers for _ in layer.trainable_weights}
    assert owners == head
    assert len(model.trainable_weights) == 4  # two kernels, two biases

    frozen_before = [np.array(w) for w in base.weights]
    head_before = [np.array(w) for w in model.trainable_weights]
    model.train_on_batch(images(1), np.array([0, 1, 2, 0, 1, 2, 0, 1]))

    # Weights and BatchNormalization moving statistics alike: the base ran in inference mode.
    assert all(np.array_equal(b, np.array(a)) for b, a in zip(frozen_before, base.weights))
    assert any(not np.array_equal(b, np.array(a)) for b, a in zip(head_before, model.trainable_weights))
    # Its dropout too, though the classifier runs in training mode: its features are predict's.
    features, _ = split_at_features(model)
    np.testing.assert_array_equal(np.asarray(features(images(1), training=True)), np.asarray(features(images(1))))


def test_a_frozen_classifier_reloads_safely_with_its_base_still_frozen_and_in_inference_mode(keras, fake_pretrained, tmp_path):
    model = build(small_backbone("mobilenetv2", weights="imagenet", freeze=True))
    batch = images(1, seed=5)
    path = tmp_path / "model.keras"
    model.save(path)

    reloaded = backbones.load_saved_model(path, "test")

    assert base_of(reloaded).trainable is False
    assert [w.name for w in base_of(reloaded).weights] == [w.name for w in base_of(model).weights]
    np.testing.assert_allclose(reloaded.predict(batch, verbose=0), model.predict(batch, verbose=0), rtol=1e-5, atol=1e-6)
    features, _ = split_at_features(reloaded)
    np.testing.assert_array_equal(np.asarray(features(batch, training=True)), np.asarray(features(batch)))


def test_a_base_trained_with_the_head_runs_in_training_mode(keras, fake_pretrained):
    """freeze false: the base is part of training, its dropout included."""
    model = build(small_backbone("mobilenetv2", weights="imagenet", freeze=False))
    features, _ = split_at_features(model)
    assert not np.array_equal(np.asarray(features(images(1), training=True)), np.asarray(features(images(1))))


def test_pretrained_base_with_freeze_false_is_fine_tuned(keras, fake_pretrained):
    """weights imagenet + freeze false: the pretrained base is trainable with the head."""
    model = build(small_backbone("mobilenetv2", weights="imagenet", freeze=False))
    base = base_of(model)

    assert base.trainable is True
    trainable = {id(w) for w in model.trainable_weights}
    assert {id(w) for w in base.get_layer("fake_conv").trainable_weights} <= trainable


def test_freeze_without_weights_leaves_the_base_trainable(keras):
    """freeze: true is ignored for a base trained from scratch, which must learn."""
    model = build(small_backbone("mobilenetv2", freeze=True))

    assert base_of(model).trainable is True
    assert len(model.trainable_weights) > 4


# --------------------------------------------------------------------------------------------
# Errors.


def test_unknown_backbone_name_lists_the_valid_ones(keras):
    """An unregistered model name is a UserError listing every registered one."""
    with pytest.raises(UserError) as caught:
        build(small_backbone("cnn", model="vgg99"))

    message = str(caught.value)
    assert "'vgg99'" in message
    for name in list_backbones():
        assert name in message


def test_input_size_below_the_family_minimum_is_a_user_error(keras):
    """mobilenetv2 at 16 px, below its 32 px minimum, is refused before any building."""
    with pytest.raises(UserError, match="input_size 16 is below its minimum 32"):
        build(small_backbone("mobilenetv2", input_size=16))


def test_pretrained_weights_for_the_custom_cnn_are_refused(keras):
    """The custom CNN has no ImageNet weights, so asking for them is a UserError."""
    with pytest.raises(UserError, match="has no pretrained weights"):
        build(small_backbone("cnn", weights="imagenet"))


def test_unknown_cnn_option_is_a_user_error(keras):
    """A typo in the CNN's options names the valid ones."""
    with pytest.raises(UserError, match="options.filtres: unknown option; valid: filters"):
        build(small_backbone("cnn", options={"filtres": [8]}))


def test_bad_application_option_is_a_user_error(keras):
    """An option the family does not take is a UserError naming the valid ones, not a TypeError."""
    with pytest.raises(UserError, match="backbone mobilenetv2: options.alpah: unknown option; valid: alpha"):
        build(small_backbone("mobilenetv2", options={"alpah": 0.35}))
    with pytest.raises(UserError, match="backbone resnet50v2: options.pooling: is set by the pipeline"):
        build(small_backbone("resnet50v2", options={"pooling": "max"}))


def test_a_family_registered_with_options_takes_them_from_params_and_refuses_others(keras, monkeypatch):
    """A new family, as docs/extending.md registers one: the options it names reach its build,
    any other is refused naming the valid ones (it could take none before)."""
    from stages.config import parse_params
    from tests.toy import toy_params

    seen = []

    def build_tiny(input_shape, weights, options, seed=0):
        seen.append(dict(options))
        inputs = keras.Input(input_shape)
        return keras.Model(inputs, keras.layers.Conv2D(options.get("width", 4), 3)(inputs), name="tiny")

    monkeypatch.setitem(backbones.REGISTRY, "tiny", None)  # removed again after the test
    backbones.register_backbone("tiny", preprocessing="unit", native_input_size=None, pretrained=False,
                                options=("width",))(build_tiny)

    model = build(small_backbone("tiny", options={"width": 6}))
    assert seen == [{"width": 6}] and base_of(model).output.shape[-1] == 6
    with pytest.raises(UserError, match="backbone tiny: options.depth: unknown option; valid: width"):
        build(small_backbone("tiny", options={"depth": 2}))
    raw = toy_params(["a", "b"])
    raw["backbones"] = {"mine": {"model": "tiny", "options": {"depth": 2}}}
    with pytest.raises(UserError, match=r"backbones.mine.options.depth: unknown option; valid: width"):
        parse_params(raw, "params.yaml")


@pytest.mark.parametrize("width", ["abc", 0, -3, [8], 2.5, True])
def test_a_family_of_ones_own_checks_its_option_values_when_params_are_read(width, monkeypatch):
    """docs/extending.md's family of one's own, given a bad option value (width: abc): before, params
    took any value and the build failed in Keras (TypeError: '<=' not supported between 'str' and
    'int'), a traceback at train. A family can now say which values it takes (`check`), and a bad
    one is refused when params are read, in one line naming the key and the values it takes."""
    from stages.config import parse_params
    from tests.toy import toy_params

    def width_problem(options):
        width = options.get("width", 16)
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            return "width", f"{width!r} is not a whole number of 1 or more"
        return None

    monkeypatch.setitem(backbones.REGISTRY, "tiny", None)  # removed again after the test
    backbones.register_backbone("tiny", preprocessing="unit", native_input_size=None, pretrained=False,
                                options=("width",), check=width_problem)(lambda *args, **kwargs: None)
    raw = toy_params(["a", "b"])
    raw["backbones"] = {"mine": {"model": "tiny", "options": {"width": width}}}
    with pytest.raises(UserError) as refused:
        parse_params(raw, "params.yaml")
    assert str(refused.value) == f"params.yaml: backbones.mine.options.width: {width!r} is not a whole number of 1 or more"
    raw["backbones"]["mine"]["options"]["width"] = 8
    parse_params(raw, "params.yaml")


# --------------------------------------------------------------------------------------------
# Saving, augmentation and preprocessing.


def test_saved_model_with_grayscale_to_rgb_reloads_safely_and_predicts_the_same(keras, tmp_path):
    """A grayscale mobilenetv2 classifier saves and reloads in safe mode with identical predictions."""
    model = build(small_backbone("mobilenetv2"), channels=1)
    batch = images(1, seed=5)
    expected = model.predict(batch, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)

    reloaded = keras.saving.load_model(path, custom_objects=custom_layers(), safe_mode=True)

    assert type(reloaded.get_layer("to_rgb")).__name__ == "GrayscaleToRGB"
    assert reloaded.inputs[0].dtype == "uint8"
    np.testing.assert_allclose(reloaded.predict(batch, verbose=0), expected, rtol=1e-5, atol=1e-6)


def test_grayscale_to_rgb_repeats_the_channel(keras):
    """GrayscaleToRGB turns (..., 1) into three identical channels."""
    layer = custom_layers()["GrayscaleToRGB"]()
    gray = np.arange(8, dtype="float32").reshape(1, 2, 2, 2)[..., :1]

    rgb = keras.ops.convert_to_numpy(layer(gray))

    assert rgb.shape == (1, 2, 2, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], gray[..., 0])
    assert layer.compute_output_shape((None, 2, 2, 1)) == (None, 2, 2, 3)


def test_augmentation_layers_are_present_only_when_configured(keras):
    """Flip, one affine resampling for rotation, zoom and translation, and contrast, each only when
    configured; none configured adds no layer."""
    augmentation = Augmentation(flip="horizontal", rotation=8, zoom=0.1, translation=0.05, contrast=0.2)
    augmented = build(small_backbone("cnn"), augmentation=augmentation)
    plain = build(small_backbone("cnn"))

    steps = augmented.get_layer("augmentation").layers
    assert [type(step).__name__ for step in steps] == ["RandomFlip", "RandomAffine", "RandomContrast"]
    assert (steps[1].rotation, steps[1].zoom, steps[1].translation) == (8, 0.1, 0.05)  # degrees, fractions
    assert "augmentation" not in {layer.name for layer in plain.layers}
    assert augmentation_layers(Augmentation(), seed=0) is None
    only_flip = augmentation_layers(Augmentation(flip="vertical"), seed=0)
    assert [type(step).__name__ for step in only_flip.layers] == ["RandomFlip"]
    only_zoom = augmentation_layers(Augmentation(zoom=0.2), seed=0)
    assert [type(step).__name__ for step in only_zoom.layers] == ["RandomAffine"]
    # Augmentation is active in training only: inference is deterministic.
    batch = images(1)
    np.testing.assert_array_equal(augmented.predict(batch, verbose=0), augmented.predict(batch, verbose=0))


@pytest.mark.parametrize(
    ("mode", "low", "high"),
    [("unit", 0.0, 1.0), ("tf", -1.0, 1.0), ("none", 0.0, 255.0)],
)
def test_preprocessing_maps_the_byte_range(keras, mode, low, high):
    """Each preprocessing mode maps 0 and 255 to the range its backbone family expects."""
    layer = backbones.preprocessing_layer(mode)

    out = keras.ops.convert_to_numpy(layer(np.array([[0.0, 255.0]], dtype="float32")))

    np.testing.assert_allclose(out, [[low, high]], atol=1e-6)


def test_torch_preprocessing_standardises_with_imagenet_statistics(keras):
    """'torch' preprocessing maps the ImageNet mean colour to zero."""
    layer = backbones.preprocessing_layer("torch")
    mean = np.array([[[[0.485 * 255, 0.456 * 255, 0.406 * 255]]]], dtype="float32")

    out = keras.ops.convert_to_numpy(layer(mean))

    np.testing.assert_allclose(out, np.zeros((1, 1, 1, 3)), atol=1e-4)


KERAS_PREPROCESS_MODULES = {
    "VGG16": "vgg16",
    "ResNet50V2": "resnet_v2",
    "ResNet101V2": "resnet_v2",
    "ResNet152V2": "resnet_v2",
    "MobileNetV2": "mobilenet_v2",
    "InceptionV3": "inception_v3",
    "DenseNet121": "densenet",
    "DenseNet169": "densenet",
    "DenseNet201": "densenet",
    "NASNetMobile": "nasnet",
    "NASNetLarge": "nasnet",
    "EfficientNetB0": "efficientnet",
    "EfficientNetB1": "efficientnet",
    "EfficientNetB2": "efficientnet",
    "EfficientNetB3": "efficientnet",
    "EfficientNetB4": "efficientnet",
    "EfficientNetB5": "efficientnet",
    "EfficientNetB6": "efficientnet",
    "EfficientNetB7": "efficientnet",
    "EfficientNetV2B0": "efficientnet_v2",
    "EfficientNetV2B1": "efficientnet_v2",
    "EfficientNetV2B2": "efficientnet_v2",
    "EfficientNetV2B3": "efficientnet_v2",
    "EfficientNetV2S": "efficientnet_v2",
    "EfficientNetV2M": "efficientnet_v2",
    "EfficientNetV2L": "efficientnet_v2",
    "ConvNeXtTiny": "convnext",
}


@pytest.mark.parametrize("name", sorted(backbones.APPLICATIONS))
def test_in_model_preprocessing_matches_the_familys_preprocess_input(name):
    """Each keras.applications entry preprocesses exactly as the family's own preprocess_input."""
    import importlib

    factory, mode, _, _ = backbones.APPLICATIONS[name]
    module = importlib.import_module(f"keras.applications.{KERAS_PREPROCESS_MODULES[factory]}")
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype("float32")
    ours = np.asarray(backbones.preprocessing_layer(mode)(images))
    theirs = np.asarray(module.preprocess_input(images.copy()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(("name", "module"), [("vgg16", "vgg16"), ("resnet50v2", "resnet_v2"), ("densenet121", "densenet")])
def test_under_mixed_precision_the_layers_before_the_base_compute_in_float32(keras, name, module):
    """On a GPU train sets mixed_bfloat16. The base then computes in bfloat16, but the model's
    input chain (cast, augmentation, resizing, to RGB, preprocessing) stays float32, so the base
    is fed what the family's preprocess_input gives, not values rounded to bfloat16 (VGG's mean
    103.939 to 104, pixels above 128 to whole numbers)."""
    import importlib

    from stages import runtime

    batch = images(1, count=2, seed=3)
    with runtime.settings_kept():
        keras.config.set_dtype_policy("mixed_bfloat16")
        model = build(small_backbone(name), augmentation=Augmentation(rotation=10.0, zoom=0.1, contrast=0.1))
        size = model.get_layer("resize").output.shape[1]
        inputs = keras.Model(model.inputs, model.get_layer("preprocess").output)
        ours = keras.ops.convert_to_numpy(inputs([batch], training=False))
        base_output = base_of(model).output.dtype
    resized = keras.ops.convert_to_numpy(keras.layers.Resizing(size, size, dtype="float32")(batch.astype("float32")))
    theirs = importlib.import_module(f"keras.applications.{module}").preprocess_input(np.repeat(resized, 3, axis=-1))

    assert [model.get_layer(layer).output.dtype for layer in ("to_float", "augmentation", "resize", "to_rgb", "preprocess")] == ["float32"] * 5
    assert base_output == "bfloat16"
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def test_the_efficientnet_packages_preprocessing_is_ours_inside_the_model():
    """efficientnet.tfkeras.preprocess_input (ImageNet mean/std on [0, 1]) equals the registry's
    in-model preprocessing for the efn_b* entries."""
    import efficientnet.tfkeras as efn

    modes = {backbones.get_backbone(name).preprocessing for name in backbones.EFFICIENTNET_PACKAGE}
    assert modes == {"torch"}
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype("float32")
    ours = np.asarray(backbones.preprocessing_layer("torch")(images))
    np.testing.assert_allclose(ours, np.asarray(efn.preprocess_input(images.copy())), rtol=1e-5, atol=1e-4)


def test_a_pretrained_backbone_without_its_pinned_file_is_a_user_error(keras):
    with pytest.raises(UserError, match="needs the pinned weights file; run the weights stage"):
        build_model(small_backbone("mobilenetv2", weights="imagenet"), image_size=IMAGE_SIZE, channels=1,
                    num_classes=NUM_CLASSES, augmentation=Augmentation(), seed=0)


RELOAD_AND_PREDICT = """
import sys
import numpy as np
from stages.backbones import load_saved_model
from stages.errors import UserError
try:
    model = load_saved_model(sys.argv[1], "evaluate@toy-efn_b0")
except UserError as error:
    raise SystemExit(str(error))
np.save(sys.argv[2], model.predict(np.load(sys.argv[3]), verbose=0))
"""


def test_an_efficientnet_package_model_reloads_in_a_fresh_process_on_tensorflow_only(keras, tmp_path):
    """The package's FixedDropout layer is known to Keras only once efficientnet.tfkeras is
    imported: evaluate and predict load the model in a process that never built one."""
    model = build(small_backbone("efn_b0", head=HeadConfig(pool="avg", dense=[], dropout=0.0)))
    batch = images(1, count=2)
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "batch.npy", batch)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def reload(backend: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        return subprocess.run(
            [sys.executable, "-c", RELOAD_AND_PREDICT, str(tmp_path / "model.keras"), str(tmp_path / "out.npy"),
             str(tmp_path / "batch.npy")], cwd=repo, env=env, capture_output=True, text=True, timeout=600,
        )

    result = reload("tensorflow")
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), model.predict(batch, verbose=0), rtol=1e-5, atol=1e-6)

    result = reload("jax")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"evaluate@toy-efn_b0: {tmp_path / 'model.keras'} holds the efficientnet package's layers, which run on "
        "TensorFlow only (KERAS_BACKEND is jax); run it with KERAS_BACKEND=tensorflow"
    )


@pytest.mark.parametrize("damage", ["empty", "truncated", "missing", "weights damaged inside", "no config.json"])
def test_a_damaged_model_file_is_one_line_naming_it(keras, tmp_path, damage):
    import zipfile

    path = tmp_path / "model.keras"
    if damage != "missing":
        build(small_backbone("cnn")).save(path)
    if damage in ("empty", "truncated"):
        path.write_bytes(b"" if damage == "empty" else path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "weights damaged inside":  # still a zip: a member's bytes changed (its CRC fails)
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("model.weights.h5")
        data = bytearray(path.read_bytes())
        start = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
        data[start : start + 64] = bytes(byte ^ 0xFF for byte in data[start : start + 64])
        path.write_bytes(bytes(data))
    elif damage == "no config.json":
        with zipfile.ZipFile(path) as archive:
            members = {name: archive.read(name) for name in archive.namelist() if name != "config.json"}
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    with pytest.raises(UserError) as raised:
        backbones.load_saved_model(path, "evaluate@toy-cnn")
    message = str(raised.value)
    assert "\n" not in message and message.endswith("; restore it (dvc checkout) or train again")
    if damage in ("empty", "truncated", "missing"):
        assert message.startswith(f"evaluate@toy-cnn: {path} is not a Keras model file (missing, empty or cut short)")
    else:
        assert message.startswith(f"evaluate@toy-cnn: {path} is a damaged Keras model file (")


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def efficientnet_file(keras: Any, path: Any) -> Any:
    """An EfficientNetB0 (32x32) weights file in the published format, its normalisation holding
    the ImageNet mean and, as Keras's own file does, the standard deviations as variances."""
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    base = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    (norm,) = [layer for layer in base.layers if isinstance(layer, keras.layers.Normalization)]
    norm.set_weights([np.array(IMAGENET_MEAN, "float32"), np.array(IMAGENET_STD, "float32"), *norm.get_weights()[2:]])
    with h5py.File(path, "w") as handle:
        save_weights_to_hdf5_group(handle, base)
    return path


def test_efficientnet_from_the_pinned_file_is_built_as_for_keras_own_imagenet_weights(keras, tmp_path):
    """Keras adds a rescaling to EfficientNet only for weights="imagenet" (tensorflow#49930): from
    the pinned file the stem still sees (x / 255 - mean) / std, as the weights were trained on."""
    file = efficientnet_file(keras, tmp_path / "efficientnetb0_notop.h5")
    base = get_backbone("efficientnetb0").build((32, 32, 3), str(file), {})
    stem_input = keras.Model(base.inputs, base.get_layer("stem_conv_pad").input)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    expected = (x / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(np.asarray(stem_input(x)), expected, atol=1e-5)
    # That rescaling is a layer more than the base without weights has, which params count on.
    assert len(base.layers) == backbones.base_layers("efficientnetb0", pretrained=True) == backbones.BASE_LAYERS["efficientnetb0"] + 1


def test_a_pinned_file_other_than_the_one_keras_loads_is_a_user_error(keras, tmp_path):
    file = efficientnet_file(keras, tmp_path / "efficientnetb1_notop.h5")
    with pytest.raises(UserError, match="Keras loads its ImageNet weights from efficientnetb0_notop.h5, but the pinned file"):
        get_backbone("efficientnetb0").build((32, 32, 3), str(file), {})


def test_an_efficientnet_package_base_with_the_wrong_weights_file_is_one_line(keras, tmp_path):
    """A file that does not fit the efficientnet package's base (a mirror's B1 file pinned for B0)
    is one line naming it, as for keras.applications' families."""
    import h5py
    import efficientnet.tfkeras as efn
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    path = tmp_path / "efficientnet-b0_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5"
    with h5py.File(path, "w") as handle:
        save_weights_to_hdf5_group(handle, efn.EfficientNetB1(include_top=False, weights=None, input_shape=(32, 32, 3)))
    keras.backend.clear_session()
    with pytest.raises(UserError) as raised:
        get_backbone("efn_b0").build((32, 32, 3), str(path), {})
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"backbone efficientnet package EfficientNetB0: could not load the weights file {path} (")
    assert message.endswith("; run the weights stage again for this experiment")


@pytest.mark.parametrize("name", ["efficientnetb0", "efn_b0"])
def test_memory_running_out_while_a_base_is_built_is_not_blamed_on_its_weights_file(keras, tmp_path, monkeypatch, name):
    """Memory running out while the base is built with its weights is not a wrong file: advising to
    fetch the weights again would not help. The error goes up as raised."""
    import efficientnet.tfkeras as efn

    def exhausted(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError("out of memory allocating the base")

    monkeypatch.setattr(keras.applications, "EfficientNetB0", exhausted)
    monkeypatch.setattr(efn, "EfficientNetB0", exhausted)
    with pytest.raises(MemoryError, match="out of memory allocating the base"):
        get_backbone(name).build((32, 32, 3), str(tmp_path / "efficientnetb0_notop.h5"), {})
