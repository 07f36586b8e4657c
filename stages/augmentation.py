"""Augmentation inside the model: Keras layers that run in training only, on any backend.

A dataset's `augmentation` (params.yaml) becomes a `keras.Sequential` named `augmentation` at the
front of its models (AugmentationSteps: called without `training`, as `model(images)`, it passes
the images unchanged): RandomFlip (two, horizontal then vertical, for `horizontal_and_vertical`),
then one RandomAffine for rotation, zoom and translation together, then RandomContrast.

Why one RandomAffine rather than Keras's RandomRotation, RandomZoom and RandomTranslation: each of
those resamples the whole batch (on JAX through a three-dimensional `map_coordinates` that reads
eight neighbours per value, channels included), and all three declare `supports_jit = False`,
which switches XLA off for any model holding one. RandomAffine draws the same three transforms
per image from the same ranges, composes them into one matrix, and resamples once: four
neighbouring pixels read with one gather each, blended bilinearly, borders filled by reflection
as Keras's layers fill them. It is written in `keras.ops` alone, so it compiles with XLA on every
backend. On this project's 2-core CPU, a batch of 32 images of 224x224 takes 18 ms on JAX against
1,007 ms for the three Keras layers, and 9 ms with XLA on TensorFlow against 85 ms
(benchmarks/augmentation.py; figures in docs/benchmarks.md).

Importing this module does not import Keras.
"""

from __future__ import annotations

import math
from typing import Any

_CLASSES: dict[str, type] = {}
FLIP_SEED = 200  # offsets from the model's seed; RandomAffine takes the seed itself
CONTRAST_SEED = 202


def augmentation_layers(augmentation: Any, seed: int, dtype: str = "float32") -> Any | None:
    """The `augmentation` Sequential for a config.Augmentation, or None when there is none.

    Its layers compute in `dtype` whatever the dtype policy: pixel values 0-255, interpolated."""
    from keras import layers

    steps = []
    # Each layer draws from a seed of its own (beside the model's dropout seeds, seed + 1..99 and
    # seed + 100..): two layers on one seed draw the same numbers, and an image's flip would decide
    # its rotation and its contrast.
    if augmentation.flip == "horizontal_and_vertical":
        # Keras's RandomFlip("horizontal_and_vertical") draws once per image for both axes: it only
        # leaves an image or turns it 180 degrees, never mirrors it. Two layers flip independently.
        steps.append(layers.RandomFlip("horizontal", seed=seed + FLIP_SEED, dtype=dtype, name="flip"))
        steps.append(layers.RandomFlip("vertical", seed=seed + FLIP_SEED + 1, dtype=dtype, name="flip_vertical"))
    elif augmentation.flip != "none":
        steps.append(layers.RandomFlip(augmentation.flip, seed=seed + FLIP_SEED, dtype=dtype, name="flip"))
    if augmentation.rotation or augmentation.zoom or augmentation.translation:
        steps.append(
            layer_classes()["RandomAffine"](
                rotation=augmentation.rotation, zoom=augmentation.zoom, translation=augmentation.translation,
                seed=seed, dtype=dtype, name="affine",
            )
        )
    if augmentation.contrast:
        # Both bounds given: Keras reads a single number c as the range [1, 1 + c], never lowering contrast.
        factor = (augmentation.contrast, augmentation.contrast)
        steps.append(
            layers.RandomContrast(factor, value_range=(0, 255), seed=seed + CONTRAST_SEED, dtype=dtype, name="contrast")
        )
    return layer_classes()["AugmentationSteps"](steps, name="augmentation") if steps else None


def layer_classes() -> dict[str, type]:
    """This module's serializable layers, registered with Keras (loading a model needs them)."""
    if not _CLASSES:
        _CLASSES["RandomAffine"] = _define_random_affine()
        _CLASSES["AugmentationSteps"] = _define_augmentation_steps()
    return dict(_CLASSES)


def _define_augmentation_steps() -> type:
    import keras

    @keras.saving.register_keras_serializable(package="classmatrix")
    class AugmentationSteps(keras.Sequential):
        """The augmentation layers in order, augmenting only when the model trains.

        Keras's RandomFlip and RandomContrast take a call without `training` for training, so
        `model(images)`, Keras's call for a small batch, would augment; here such a call is
        inference, as in predict and evaluate. fit passes training=True.
        """

        def call(self, inputs: Any, training: bool = False, mask: Any = None, **kwargs: Any) -> Any:
            return super().call(inputs, training=training, mask=mask, **kwargs)

    return AugmentationSteps


