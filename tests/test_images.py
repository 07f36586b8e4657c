"""stages.images on hostile and unusual files: each is loaded upright and normalised to the
dataset's channels, or refused with a reason that names no machine path."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.images import MAX_PIXELS, ImageCheck, check_image, load_image

REPO = Path(__file__).resolve().parents[1]


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height (8-bit RGB) and holds no pixel data: a decompression
    bomb's first bytes, without the bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_cmyk_jpeg_loads_as_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red in CMYK
    assert check_image(tmp_path / "cmyk.jpg").mode == "CMYK"
    pixels = load_image(tmp_path / "cmyk.jpg", 16, 3)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    red, green, blue = pixels.reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60


def test_a_cielab_tiff_loads_as_its_colour(tmp_path: Path) -> None:
    # L*=53, a*=80, b*=67 is sRGB red; Pillow's LAB mode stores L* x 2.55 and a*, b* + 128.
    Image.new("LAB", (16, 16), (135, 208, 195)).save(tmp_path / "lab.tif")
    assert check_image(tmp_path / "lab.tif") == ImageCheck(16, 16, "LAB", "", frames=1)
    red, green, blue = load_image(tmp_path / "lab.tif", 8, 3).reshape(-1, 3).mean(axis=0)
    assert red > 230 and green < 30 and blue < 30
    assert abs(int(load_image(tmp_path / "lab.tif", 8, 1)[0, 0, 0]) - 76) <= 3  # red's luma: 0.299 x 255


def test_sixteen_bit_png_keeps_its_brightness(tmp_path: Path) -> None:
    dark = np.full((8, 8), 1000, dtype=np.uint16)  # 1.5% of full scale: a dark image, not a white one
    Image.fromarray(dark).save(tmp_path / "dark.png")
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert check_image(tmp_path / "dark.png").mode.startswith("I")
    assert np.all(load_image(tmp_path / "dark.png", 8, 1) == 4)  # 1000 / 257
    loaded = load_image(tmp_path / "ramp.png", 8, 1)[..., 0]
    assert np.array_equal(loaded, np.rint(ramp / 257).astype(np.uint8))
    assert load_image(tmp_path / "ramp.png", 8, 3).shape == (8, 8, 3)


def test_exif_rotated_jpeg_is_loaded_and_measured_upright(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    check = check_image(tmp_path / "rotated.jpg")
    assert (check.width, check.height) == (20, 40)  # as displayed
    with Image.open(tmp_path / "rotated.jpg") as image:
        expected = np.asarray(image.transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    upright = load_image(tmp_path / "rotated.jpg", 40, 3)
    # Upright, the red half is on top. (Square output: compare against the rotated original.)
    resized = np.asarray(Image.fromarray(expected).resize((40, 40), Image.Resampling.BILINEAR))
    assert np.abs(upright.astype(int) - resized.astype(int)).max() <= 2
    assert upright[:10].reshape(-1, 3).mean(axis=0)[0] > 200 and upright[-10:].reshape(-1, 3).mean(axis=0)[2] > 200


def exif_block(orientation: int, exif_ifd: list[tuple[int, int, bytes]]) -> bytes:
    """An APP1 EXIF block written byte by byte, as a camera does: IFD0 with the orientation and a
    pointer to an Exif IFD holding `exif_ifd`'s (tag, type, 4-byte value) entries. Pillow's own
    writer would not write the values cameras do."""
    ifd0 = [(0x0112, 3, struct.pack("<H", orientation)), (0x8769, 4, struct.pack("<I", 8 + 2 + 12 * 2 + 4))]

    def ifd(entries: list[tuple[int, int, bytes]], values_at: int) -> tuple[bytes, bytes]:
        table, values = struct.pack("<H", len(entries)), b""
        for tag, kind, value in entries:
            if len(value) <= 4:
                table += struct.pack("<HHI", tag, kind, 1) + value.ljust(4, b"\0")
            else:
                table += struct.pack("<HHII", tag, kind, 1, values_at + len(values))
                values += value
        return table + b"\0\0\0\0", values

    first, _ = ifd(ifd0, 0)
    second_at = 8 + len(first)
    second, values = ifd(exif_ifd, second_at + 2 + 12 * len(exif_ifd) + 4)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + first + second + values


def test_a_camera_exif_value_pillow_cannot_rewrite_does_not_stop_the_upright_load(tmp_path: Path) -> None:
    """A shutter speed of -1/0 (a signed rational some phones write) beside orientation 6:
    ImageOps.exif_transpose fails re-packing the EXIF (struct.error, Pillow issue 8965), so split
    crashed on a file validate had accepted. The turn is read and made without rewriting it."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored: on top when upright
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif_block(6, [(0x9201, 10, struct.pack("<ii", -1, 0))]), quality=95)

    check = check_image(path)
    upright = load_image(path, 40, 3)

    assert check.error == "" and (check.width, check.height) == (20, 40)
    assert upright[:10].reshape(-1, 3).mean(axis=0)[0] > 200 and upright[-10:].reshape(-1, 3).mean(axis=0)[2] > 200


