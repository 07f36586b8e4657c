"""Decoding images: checking one fully, and loading one at the working resolution.

Both use Pillow. Every image is decoded to the last pixel when it is checked, so a truncated file
is caught in validate, not in the middle of training. Images are normalised on load: EXIF rotation
applied, 16-bit, palette, CMYK and alpha images converted, grayscale and colour adapted to the
dataset's channel count. Of a file with several frames (an animated GIF or WebP, a multi-page
TIFF, a camera's MPO JPEG), the first is the image; the check counts the frames, so that the
manifest says which files had more.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

# Refuse decompression bombs (a 30,000 x 30,000 image is 900 MP) before they are decoded.
MAX_PIXELS = 12_000 * 12_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
EXIF_ORIENTATION = 0x0112
PHOTOMETRIC, MIN_IS_WHITE = 262, 0  # a TIFF tag and its value


@dataclass(frozen=True)
class ImageCheck:
    width: int | None
    height: int | None
    mode: str | None
    error: str = ""  # non-empty: the file cannot be used, and why
    frames: int | None = None  # more than 1: an animation or multi-page file, of which the first is used
    near: tuple[str, str] = ("", "")  # near_hash(): the perceptual hash and its unsure bits, or ("", "")


def check_image(path: Path) -> ImageCheck:
    """Open and fully decode `path`; report its size (upright, after EXIF rotation) and mode, or
    why it cannot be used. The reason never holds the file's full path: the manifest it goes
    into is the same on every machine."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                mode = image.mode
                frames = int(getattr(image, "n_frames", 1))
                if width * height > MAX_PIXELS:
                    return ImageCheck(width, height, mode, f"too large: {width}x{height} pixels")
                image.load()
                width, height = image.size
                turn = _turn(image)
                if turn in QUARTER_TURNS:
                    width, height = height, width
                if mode not in ("RGB", "L"):  # prove the conversion load_image will make works
                    _to_mode(image, "RGB")
                near = near_hash(image, turn)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return ImageCheck(None, None, None, f"too large: {_without_path(error, path)}")
    except UnusablePixels as error:
        return ImageCheck(None, None, None, f"unusable pixels: {error}")
    except (OSError, SyntaxError, ValueError) as error:
        return ImageCheck(None, None, None, f"undecodable: {_without_path(error, path)}")
    except Exception as error:  # a decoder's own failure on a hostile file is still the file's fault
        return ImageCheck(None, None, None, f"undecodable: {type(error).__name__}: {_without_path(error, path)}")
    return ImageCheck(width, height, mode, "", frames, near)


def _without_path(error: BaseException, path: Path) -> str:
    text = str(error)
    for form in {str(path.resolve()), str(path)}:
        text = text.replace(form, path.name)
    return text


def check_pixels(pixels: np.ndarray) -> ImageCheck:
    """The same report as check_image, for an image held as a uint8 array (H, W[, C])."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3, 4)):
        return ImageCheck(None, None, None, f"undecodable: pixel array of shape {pixels.shape} and type {pixels.dtype}")
    mode = "L" if pixels.ndim == 2 or pixels.shape[2] == 1 else ("RGB" if pixels.shape[2] == 3 else "RGBA")
    near = near_hash(Image.fromarray(pixels[..., 0] if mode == "L" and pixels.ndim == 3 else pixels))
    return ImageCheck(int(pixels.shape[1]), int(pixels.shape[0]), mode, "", 1, near)


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode `path` upright, convert to `channels` (1 or 3) and resize to size x size, uint8.
    Of an animated GIF or a multi-page TIFF, the first frame (as Keras's own loaders do)."""
    with Image.open(path) as image:
        image.load()
        turn = _turn(image)
        converted = _to_mode(image, "L" if channels == 1 else "RGB")  # before turning: it reads the file's format
        return _normalise(converted.transpose(turn) if turn is not None else converted, size, channels)


# EXIF orientation -> the turn that makes the image upright (as ImageOps.exif_transpose does).
TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
QUARTER_TURNS = {TURNS[5], TURNS[6], TURNS[7], TURNS[8]}


def _turn(image: Image.Image) -> Image.Transpose | None:
    """The turn a loaded image needs to stand upright, from its EXIF orientation. (A TIFF turns
    itself as it loads, and drops the tag.) Not ImageOps.exif_transpose: it also rewrites the
    EXIF block, which fails on values some cameras write, such as a shutter speed of -1/0
    (Pillow issue 8965), on an image that is otherwise fine."""
    orientation = image.getexif().get(EXIF_ORIENTATION)
    # A whole number, however stored (a SHORT, or a RATIONAL 6/1); anything else is no turn.
    return TURNS.get(orientation) if isinstance(orientation, numbers.Real) else None