def affine_rows(angle: Any, scale: Any, shift_y: Any, shift_x: Any, height: int, width: int) -> tuple:
    """Per image, the map from an output pixel (x, y) to the input point it samples:
    x_in = a0 x + a1 y + a2, y_in = b0 x + b1 y + b2 (Keras's affine_transform convention).

    The output is the input rotated by `angle` (radians) and scaled by 1 / `scale` about the
    image's centre, then shifted by (`shift_y`, `shift_x`) pixels: a scale above 1 zooms out, as
    a positive RandomZoom factor does.
    """
    from keras import ops

    cos = ops.cos(angle) * scale
    sin = ops.sin(angle) * scale
    centre_y, centre_x = (height - 1) / 2.0, (width - 1) / 2.0
    # input = centre + scale * R(angle) @ (output - centre - shift)
    offset_x = -centre_x - shift_x
    offset_y = -centre_y - shift_y
    a0, a1 = cos, -sin
    b0, b1 = sin, cos
    a2 = a0 * offset_x + a1 * offset_y + centre_x
    b2 = b0 * offset_x + b1 * offset_y + centre_y
    return a0, a1, a2, b0, b1, b2


def resample(images: Any, rows: tuple) -> Any:
    """`images` (batch, height, width, channels) resampled through per-image affine `rows`
    (six arrays of shape (batch,), from affine_rows): bilinear, reflected at the borders
    (d c b a | a b c d | d c b a), computed in float32 and returned in the images' dtype."""
    from keras import ops

    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    batch = ops.shape(images)[0]
    a0, a1, a2, b0, b1, b2 = (ops.reshape(ops.cast(row, "float32"), (-1, 1, 1)) for row in rows)
    ys = ops.reshape(ops.arange(height, dtype="float32"), (1, height, 1))
    xs = ops.reshape(ops.arange(width, dtype="float32"), (1, 1, width))
    source_x = a0 * xs + a1 * ys + a2
    source_y = b0 * xs + b1 * ys + b2
    x0 = ops.floor(source_x)
    y0 = ops.floor(source_y)
    weight_x = source_x - x0
    weight_y = source_y - y0
    x0 = ops.cast(x0, "int32")
    y0 = ops.cast(y0, "int32")

    pixels = ops.reshape(images, (-1, channels))  # one row per pixel: a gather reads all its channels
    first = ops.reshape(ops.arange(batch, dtype="int32") * (height * width), (-1, 1, 1))
    blended = None
    for dy, share_y in ((0, 1.0 - weight_y), (1, weight_y)):
        row = _reflect(y0 + dy, height) * width + first
        for dx, share_x in ((0, 1.0 - weight_x), (1, weight_x)):
            index = ops.reshape(row + _reflect(x0 + dx, width), (-1,))
            term = ops.cast(ops.take(pixels, index, axis=0), "float32") * ops.reshape(share_y * share_x, (-1, 1))
            blended = term if blended is None else blended + term
    return ops.cast(ops.reshape(blended, (batch, height, width, channels)), images.dtype)


def _reflect(index: Any, size: int) -> Any:
    """Indices outside [0, size) mirrored back in, about the edge of the last pixel."""
    from keras import ops

    folded = ops.mod(index, 2 * size)
    return ops.where(folded >= size, 2 * size - 1 - folded, folded)


def _define_random_affine() -> type:
    import keras

    @keras.saving.register_keras_serializable(package="classmatrix")
    class RandomAffine(keras.layers.Layer):
        """Random rotation, zoom and translation per image, applied as one bilinear resampling.

        rotation: the largest angle in degrees, either way. zoom: the largest change of scale,
        either way (0.1 draws a scale in [0.9, 1.1]; above 1 zooms out), the same for height and
        width. translation: the largest shift as a fraction of the height (vertically) and of the
        width (horizontally), drawn independently. Each image draws its own, uniformly. Active in
        training only; in inference the images pass unchanged.
        """

        def __init__(self, rotation: float = 0.0, zoom: float = 0.0, translation: float = 0.0,
                     seed: int | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            for name, value in (("rotation", rotation), ("zoom", zoom), ("translation", translation)):
                if value < 0:
                    raise ValueError(f"RandomAffine: {name} must be 0 or more, not {value}")
            if zoom >= 1:
                raise ValueError(f"RandomAffine: zoom must be below 1 (a scale of 1 - zoom must stay positive), not {zoom}")
            self.rotation = float(rotation)
            self.zoom = float(zoom)
            self.translation = float(translation)
            self.seed = seed
            self.generator = keras.random.SeedGenerator(seed)

        def draw(self, batch: Any) -> tuple:
            """(angle in radians, scale, shift_y and shift_x as fractions) for `batch` images."""
            def uniform(limit: float) -> Any:
                return keras.random.uniform((batch,), -limit, limit, seed=self.generator)

            angle = uniform(self.rotation * math.pi / 180.0)
            scale = 1.0 + uniform(self.zoom)
            return angle, scale, uniform(self.translation), uniform(self.translation)

        def call(self, images: Any, training: bool = False) -> Any:
            if not training:
                return images
            height, width = images.shape[1], images.shape[2]
            angle, scale, shift_y, shift_x = self.draw(keras.ops.shape(images)[0])
            rows = affine_rows(angle, scale, shift_y * height, shift_x * width, height, width)
            return resample(images, rows)

        def compute_output_shape(self, input_shape: tuple) -> tuple:
            return input_shape

        def get_config(self) -> dict:
            return {**super().get_config(), "rotation": self.rotation, "zoom": self.zoom,
                    "translation": self.translation, "seed": self.seed}

    return RandomAffine