def test_an_exif_rotated_tiff_is_measured_upright_once(tmp_path: Path) -> None:
    """A TIFF turns itself as Pillow loads it; the check must not turn its size a second time."""
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 30, 40))  # left half red as stored
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "scan.tif", exif=exif)

    check = check_image(tmp_path / "scan.tif")
    upright = load_image(tmp_path / "scan.tif", 40, 3)

    assert (check.width, check.height) == (40, 60)
    assert upright[:10].reshape(-1, 3).mean(axis=0)[0] > 200 and upright[-10:].reshape(-1, 3).mean(axis=0)[2] > 200


@pytest.mark.parametrize("maxval, stored, expected", [(65535, 200, 1), (65535, 51400, 200), (4095, 100, 6)])
def test_a_sixteen_bit_pgm_keeps_its_brightness(tmp_path: Path, maxval: int, stored: int, expected: int) -> None:
    """Pillow opens a PGM of more than 8 bits as 32-bit "I", scaled to 0..65535. A dark one (all
    values under 256) was taken for 8 bits and brightened 257 times."""
    path = tmp_path / "scan.pgm"
    path.write_bytes(f"P5 4 4 {maxval}\n".encode() + np.full((4, 4), stored, ">u2").tobytes())
    assert np.all(load_image(path, 4, 1) == expected)  # 4095: 100 / 4095 * 255 = 6.2


def test_a_float_image_with_nan_is_set_aside_not_blackened(tmp_path: Path) -> None:
    """One NaN made min() and max() NaN, and every pixel 0: an all-black image, accepted."""
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "ramp.tif")
    ramp[0, 0] = np.nan
    Image.fromarray(ramp).save(tmp_path / "nan.tif")

    assert check_image(tmp_path / "ramp.tif").error == ""
    assert load_image(tmp_path / "ramp.tif", 8, 1).max() == 255
    assert check_image(tmp_path / "nan.tif").error == "unusable pixels: 1 of 64 pixel values are NaN or infinite"


def test_a_sixteen_bit_image_is_converted_in_integers_exactly(tmp_path: Path) -> None:
    """The integer conversion gives the float one's values (x / 257, rounded): all of 0..65535."""
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(every).save(tmp_path / "every.png")
    assert np.array_equal(load_image(tmp_path / "every.png", 256, 1)[..., 0], np.rint(every / 257.0).astype(np.uint8))


def test_checking_the_largest_sixteen_bit_image_takes_about_a_gigabyte(tmp_path: Path) -> None:
    """A 12,000 x 12,000 16-bit X-ray (MAX_PIXELS; 0.3 MB of PNG) is checked in a child process
    whose peak memory is measured: the conversion in float64 peaked at 4.8 GB, and split decodes
    with one worker per core."""
    Image.fromarray(np.full((12_000, 12_000), 30_000, np.uint16)).save(tmp_path / "xray.png")
    probe = (
        "import sys; from pathlib import Path; from stages.images import check_image; "
        "print(check_image(Path(sys.argv[1])).error or 'ok'); "
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "xray.png")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    verdict, peak_kib = result.stdout.splitlines()
    assert verdict == "ok"
    assert int(peak_kib) < 1536 * 1024  # 1.0 GB measured: the decoded image, its array, the 8-bit and RGB copies