def load_pixels(pixels: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Like load_image, for an image held as a uint8 array (H, W[, C])."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    return _normalise(Image.fromarray(pixels), size, channels)


def _normalise(image: Image.Image, size: int, channels: int) -> np.ndarray:
    image = _to_mode(image, "L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


class UnusablePixels(ValueError):
    """An image that decodes, but whose pixels cannot be shown (NaN in a float TIFF)."""


def _to_mode(image: Image.Image, target: str) -> Image.Image:
    # A PNG's tRNS colour key (gray or RGB; optipng and oxipng store an on-or-off alpha so) is its
    # transparency as much as an alpha channel is: made one here, it is flattened onto white below.
    key = image.info.get("transparency") if image.mode != "P" else None
    if key is not None and image.mode in ("1", "L", "RGB"):
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        opaque = np.asarray(image) != key if isinstance(key, int) else None  # a 16-bit key, before scaling
        # A PGM/PPM of more than 8 bits opens as 32-bit "I", its values scaled to 0..65535.
        sixteen = image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PPM")
        gray = _to_8_bits(np.asarray(image), image.mode, sixteen)
        # A TIFF's min-is-white (photometric 0: a DICOM MONOCHROME1 X-ray) stores 0 for white;
        # Pillow flips it only at 8 bits.
        if image.format == "TIFF" and getattr(image, "tag_v2", {}).get(PHOTOMETRIC) == MIN_IS_WHITE:
            np.subtract(255, gray, out=gray)
        image = Image.fromarray(gray, mode="L")
        if opaque is not None:
            image.putalpha(Image.fromarray(opaque.view(np.uint8) * np.uint8(255)))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied alpha: Pillow converts it to LA only
        image = image.convert("LA")
    if image.mode == "LAB":  # CIELAB (a TIFF's photometric 8): Pillow converts it through a profile
        image = ImageCms.applyTransform(image, _lab_to_srgb())
    if image.mode in ("RGBA", "LA"):
        # Transparent pixels become white, the usual background of icons and scans.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert(target)


def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")


def _to_8_bits(array: np.ndarray, mode: str, sixteen: bool) -> np.ndarray:
    """A 16-bit, 32-bit or float single-channel image as 8 bits, keeping its brightness: 16-bit
    values are divided by 257 (65535 becomes 255), values already in 0..255 stay, floats in 0..1
    are scaled by 255. Only values outside every such range are stretched to 0..255. `sixteen`:
    the file declares 16 bits, so even a dark image's values are divided."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise UnusablePixels(f"{bad} of {array.size} pixel values are NaN or infinite")
    low, high = float(array.min()), float(array.max())
    if sixteen or (mode == "I" and low >= 0 and 255 < high <= 65535):
        # x / 257 rounded, in integers, 1,024 rows at a time: a 12,000 x 12,000 X-ray in float64
        # would take gigabytes (a worker per core, each holding one).
        out = np.empty(array.shape, np.uint8)
        for start in range(0, len(array), 1024):
            wide = array[start:start + 1024].astype(np.uint32)
            wide *= 255
            wide += 32767
            wide //= 65535
            out[start:start + 1024] = wide
        return out
    array = array.astype(np.float64)
    if low >= 0 and high <= 255 and (mode == "I" or high > 1):
        scaled = array
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = array * 255.0
    else:
        scaled = (array - low) * (255.0 / ((high - low) or 1.0))
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


# --- a perceptual hash, for near-duplicates ---------------------------------------------------
# The same picture resized (64x64 and 128x128) or re-encoded (JPEG quality 95 and 70) has other
# bytes, so another sha256; its hash here is the same, or one the other's probes reach. A
# difference hash (dHash): the image in gray, as the exact mean of each cell of an 8-row,
# 9-column grid, and for each of the 64 pairs of cells side by side, whether the right one is
# brighter by more than NEAR_STEP, darker by more, or neither. Measured on 1,600 crops of 16 of
# scikit-image's sample photos, each copied at 128 px JPEG 95 and 64 px JPEG 70: the cell means
# of the two copies differ by under 1.9 gray levels in 99% of cells, under 4 in 99.9%.

NEAR_STEP = 6.0
"""Gray levels (of 255) two cells must differ by to count: above copies' 4-level noise, so a
flat area (a white background, a sky) reads "neither" in every copy, not a coin toss."""

NEAR_PROBES = 8
"""The differences nearest NEAR_STEP, each also taken the other way when copies are looked for:
2**8 = 256 hashes per image. Of 714 such copy pairs (of 960 crops; the rest too uniform to
hash), 705 were found so; by equal hashes alone, about a third. (Of copies shrunk to a third of
their side, 16 to 80 px, 485 of 712.)"""

NEAR_MIN_SIDE = 16
"""Smaller images are not hashed: a cell would be under 2 px, so the hash is a few raw pixels,
which distinct drawings share (sklearn's 8x8 digits, upscaled to 32 px and so past this guard,
fell into 33 groups, one of 34 images: an upscaled tiny image can still flood the report)."""

NEAR_MIN_EDGES = 16
"""Images with fewer differences than this (of 64) past NEAR_STEP are not hashed: too uniform
for a hash to tell them apart (blank scans all hash alike; 2,734 of 6,328 32 px tiles of photos fell
into one group without this; with it and NEAR_MIN_ROWS, 2 of the 2,214 compared, in one group)."""


NEAR_MIN_ROWS = 4
"""Images whose 8 rows of the grid show fewer different patterns than this are not hashed: a
smooth gradient (a tiny image upscaled: a 2x2 field stretched to 16 px) repeats one row, so the
hash holds 8 bits, not 64; a test's miniature GTSRB, 301 images of 2x2 and 3x3 random values
stretched to 16-28 px, made 12 groups without this, 4 with it."""


def _patterns(brighter: np.ndarray, darker: np.ndarray) -> int:
    """How many different rows the grid's steps make."""
    rows = np.packbits(brighter.reshape(8, 8), axis=1)[:, 0].astype(int) * 256 + np.packbits(darker.reshape(8, 8), axis=1)[:, 0]
    return len(set(rows.tolist()))


def near_hash(image: Image.Image, turn: Image.Transpose | None = None) -> tuple[str, str]:
    """The perceptual hash of a loaded image, upright after `turn`, as 32 hex digits (64 bits
    set where a cell is brighter than its left neighbour, then 64 where it is darker), and the
    mask of its NEAR_PROBES least certain bits; ("", "") for an image too small or too uniform."""
    if min(image.size) < NEAR_MIN_SIDE:
        return "", ""
    if image.mode in ("L", "RGB"):  # shrink first: a 12,000 px image need not be converted whole
        gray = image.reduce(max(1, min(image.size) // 64)).convert("L")
    else:
        gray = _to_mode(image, "L")
        gray = gray.reduce(max(1, min(gray.size) // 64))
    if turn is not None:
        gray = gray.transpose(turn)
    pixels = np.asarray(gray, dtype=np.float64)
    # The exact mean of each cell: Pillow's BOX filter weighs pixels a cell cuts unevenly, which
    # moved a cell by up to 8 gray levels between a 64 px and a 128 px copy.
    cells = _cell_weights(pixels.shape[0], 8) @ pixels @ _cell_weights(pixels.shape[1], 9).T
    steps = (cells[:, 1:] - cells[:, :-1]).ravel()
    brighter, darker = steps > NEAR_STEP, steps < -NEAR_STEP
    if int(brighter.sum() + darker.sum()) < NEAR_MIN_EDGES or _patterns(brighter, darker) < NEAR_MIN_ROWS:
        return "", ""
    bits = np.concatenate([brighter, darker])
    unsure = np.zeros(128, bool)
    for i in np.argsort(np.abs(np.abs(steps) - NEAR_STEP), kind="stable")[:NEAR_PROBES]:
        unsure[i if steps[i] > 0 else i + 64] = True  # the bit that turns if this step is misread
    return _hex(bits), _hex(unsure)


def _cell_weights(length: int, cells: int) -> np.ndarray:
    """(cells, length): how much of each cell of an even division of `length` pixels each pixel
    covers, each row summing to 1."""
    edges = np.arange(cells + 1) * length / cells
    start = np.arange(length)
    covered = np.minimum(edges[1:, None], start + 1) - np.maximum(edges[:-1, None], start)
    weights = np.clip(covered, 0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def _hex(bits: np.ndarray) -> str:
    return np.packbits(bits).tobytes().hex()


def near_probes(hash_hex: str, unsure_hex: str) -> list[str]:
    """The hash and every variant with some of its unsure bits turned: the hashes a resized or
    re-encoded copy of the image may have."""
    value, unsure = int(hash_hex, 16), int(unsure_hex, 16)
    probes = [value]
    for bit in range(128):
        if unsure >> bit & 1:
            probes += [probe ^ (1 << bit) for probe in probes]
    return [f"{probe:032x}" for probe in probes]
