"""RandomAffine: one resampling for rotation, zoom and translation, equal to Keras's own transform."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from stages import augmentation  # noqa: E402  (after the log level, before Keras is imported)
from stages.backbones import build_model, load_saved_model  # noqa: E402
from stages.config import Augmentation, BackboneConfig, HeadConfig  # noqa: E402


@pytest.fixture(scope="module")
def keras():
    import keras

    keras.utils.set_random_seed(0)
    return keras


def random_affine(**settings):
    return augmentation.layer_classes()["RandomAffine"](**settings)


def rows_of(keras, angle, scale, shift_y, shift_x, height, width):
    tensor = keras.ops.convert_to_tensor
    return augmentation.affine_rows(
        tensor(angle, "float32"), tensor(scale, "float32"), tensor(shift_y, "float32"), tensor(shift_x, "float32"),
        height, width,
    )


def test_resampling_equals_keras_affine_transform_bilinear_with_reflected_borders(keras):
    """Rotations, zooms in and out and shifts that reach past the borders: the same values as
    keras.ops.image.affine_transform, the op under Keras's RandomRotation, RandomZoom and
    RandomTranslation (bilinear, fill_mode reflect)."""
    rng = np.random.default_rng(1)
    batch, height, width = 6, 17, 23
    images = rng.integers(0, 256, (batch, height, width, 3)).astype("float32")
    angle = rng.uniform(-0.6, 0.6, batch)
    scale = rng.uniform(0.7, 1.3, batch)
    shift_y, shift_x = rng.uniform(-5, 5, batch), rng.uniform(-7, 7, batch)
    rows = rows_of(keras, angle, scale, shift_y, shift_x, height, width)

    ours = keras.ops.convert_to_numpy(augmentation.resample(keras.ops.convert_to_tensor(images), rows))
    matrices = np.stack([keras.ops.convert_to_numpy(row) for row in rows] + [np.zeros(batch)] * 2, axis=1)
    theirs = keras.ops.convert_to_numpy(
        keras.ops.image.affine_transform(images, matrices.astype("float32"), interpolation="bilinear", fill_mode="reflect")
    )

    assert ours.shape == images.shape
    assert np.abs(ours - images).max() > 50, "the transforms moved the images"
    np.testing.assert_allclose(ours, theirs, atol=0.01)


def test_a_whole_pixel_shift_copies_pixels_and_reflects_the_border(keras):
    """Shifting by (2, -3) pixels moves every value exactly, and the uncovered border is the image
    mirrored about its edge (d c b a | a b c d), as Keras fills it."""
    image = np.arange(6 * 7 * 2, dtype="float32").reshape(1, 6, 7, 2)
    rows = rows_of(keras, [0.0], [1.0], [2.0], [-3.0], 6, 7)

    shifted = keras.ops.convert_to_numpy(augmentation.resample(keras.ops.convert_to_tensor(image), rows))

    padded = np.pad(image[0], ((2, 0), (0, 3), (0, 0)), mode="symmetric")  # symmetric: about the edge
    np.testing.assert_array_equal(shifted[0], padded[:6, 3:, :])


def test_no_transform_is_the_identity_and_uint8_or_bfloat16_keep_their_dtype(keras):
    images = np.random.default_rng(2).integers(0, 256, (2, 5, 9, 1)).astype("float32")
    identity = rows_of(keras, [0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], 5, 9)

    same = augmentation.resample(keras.ops.convert_to_tensor(images), identity)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(same), images)
    as_bf16 = augmentation.resample(keras.ops.convert_to_tensor(images, "bfloat16"), identity)
    assert keras.backend.standardize_dtype(as_bf16.dtype) == "bfloat16"


def test_each_image_draws_its_own_transform_within_the_ranges(keras):
    """Angles within +-rotation degrees, scales within 1 +- zoom, shifts within +-translation,
    each spread over its range, different per image and per call; a seed repeats them."""
    layer = random_affine(rotation=10, zoom=0.2, translation=0.1, seed=7)
    first = [keras.ops.convert_to_numpy(value) for value in layer.draw(2000)]
    second = [keras.ops.convert_to_numpy(value) for value in layer.draw(2000)]
    again = [keras.ops.convert_to_numpy(value) for value in random_affine(rotation=10, zoom=0.2, translation=0.1, seed=7).draw(2000)]

    angle, scale, shift_y, shift_x = first
    limit = math.radians(10)
    assert np.abs(angle).max() <= limit and np.abs(angle).max() > 0.95 * limit
    assert np.abs(scale - 1).max() <= 0.2 + 1e-6 and np.abs(scale - 1).max() > 0.19
    for shift in (shift_y, shift_x):
        assert np.abs(shift).max() <= 0.1 + 1e-6 and np.abs(shift).max() > 0.095
        assert abs(shift.mean()) < 0.01, "centred on no shift"
    assert np.corrcoef(shift_y, shift_x)[0, 1] < 0.1, "vertical and horizontal shifts are drawn independently"
    assert len(np.unique(angle)) == 2000
    assert not np.array_equal(angle, second[0]), "each call draws anew"
    for mine, seeded in zip(first, again):
        np.testing.assert_array_equal(mine, seeded)


def test_training_transforms_and_inference_passes_unchanged(keras):
    images = keras.ops.convert_to_tensor(np.random.default_rng(3).integers(0, 256, (4, 12, 12, 3)).astype("float32"))
    layer = random_affine(rotation=20, zoom=0.1, translation=0.1, seed=0)

    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), keras.ops.convert_to_numpy(images))
    moved = keras.ops.convert_to_numpy(layer(images, training=True))
    assert np.abs(moved - keras.ops.convert_to_numpy(images)).max() > 10


@pytest.mark.parametrize("settings", [{"rotation": -1}, {"zoom": 1.0}, {"translation": -0.1}])
def test_impossible_ranges_are_refused(keras, settings):
    with pytest.raises(ValueError, match="RandomAffine: "):
        random_affine(**settings)


def augment(keras, images, seed=0, **settings):
    layers = augmentation.augmentation_layers(Augmentation(**settings), seed=seed)
    return keras.ops.convert_to_numpy(layers(keras.ops.convert_to_tensor(images), training=True))


def test_horizontal_and_vertical_flips_each_axis_on_its_own(keras):
    """Each of the four outcomes, about a quarter each: not only unchanged and turned 180 degrees
    (what Keras's RandomFlip("horizontal_and_vertical") does alone)."""
    corners = np.tile(np.array([[0, 1], [2, 3]], dtype="float32")[None, :, :, None], (800, 1, 1, 1))
    outcomes = augment(keras, corners, flip="horizontal_and_vertical").reshape(800, 4).round().astype(int)
    seen = {tuple(row): count for row, count in zip(*np.unique(outcomes, axis=0, return_counts=True))}
    assert set(seen) == {(0, 1, 2, 3), (1, 0, 3, 2), (2, 3, 0, 1), (3, 2, 1, 0)}
    assert min(seen.values()) > 140, seen


def test_contrast_lowers_and_raises_and_does_not_follow_the_flip(keras):
    """contrast: 0.5 draws factors from 0.5 to 1.5, and the flip layer's draw does not decide them
    (on one seed they would: a flipped image always had the lower half of the range)."""
    ramp = np.tile(np.linspace(100, 156, 8, dtype="float32")[None, None, :, None], (600, 8, 1, 1))
    out = augment(keras, ramp, seed=3, flip="horizontal", contrast=0.5)
    slope = (out[:, :, -1, 0] - out[:, :, 0, 0]).mean(axis=1) / 56  # the contrast factor; negative when flipped
    factor, flipped = np.abs(slope), slope < 0
    assert factor.min() < 0.6 and factor.max() > 1.4
    assert 0.4 < flipped.mean() < 0.6
    assert abs(np.corrcoef(flipped, factor)[0, 1]) < 0.15


def test_a_model_with_random_affine_compiles_with_xla_trains_saves_and_loads_in_safe_mode(keras, tmp_path: Path):
    """Keras's RandomRotation/Zoom/Translation turn XLA off for their model; RandomAffine does not.
    The model trains one XLA step, and a saved copy loads (safe mode) with the same layer and
    the same predictions."""
    model = build_model(
        BackboneConfig(model="cnn", input_size=None, weights=None, freeze=False, head=HeadConfig(pool="avg", dense=[], dropout=0.0),
                       options={"filters": [4], "convs_per_block": 1, "dropout": 0.0}),
        image_size=16, channels=3, num_classes=2,
        augmentation=Augmentation(flip="horizontal", rotation=10, zoom=0.1, translation=0.1), seed=0,
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=True)
    images = np.random.default_rng(4).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(8) % 2

    model.fit(images, labels, batch_size=8, epochs=1, verbose=0)

    assert model.jit_compile is True
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = load_saved_model(path, "test")
    layer = loaded.get_layer("augmentation").get_layer("affine")
    assert type(layer).__name__ == "RandomAffine"
    assert (layer.rotation, layer.zoom, layer.translation, layer.seed) == (10, 0.1, 0.1, 0)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)


def test_the_model_called_without_training_does_not_augment_before_or_after_saving(keras, tmp_path: Path):
    """`model(images)`, Keras's call for a small batch, is inference: the same probabilities as
    predict, for a model as built and as loaded. Keras's RandomFlip and RandomContrast (and a
    layer's own default) took a call without `training` for training and augmented."""
    model = build_model(
        BackboneConfig(model="cnn", input_size=None, weights=None, freeze=False, head=HeadConfig(pool="avg", dense=[], dropout=0.0),
                       options={"filters": [4], "convs_per_block": 1, "dropout": 0.0}),
        image_size=16, channels=3, num_classes=2,
        augmentation=Augmentation(flip="horizontal_and_vertical", rotation=20, zoom=0.1, contrast=0.5), seed=0,
    )
    images = np.random.default_rng(5).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = load_saved_model(path, "test")

    for classifier in (model, loaded):
        expected = classifier.predict(images, verbose=0)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(classifier(images)), expected, atol=1e-6)
        trained = keras.ops.convert_to_numpy(classifier(images, training=True))
        assert np.abs(trained - expected).max() > 1e-4, "training still augments"