@pytest.mark.parametrize("kind", ["RGB", "L", "I;16"])
def test_a_png_with_a_transparent_colour_key_is_flattened_onto_white_as_rgba_is(tmp_path: Path, kind: str) -> None:
    """An icon whose transparency is a tRNS colour key (what optipng and oxipng make of an RGBA PNG
    whose alpha is only on or off) loads like the same icon saved as RGBA: its transparent pixels
    white, not the colour stored under them."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = (200, 0, 0, 255)  # an opaque red square on a transparent black ground
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    keyed = {"RGB": Image.fromarray(rgba[..., :3]), "L": Image.fromarray(rgba[..., :3]).convert("L"),
             "I;16": Image.fromarray(np.asarray(Image.fromarray(rgba[..., :3]).convert("L")).astype(np.uint16) * 257)}
    keyed[kind].save(tmp_path / "keyed.png", transparency=(0, 0, 0) if kind == "RGB" else 0)
    assert check_image(tmp_path / "keyed.png").mode == kind
    for channels in (3, 1):
        np.testing.assert_array_equal(load_image(tmp_path / "keyed.png", 8, channels)[0, 0], [255] * channels)
        if kind == "RGB":
            np.testing.assert_array_equal(load_image(tmp_path / "keyed.png", 8, channels),
                                          load_image(tmp_path / "rgba.png", 8, channels))


def test_gray_in_an_rgb_dataset_and_colour_in_a_gray_one(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 100).save(tmp_path / "gray.png")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    assert np.all(load_image(tmp_path / "gray.png", 8, 3) == 100)
    as_gray = load_image(tmp_path / "red.png", 8, 1)
    assert as_gray.shape == (8, 8, 1) and np.all(as_gray == 76)  # ITU-R 601 luma of pure red


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.png", b"", "undecodable: "),
        ("notes.jpg", b"this is not an image at all", "undecodable: cannot identify image file 'notes.jpg'"),
    ],
)
def test_a_file_that_is_not_an_image_is_refused_without_its_path(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    (tmp_path / name).write_bytes(content)
    check = check_image(tmp_path / name)
    assert check.error.startswith(reason) and str(tmp_path) not in check.error


def test_a_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert check_image(tmp_path / "whole.jpg").error == ""
    assert check_image(tmp_path / "cut.jpg").error.startswith("undecodable: image file is truncated")


@pytest.mark.parametrize("side", [30_000, 13_000])
def test_a_huge_image_is_refused_before_it_is_decoded(tmp_path: Path, side: int) -> None:
    """30,000 x 30,000 (past twice the limit: Pillow refuses it on open) and 13,000 x 13,000
    (past the limit: its warning is an error here), in a child process whose peak memory is
    measured: decoding either would take gigabytes."""
    assert side * side > MAX_PIXELS
    bomb = png_header_only(tmp_path / "bomb.png", side, side)
    probe = (
        "import sys; from pathlib import Path; from stages.images import check_image; "
        "print(check_image(Path(sys.argv[1])).error); "
        # VmHWM: this program's peak. (ru_maxrss would include the forked pytest's, which Linux
        # carries across exec.)
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(bomb)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    reason, peak_kib = result.stdout.splitlines()
    assert reason.startswith("too large: ") and str(side * side) in reason.replace(",", "")
    assert int(peak_kib) < 400 * 1024  # a decoded 13,000 x 13,000 RGB image alone is 507 MB


@pytest.mark.parametrize("suffix", [".gif", ".tiff"])
def test_an_animation_or_multi_page_file_is_its_first_frame_and_counted(tmp_path: Path, suffix: str) -> None:
    """An animated GIF or a three-page TIFF: the check counts its frames, the load is frame one."""
    frames = [Image.new("L", (16, 16), value) for value in (10, 128, 250)]
    path = tmp_path / f"moving{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:])

    check = check_image(path)
    loaded = load_image(path, 16, 1)

    assert check.error == "" and check.frames == 3
    assert int(loaded.min()) == int(loaded.max()) == 10
    single = tmp_path / f"still{suffix}"
    frames[1].save(single)
    assert check_image(single).frames == 1


@pytest.mark.parametrize("kind", ["uint16", "float32"])
def test_a_min_is_white_tiff_of_more_than_8_bits_loads_as_it_looks(tmp_path: Path, kind: str) -> None:
    """A TIFF whose PhotometricInterpretation is 0 ("min-is-white", a DICOM MONOCHROME1 X-ray
    exported as is) stores 0 for white. Pillow flips an 8-bit one as it loads, but opens a 16-bit
    or float one with its values as stored: the X-ray loaded as its negative."""
    from PIL import TiffImagePlugin

    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    stored = (ramp * 65535).astype(np.uint16) if kind == "uint16" else ramp.astype(np.float32)
    white_is_zero = TiffImagePlugin.ImageFileDirectory_v2()
    white_is_zero[262] = 0
    Image.fromarray(stored).save(tmp_path / "inverted.tif", tiffinfo=white_is_zero)
    Image.fromarray(255 - np.rint(ramp * 255).astype(np.uint8)).save(tmp_path / "as_seen.tif")

    assert check_image(tmp_path / "inverted.tif").error == ""
    for channels in (1, 3):
        np.testing.assert_array_equal(load_image(tmp_path / "inverted.tif", 8, channels),
                                      load_image(tmp_path / "as_seen.tif", 8, channels))
