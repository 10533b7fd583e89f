import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.preprocessing import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    INPUT_SIZE,
    CorruptImageError,
    ImageLimits,
    NotAnImageError,
    TooManyBytesError,
    TooManyPixelsError,
    decode_grayscale,
    pixels_to_input,
    preprocess_image,
    preprocess_image_uint8,
)
from tests.images import (
    assert_upright,
    encode,
    gradient,
    gray_image,
    jpeg_bytes,
    png_bytes,
    png_declaring,
    rgb_image,
    upright_marker,
    with_scans,
)


def assert_contract(array: np.ndarray) -> None:
    assert array.dtype == np.float32
    assert array.shape == (INPUT_SIZE, INPUT_SIZE)
    assert array.min() >= 0.0 and array.max() <= 1.0


def mode_images() -> dict[str, Image.Image]:
    rgb = rgb_image(80, 60)
    gray = gray_image(80, 60)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(gradient(80, 60, seed=3)))
    wide = (gradient(80, 60).astype(np.int32) * 257).astype(np.uint16)
    return {
        "1": gray.convert("1"),
        "L": gray,
        "LA": rgba.convert("LA"),
        "P": rgb.convert("P", palette=Image.Palette.ADAPTIVE),
        "RGB": rgb,
        "RGBA": rgba,
        "CMYK": rgb.convert("CMYK"),
        "I;16": Image.fromarray(wide),
        "I": Image.fromarray(wide.astype(np.int32)),
        "F": Image.fromarray(gradient(80, 60).astype(np.float32) / 255.0),
    }


@pytest.mark.parametrize("mode", list(mode_images()))
def test_every_mode_gives_the_contract(mode):
    image = mode_images()[mode]
    assert image.mode == mode
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    data = encode(image, fmt)
    array = preprocess_image(data)
    assert_contract(array)
    # The content survives: not a constant image.
    assert array.std() > 0.05


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_modes_scale_to_the_same_gray_as_8_bit(mode):
    reference = preprocess_image_uint8(encode(gray_image(80, 60), "PNG"))
    fmt = "PNG" if mode == "I;16" else "TIFF"
    wide = preprocess_image_uint8(encode(mode_images()[mode], fmt))
    assert np.abs(wide.astype(int) - reference.astype(int)).max() <= 1


WHITE = 255  # what transparency is flattened onto, as the README says: not the code's constant


def test_transparent_pixels_become_the_background():
    image = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (0, 0, 10, 20))  # left half opaque black
    pixels = preprocess_image_uint8(encode(image))
    assert pixels[:, :150].max() == 0
    assert pixels[:, 200:].min() == WHITE


def associated_alpha_tiff(image: Image.Image) -> bytes:
    """``image`` (LA or RGBA) as a TIFF whose alpha is premultiplied (ExtraSamples 1), as TIFF
    6.0 allows."""
    data = bytearray(encode(image, "TIFF"))
    ifd = int.from_bytes(data[4:8], "little")
    for entry in range(ifd + 2, ifd + 2 + 12 * int.from_bytes(data[ifd:ifd + 2], "little"), 12):
        if int.from_bytes(data[entry:entry + 2], "little") == 338:  # ExtraSamples
            data[entry + 8:entry + 10] = (1).to_bytes(2, "little")
            return bytes(data)
    raise AssertionError("no ExtraSamples tag")


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_premultiplied_alpha_is_flattened_as_straight_alpha_is(mode):
    """A grey TIFF with premultiplied alpha was refused as a truncated or corrupt "None"
    image: Pillow converts La only to LA."""
    opaque = Image.fromarray(gradient(80, 60)).convert(mode)
    clear = Image.new(mode, (40, 60), 0)  # premultiplied by alpha 0: every channel 0
    image = opaque.copy()
    image.paste(clear, (40, 0))
    data = associated_alpha_tiff(image)
    # Pillow undoes a colour image's premultiplying as it decodes, a grey one's not
    assert Image.open(io.BytesIO(data)).mode == {"LA": "La", "RGBA": "RGBA"}[mode]
    pixels = preprocess_image_uint8(data)
    assert np.array_equal(pixels, preprocess_image_uint8(encode(image, "PNG")))
    assert pixels[:, 200:].min() == WHITE and pixels[:, :150].std() > 10


def test_palette_with_transparency_is_flattened():
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 255, 255, 255])
    image.info["transparency"] = 0
    pixels = preprocess_image_uint8(encode(image, "GIF", transparency=0))
    assert pixels.min() == WHITE


def test_rgb_uses_luma_weights():
    image = Image.new("RGB", (350, 350), (255, 0, 0))
    pixels = preprocess_image_uint8(encode(image))
    assert pixels[0, 0] == round(255 * 299 / 1000)


def test_exif_orientation_is_applied():
    # A tall image stored sideways: the top row is bright, orientation 6 rotates it 90 degrees.
    stored = np.zeros((40, 80), dtype=np.uint8)
    stored[:, :10] = 255  # left columns bright
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    data = encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    pixels = preprocess_image_uint8(data)
    # After a 90-degree clockwise turn the bright left edge is on top.
    assert pixels[:20].mean() > 200
    assert pixels[-100:].mean() < 30


def test_animation_uses_the_first_frame():
    frames = [Image.new("L", (30, 30), 0), Image.new("L", (30, 30), 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    pixels = preprocess_image_uint8(buffer.getvalue())
    assert pixels.max() == 0


def test_resize_is_deterministic_and_already_sized_images_pass_through():
    source = gradient(INPUT_SIZE, INPUT_SIZE)
    pixels = preprocess_image_uint8(encode(Image.fromarray(source)))
    np.testing.assert_array_equal(pixels, source)
    assert np.array_equal(preprocess_image_uint8(png_bytes(90, 70)),
                          preprocess_image_uint8(png_bytes(90, 70)))


@pytest.mark.parametrize("size", [(1000, 700), (90, 70)], ids=["down", "up"])
def test_the_resize_is_the_studys_antialiased_bilinear(size):
    """The filter is part of the contract the models were trained under: another one (BOX,
    LANCZOS) would serve slightly different inputs without any other test noticing."""
    noise = np.random.default_rng(3).integers(0, 256, size[::-1], dtype=np.uint8)
    expected = Image.fromarray(noise).resize((350, 350), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(preprocess_image_uint8(encode(Image.fromarray(noise))),
                                  np.asarray(expected))


def test_model_input_is_pixels_over_255():
    pixels = preprocess_image_uint8(jpeg_bytes())
    np.testing.assert_array_equal(preprocess_image(jpeg_bytes()), pixels_to_input(pixels))
    assert pixels_to_input(np.array([0, 255], dtype=np.uint8)).tolist() == [0.0, 1.0]


def preprocess_traced(data: bytes) -> tuple[np.ndarray, int]:
    """The input pixels and the peak bytes tracemalloc saw while making them."""
    import tracemalloc

    tracemalloc.start()
    try:
        return preprocess_image_uint8(data), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_16_bit_image_converts_without_float_copies():
    """7000x7000 at 16 bits is within the default limits, and a few hundred KB as PNG; float64
    copies of it took 1.5 GB, enough to kill a worker. numpy reports its arrays to
    tracemalloc, so the peak is what the conversion holds."""
    image = Image.fromarray(np.tile(np.arange(7000, dtype=np.uint16) * 9, (7000, 1)))
    data = encode(image, "PNG")
    pixels, peak = preprocess_traced(data)
    assert peak < 450e6, f"{peak / 1e6:.0f} MB"
    assert pixels.shape == (INPUT_SIZE, INPUT_SIZE)
    # Every 16-bit value, in an image already at the input size (so no resize): the integers
    # round as v / 65535 * 255 in floats does.
    values = np.resize(np.arange(65536, dtype=np.uint16), (INPUT_SIZE, INPUT_SIZE))
    expected = np.rint(values / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(
        preprocess_image_uint8(encode(Image.fromarray(values), "PNG")), expected)


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16"])
def test_a_pngs_colour_key_is_transparent_as_an_alpha_channel_is(mode):
    """A tRNS colour key (one value marked transparent) was read as that value: black where
    the same picture with an alpha channel is flattened onto white (16-bit gray too)."""
    values = np.where(np.arange(60)[:, None] < 30, 0, 100).repeat(60, 1).astype(np.uint8)
    if mode == "I;16":
        keyed = Image.fromarray(values.astype(np.uint16) * 257)
    else:
        keyed = Image.fromarray(values).convert(mode)
    key = (0, 0, 0) if mode == "RGB" else 0
    alpha = np.where(values == 0, 0, 255).astype(np.uint8)
    with_alpha = Image.fromarray(np.stack([values, alpha], -1), "LA")
    from_key = preprocess_image_uint8(encode(keyed, "PNG", transparency=key))
    np.testing.assert_array_equal(from_key, preprocess_image_uint8(encode(with_alpha, "PNG")))
    assert from_key.max() == 255 and from_key.min() == 100  # white where keyed


def test_a_large_transparent_image_is_flattened_without_float_copies():
    """The same for alpha: a 7000x7000 RGBA PNG of under a megabyte took 1.2 GB in float32
    copies."""
    ramp = np.tile(np.arange(7000, dtype=np.uint8), (7000, 1))
    image = Image.fromarray(np.stack([ramp, ramp[::-1], ramp.T, ramp // 2 + 64], -1), "RGBA")
    data = encode(image, "PNG", compress_level=1)
    pixels, peak = preprocess_traced(data)
    assert peak < 450e6, f"{peak / 1e6:.0f} MB"
    assert pixels.shape == (INPUT_SIZE, INPUT_SIZE)
    # Every (gray, alpha) pair, at the input size: the integers give what floats gave.
    pairs = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), -1)
    la = np.resize(pairs.reshape(-1, 2), (INPUT_SIZE, INPUT_SIZE, 2)).astype(np.uint8)
    gray, alpha = la[..., 0].astype(np.float32), la[..., 1] / np.float32(255.0)
    expected = np.rint(gray * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    np.testing.assert_array_equal(
        preprocess_image_uint8(encode(Image.fromarray(la, "LA"), "PNG")), expected)


def test_large_jpeg_is_decoded_scaled_but_keeps_the_contract():
    image = rgb_image(3000, 2000)
    scaled = preprocess_image(encode(image, "JPEG", quality=90))
    assert_contract(scaled)
    # the same pixels from a lossless format, decoded whole: within the JPEG's own loss
    assert np.abs(scaled - preprocess_image(encode(image, "PNG"))).mean() < 1.5 / 255


def test_a_reduced_jpeg_maps_each_side_back_by_its_own_scale():
    """Each side of a reduced-scale decode rounds up on its own: 2801 rows at 1/8 are 351,
    so y maps back by 2801/351, not by x's 8 (a mutant with one factor for both put face
    boxes up to 4 px off, where boxes are pinned to 1 px elsewhere)."""
    decoded = decode_grayscale(encode(gray_image(4000, 2801), "JPEG", quality=80))
    assert decoded.gray.size == (500, 351) and decoded.original_size == (4000, 2801)
    assert decoded.scale == (8.0, 2801 / 351)


def test_a_jpeg_reduced_below_the_large_size_does_not_wait_for_a_large_decode():
    """What counts is the size after the reduced-scale decode: a 24-megapixel JPEG decodes
    at 750x500 and must not queue behind a 50-megapixel PNG (a mutant reading the header's
    size did, for nothing, and passed every test)."""
    import threading

    from service import preprocessing

    data = encode(gray_image(6000, 4000), "JPEG", quality=80)
    decoded = []
    with preprocessing._LARGE_DECODE:  # a large decode in progress
        worker = threading.Thread(target=lambda: decoded.append(decode_grayscale(data)))
        worker.start()
        worker.join(timeout=60)
        finished = not worker.is_alive()
    worker.join()
    assert finished and decoded[0].gray.size == (750, 500)


def test_the_model_input_is_exactly_the_pixels_over_255():
    """The contract shared by training and serving; a multiplication by 1/255 moves 126 of
    the 256 levels by a bit (a mutant that did passed every test)."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = pixels_to_input(levels)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, levels.astype(np.float32) / np.float32(255))
    assert x[0, 0] == 0 and x[-1, -1] == 1


def test_a_message_quotes_any_name_v2_accepts_whole():
    """/v2 takes names up to QUOTED_CHARACTERS long; a message quotes such a name whole and
    cuts only longer values (a mutant cutting names of 254 to 256 passed every test)."""
    from service.preprocessing import QUOTED_CHARACTERS, shown

    longest = "n" * QUOTED_CHARACTERS
    assert shown(longest) == repr(longest)
    assert shown(longest + "n") == repr(longest + "n")[:QUOTED_CHARACTERS] + "..."


# as the README lists them (PPM could be dropped from the allowed formats unnoticed)
README_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "HEIF", "AVIF")


@pytest.mark.parametrize("fmt", README_FORMATS)
def test_every_format_the_readme_lists_decodes_to_the_same_input(fmt):
    from tests.server import REPO

    readme = " ".join((REPO / "README.md").read_text().split())
    assert "(JPEG, PNG, GIF, BMP, TIFF, WebP, PPM/PGM), phone formats (HEIC, AVIF)" in readme
    assert sorted(ALLOWED_FORMATS) == sorted(README_FORMATS)
    image = gray_image(120, 90)
    reference = preprocess_image_uint8(encode(image, "PNG")).astype(int)
    lossy = fmt in ("JPEG", "WEBP", "HEIF", "AVIF")
    assert np.abs(preprocess_image_uint8(encode(image, fmt)) - reference).mean() <= (
        3 if lossy else 0)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", NotAnImageError),
        (b"hello, this is plain text, not an image\n" * 3, NotAnImageError),
        (b"<html><body>not an image</body></html>", NotAnImageError),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', NotAnImageError),
        (png_bytes(200, 200)[:300], CorruptImageError),
        (jpeg_bytes(200, 200)[:400], CorruptImageError),
    ],
    ids=["empty", "text", "html", "svg", "truncated-png", "truncated-jpeg"],
)
def test_bad_uploads_raise_typed_errors(data, error):
    with pytest.raises(error) as caught:
        preprocess_image(data)
    assert type(caught.value) is error  # the exact kind, not only a PreprocessingError
    assert caught.value.code and str(caught.value)


def test_byte_limit():
    data = png_bytes(100, 100)
    with pytest.raises(TooManyBytesError, match="limit"):
        preprocess_image(data, ImageLimits(max_bytes=len(data) - 1))
    assert_contract(preprocess_image(data, ImageLimits(max_bytes=len(data))))


def test_decompression_bomb_is_refused_from_its_header():
    data = png_declaring(30000, 30000)
    assert len(data) < 200
    with pytest.raises(TooManyPixelsError, match="too many pixels"):
        preprocess_image(data)


def test_pixel_limit_is_a_setting():
    data = png_bytes(100, 100)
    with pytest.raises(TooManyPixelsError):
        preprocess_image(data, ImageLimits(max_pixels=100 * 100 - 1))
    assert_contract(preprocess_image(data, ImageLimits(max_pixels=100 * 100)))


# What each EXIF orientation does to an upright image, undone (decoding applies the
# inverse): 5 and 7 are their own inverses, 6 and 8 each other's.
STORED_AS = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
             6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_decodes_upright_at_the_upright_size(fmt, orientation):
    """Face boxes are reported in the upright photo's pixels, so ``original_size`` must be
    its size in every format (TIFF's 5-8 were turned twice: boxes skewed by 0.6 and 1.6)."""
    # the last two decode at reduced scale, the last to a square (3000 x 2993 at 1/8)
    for width, height in ((120, 60), (4000, 2500), (3000, 2993)):
        upright = Image.fromarray(upright_marker(width, height))
        stored = upright if STORED_AS[orientation] is None else upright.transpose(
            STORED_AS[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        decoded = decode_grayscale(encode(stored, fmt, exif=exif.tobytes()))
        assert decoded.original_size == (width, height)
        assert decoded.scale[0] == pytest.approx(decoded.scale[1], rel=0.01)
        assert_upright(decoded.gray)


def exif_block(*entries: tuple[int, int, int, bytes]) -> bytes:
    """Raw big-endian EXIF of one IFD, each entry (tag, TIFF type, count, value bytes) as
    written, mistyped or not: Pillow's own writer would refuse a mistyped one."""
    extra_at = 8 + 2 + 12 * len(entries) + 4
    table, extra = b"", b""
    for tag, kind, count, value in entries:
        if len(value) <= 4:
            table += struct.pack(">HHI", tag, kind, count) + value.ljust(4, b"\0")
        else:
            table += struct.pack(">HHII", tag, kind, count, extra_at + len(extra))
            extra += value
    return (b"Exif\0\0MM\0*" + struct.pack(">IH", 8, len(entries)) + table + b"\0\0\0\0"
            + extra)


ORIENTATION_6 = (0x0112, 3, 1, struct.pack(">H", 6))
MISTYPED_TAGS = {  # each beside orientation 6, from a review's fuzzing of camera EXIF
    "ImageDescription as a DOUBLE": (0x010E, 12, 1, struct.pack(">d", 1.5)),  # AttributeError
    "Make as a RATIONAL": (0x010F, 5, 1, struct.pack(">II", 3, 2)),  # AttributeError
    "XResolution as text": (0x011A, 2, 4, b"72x\0"),  # TypeError, abs() of a str
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("mistyped", MISTYPED_TAGS.values(), ids=MISTYPED_TAGS.keys())
def test_a_mistyped_tag_beside_the_orientation_still_decodes_upright(fmt, mistyped):
    """Turning upright with Pillow's exif_transpose wrote the EXIF back: a text tag holding a
    number was a 500 (AttributeError) that lost its whole batch and stopped the command line,
    a number tag holding text a 400, for photos a browser shows (a review)."""
    sideways = Image.fromarray(upright_marker(120, 60)).transpose(Image.Transpose.ROTATE_90)
    decoded = decode_grayscale(encode(sideways, fmt, lossless=True,
                                      exif=exif_block(mistyped, ORIENTATION_6)))
    assert decoded.original_size == (120, 60)
    assert_upright(decoded.gray)
    np.testing.assert_array_equal(  # the same pixels as with the orientation alone
        np.asarray(decoded.gray),
        np.asarray(decode_grayscale(encode(sideways, fmt, lossless=True,
                                           exif=exif_block(ORIENTATION_6))).gray))


# In a process of its own, with the collector off: a full collection would free what a
# cycle holds, and in the service one came only now and then.
CUT_LARGE_DECODES = """
import gc, io
from PIL import Image
from service.preprocessing import PreprocessingError, decode_grayscale

buffer = io.BytesIO()
Image.new("RGB", (8000, 6250), (90, 120, 150)).save(buffer, "PNG")
cut = buffer.getvalue()[:len(buffer.getvalue()) * 95 // 100]

def resident_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))

gc.disable()
failures, before = [], resident_kib()
for _ in range(8):
    try:
        decode_grayscale(cut)
    except PreprocessingError as error:
        failures.append(error)  # as a batch keeps its failed entry
print(len(failures), resident_kib() - before)
"""


def test_a_large_image_that_fails_to_decode_lets_its_pixels_go():
    """The error was raised inside the decoder's handler, keeping its traceback and the
    half-decoded image; a batch keeping the error made a cycle, and 25 cut 50-megapixel PNGs
    in a row took a worker to 2.1 GB (a review). Eight here held 1.4 GB."""
    result = subprocess.run([sys.executable, "-c", CUT_LARGE_DECODES], capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    failures, grown_kib = (int(n) for n in result.stdout.split())
    assert failures == 8
    assert grown_kib < 100_000, grown_kib


def test_the_jpeg_scan_limit_falls_as_the_pixels_grow():
    """Each scan is a pass over every pixel: 100 scans of a 49-megapixel JPEG still cost
    about 4 s of CPU (a review), where a progressive one has about 10."""
    from service.preprocessing import jpeg_scan_limit

    assert jpeg_scan_limit(640 * 480) == 100
    assert jpeg_scan_limit(DEFAULT_MAX_PIXELS) == 20
    assert jpeg_scan_limit(10 * DEFAULT_MAX_PIXELS) == 2
    # 20 at the limit in force: a raised one takes a 120-megapixel progressive JPEG's 10
    assert jpeg_scan_limit(12000 * 10000, max_pixels=178_956_970) == 29


def test_the_jpeg_scan_limit_follows_the_pixel_limit_set():
    """The scans were bounded from the default pixel limit whatever the limit set: 100 at a
    limit of one megapixel, and at a raised one an ordinary progressive JPEG was refused."""
    from service.preprocessing import TooManyScansError

    data = with_scans(encode(rgb_image(1000, 1000), "JPEG", progressive=True), 30)
    assert decode_grayscale(data).original_size == (1000, 1000)  # 30 of 100 at the default
    with pytest.raises(TooManyScansError, match="the JPEG has 30 scans; at most 20 "):
        decode_grayscale(data, ImageLimits(max_pixels=1_000_000))


def test_only_the_first_pictures_scans_are_counted():
    from service.preprocessing import jpeg_scans

    progressive = encode(rgb_image(200, 100), "JPEG", progressive=True)
    baseline = encode(rgb_image(200, 100), "JPEG")
    assert jpeg_scans(baseline) == 1
    assert jpeg_scans(progressive) == progressive.count(b"\xff\xda") > 5
    # scan-like bytes after the end of the image (a motion photo's video), and a second
    # picture: neither is the first picture's
    assert jpeg_scans(baseline + b"\xff\xda" * 500 + progressive) == 1


@pytest.mark.parametrize("where", ["after APP0", "between scans", "as FF 00 between scans"])
def test_stray_bytes_where_a_marker_belongs_do_not_hide_the_scans(where):
    """libjpeg skips bytes before a marker with a warning and decodes on; the count stopped
    at them: one stray byte made a 183 KB bomb of 1,000 scans a 200 after 20 s of CPU (the
    mutation review of preprocessing)."""
    from service.preprocessing import TooManyScansError, jpeg_scans

    data = encode(rgb_image(400, 300), "JPEG", progressive=True)
    stray = b"\xff\x00\x00" if where.startswith("as FF 00") else b"\x00\x17"
    if where == "after APP0":
        at = 4 + int.from_bytes(data[4:6], "big")
    else:  # before the second scan's header, after its tables
        at = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    odd = data[:at] + stray + data[at:]
    assert decode_grayscale(odd).original_size == (400, 300)  # libjpeg reads past them
    assert jpeg_scans(odd) == data.count(b"\xff\xda")
    bomb = with_scans(data, 500)
    odd_bomb = bomb[:at] + stray + bomb[at:]
    assert jpeg_scans(odd_bomb) == 500
    with pytest.raises(TooManyScansError, match="the JPEG has 500 scans; at most 100 "):
        decode_grayscale(odd_bomb)


def test_scans_behind_restart_or_tem_markers_are_counted_and_the_limit_is_taken():
    """Restart markers inside coded data, and a TEM marker (no length) between segments,
    each hid all later scans from a mutant of the count; and a JPEG of exactly the limit's
    scans, followed by scan-like bytes past its end, is decoded (the mutation review)."""
    from service.preprocessing import TooManyScansError, jpeg_scans

    restarts = encode(rgb_image(400, 300), "JPEG", progressive=True, restart_marker_blocks=1)
    assert b"\xff\xd0" in restarts
    assert jpeg_scans(restarts) == restarts.count(b"\xff\xda") > 5
    with pytest.raises(TooManyScansError):
        decode_grayscale(with_scans(restarts, 500))
    data = encode(rgb_image(400, 300), "JPEG", progressive=True)
    last = data.rindex(b"\xff\xda")
    tem = with_scans(data, 500)
    tem = tem[:last] + b"\xff\x01" + tem[last:]
    assert jpeg_scans(tem) == 500
    # a reserved marker at a restart point, which libjpeg skips and decodes on: read as a
    # length, FF 02 FF FF jumped 65,537 bytes over the scans (the diff review: 3,000 scans
    # counted as 7, a 200 after 29 s)
    last = restarts.rindex(b"\xff\xda")
    scan = restarts[last:-2]
    reserved = scan.replace(b"\xff\xd0", b"\xff\x02\xff\xff\xff\xd0", 1)
    hidden = restarts[:last] + reserved * 200 + restarts[-2:]
    assert jpeg_scans(hidden) == restarts.count(b"\xff\xda") - 1 + 200
    with pytest.raises(TooManyScansError):
        decode_grayscale(hidden)
    at_limit = with_scans(data, 100) + b"\xff\xda" * 10  # a motion photo's bytes after it
    assert jpeg_scans(at_limit) == 100
    assert decode_grayscale(at_limit).original_size == (400, 300)


def test_a_one_bit_png_keyed_transparent_is_flattened_onto_white():
    """A colour key in a 1-bit PNG is transparency as in any other mode: a mutant that left
    mode 1 out showed the keyed black (the mutation review of preprocessing)."""
    bits = np.where(np.arange(40)[None, :] < 20, 0, 255).repeat(40, 0).astype(np.uint8)
    data = encode(Image.fromarray(bits).convert("1"), "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "1"
    assert preprocess_image_uint8(data).min() == 255


def test_32_bit_integers_past_16_bits_clip_to_white():
    """Clipped to 16 bits before the scale to 8: a mutant wrapped 70000 to 16 and 2**31 - 1
    to 127 (the mutation review of preprocessing)."""
    values = np.array([[-5, 0, 65535, 70000, 2**31 - 1]], dtype=np.int32)
    decoded = decode_grayscale(encode(Image.fromarray(values), "TIFF")).gray
    assert np.asarray(decoded).tolist() == [[0, 0, 255, 255, 255]]


@pytest.mark.parametrize(("fmt", "cut"), [("JPEG", 20), ("WEBP", 12), ("WEBP", 16)])
def test_an_image_cut_inside_its_header_is_corrupt_not_unknown(fmt, cut):
    """Known by its signature, as the first bytes of a cut download are: a mutant without
    the signature check answered not_an_image for these (the mutation review)."""
    with pytest.raises(CorruptImageError):
        decode_grayscale(encode(rgb_image(60, 40), fmt)[:cut])


@pytest.mark.parametrize("mode", ["LAB", "YCbCr", "CMYK"])
def test_colour_spaces_other_than_rgb_are_grey_as_through_rgb(mode):
    """A mutant converting to L directly refused LAB and YCbCr TIFFs (Pillow has no such
    conversion): each is grey as its RGB is (the mutation review)."""
    data = encode(rgb_image(60, 40).convert(mode), "TIFF")
    through_rgb = Image.open(io.BytesIO(data)).convert("RGB").convert("L")
    np.testing.assert_array_equal(np.asarray(decode_grayscale(data).gray),
                                  np.asarray(through_rgb))


def test_a_multi_picture_jpeg_is_read_as_a_jpeg_is():
    """Phones' MPO photos (a JPEG and its second picture): decoded at reduced scale, under
    the scan limit, as a JPEG is; a mutant that left MPO out of both decoded 12 megapixels
    whole (the mutation review of preprocessing)."""
    buffer = io.BytesIO()
    rgb_image(4000, 3000).save(buffer, "MPO", save_all=True,
                               append_images=[rgb_image(400, 300)])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    decoded = decode_grayscale(buffer.getvalue())
    assert decoded.original_size == (4000, 3000) and decoded.gray.size == (500, 375)


@pytest.mark.parametrize("rows", [1, 255, 256, 257, 700])
def test_wide_pixels_give_the_same_bytes_in_every_block_of_rows(rows):
    """Float, 16-bit and alpha images become bytes a block of 256 rows at a time: each row
    as the whole-image formula gives it, whichever block it falls in."""
    rng = np.random.default_rng(rows)
    floats = (rng.random((rows, 7), dtype=np.float32) * 1.4 - 0.2).astype(np.float32)
    floats[0, 0], floats[-1, -1] = np.nan, np.inf
    floats[rows // 2, 3] = -np.inf  # to 0, as nan: a mutant made it white (the review)
    expected = np.rint(np.clip(np.nan_to_num(floats.astype(np.float64), nan=0.0, posinf=1.0,
                                             neginf=0.0), 0, 1) * 255)
    decoded = decode_grayscale(encode(Image.fromarray(floats, "F"), "TIFF")).gray
    np.testing.assert_array_equal(np.asarray(decoded), expected)
    wide = rng.integers(0, 65536, (rows, 7), dtype=np.uint16)
    decoded = decode_grayscale(encode(Image.fromarray(wide), "PNG")).gray
    np.testing.assert_array_equal(np.asarray(decoded), (wide.astype(np.uint32) + 128) // 257)
    la = rng.integers(0, 256, (rows, 7, 2), dtype=np.uint8)
    luma, alpha = la[..., 0].astype(np.uint32), la[..., 1].astype(np.uint32)
    decoded = decode_grayscale(encode(Image.fromarray(la, "LA"), "PNG")).gray
    np.testing.assert_array_equal(np.asarray(decoded), (
        luma * alpha + WHITE * (255 - alpha) + 127) // 255)


def _late_exif_png(image: Image.Image, orientation: int) -> bytes:
    """A PNG whose eXIf chunk comes after its pixels, where browsers do not read it."""
    import struct
    import zlib

    data = encode(image, "PNG")
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes().removeprefix(b"Exif\x00\x00")
    chunk = (struct.pack(">I", len(payload)) + b"eXIf" + payload
             + struct.pack(">I", zlib.crc32(b"eXIf" + payload)))
    end = data.rfind(b"\x00\x00\x00\x00IEND")
    return data[:end] + chunk + data[end:]


def _xmp_png(image: Image.Image) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP_TURN)
    return encode(image, "PNG", pnginfo=info)


XMP_TURN = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
            'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
            'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
            '</x:xmpmeta>')


def _exif_orientation(kind: int, count: int, value: int) -> bytes:
    """EXIF whose one tag is the orientation, stored as TIFF type ``kind`` (3 SHORT, 4 LONG,
    8 SSHORT) with ``count`` values, written by hand: Pillow writes only the standard form."""
    entry = struct.pack(">HHI", 0x0112, kind, count)
    entry += (struct.pack(">I", value) if kind == 4
              else struct.pack(">HH", value, value if count > 1 else 0))
    return b"Exif\x00\x00MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + bytes(4)


def _long_then_short_orientation(first: tuple[int, int] = (4, 3)) -> bytes:
    """Two orientation entries, ``first`` (its type and value: a LONG 3) and then a SHORT 6:
    Chromium skips the first, as it skips a SHORT outside 1 to 8."""
    kind, value = first
    entries = ((struct.pack(">HHII", 0x0112, 4, 1, value) if kind == 4
                else struct.pack(">HHIHH", 0x0112, kind, 1, value, 0))
               + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0))
    return b"Exif\x00\x00MM\x00*" + struct.pack(">IH", 8, 2) + entries + bytes(4)


@pytest.mark.parametrize(("exif", "turned"), [
    (_exif_orientation(3, 1, 6), True), (_exif_orientation(4, 1, 6), False),
    (_exif_orientation(3, 2, 6), False), (_exif_orientation(8, 1, 6), False),
    (_long_then_short_orientation(), True), (_long_then_short_orientation(first=(3, 9)), True),
    (_long_then_short_orientation(first=(3, 0)), True),
    (_exif_orientation(3, 1, 6).replace(b"MM\x00*", b"MM\x00+"), False)],
    ids=["short", "long", "two shorts", "signed short", "a long, then a short",
         "a short of 9, then a short", "a short of 0, then a short", "not TIFF's magic 42"])
def test_only_an_orientation_stored_as_browsers_read_it_turns_the_image(exif, turned):
    """Chromium and Firefox take the orientation only as one SHORT; Pillow took a LONG, a
    signed one or a count of 2 too, and the page's boxes fell off the faces (the page review).
    Chromium passes over an orientation stored otherwise to the next (the diff review)."""
    shown = Image.fromarray(upright_marker(96, 48))
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # what orientation 6 turns upright
    decoded = decode_grayscale(encode(stored, "JPEG", exif=exif))
    if turned:
        assert decoded.original_size == (96, 48)
        assert_upright(decoded.gray)
    else:
        assert decoded.original_size == (48, 96)  # as stored, as the browser shows it


def test_an_avif_is_turned_by_its_irot_whatever_its_exif_says():
    """Browsers turn an AVIF by its irot, which Pillow writes into the EXIF it gives; read as
    a JPEG's, a LONG orientation there undid the turn (the diff review)."""
    shown = Image.fromarray(upright_marker(96, 48))
    exif = Image.Exif()
    exif[0x0112], exif[0x0113] = 6, 6  # 0x0113: a place for the LONG written below
    data = bytearray(encode(shown.transpose(Image.Transpose.ROTATE_90), "AVIF", exif=exif))
    placeholder = bytes.fromhex("0113 0003 00000001 00060000")
    assert data.count(placeholder) == 1
    at = data.find(placeholder)
    data[at:at + 12] = bytes.fromhex("0112 0004 00000001 00000006")
    decoded = decode_grayscale(bytes(data))
    assert decoded.original_size == (96, 48)
    assert_upright(decoded.gray)


def test_an_avif_is_not_turned_by_an_orientation_in_xmp_alone():
    """Browsers take an AVIF's turn from its irot; Pillow falls back to XMP's tiff:Orientation,
    which the AVIF exception let through (the third diff review)."""
    stored = Image.fromarray(upright_marker(96, 48))
    decoded = decode_grayscale(encode(stored, "AVIF", quality=100, xmp=XMP_TURN.encode()))
    assert decoded.original_size == (96, 48)
    assert_upright(decoded.gray)


@pytest.mark.parametrize("payload", [b"XX\x00*\x00\x00\x00\x08", b"Exif\x01\x02MM\x00*"],
                         ids=["no tiff", "another prefix"])
def test_exif_that_is_no_tiff_reads_as_no_orientation(payload):
    """An eXIf chunk Pillow cannot read was a 400 corrupt_image for a PNG browsers show
    (the diff review)."""
    stored = Image.fromarray(upright_marker(96, 48))
    with_exif = bytearray(encode(stored, "PNG"))
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    at = 8 + 25  # after IHDR
    decoded = decode_grayscale(bytes(with_exif[:at] + chunk + with_exif[at:]))
    assert decoded.original_size == (96, 48)
    assert_upright(decoded.gray)


@pytest.mark.parametrize("make", [
    lambda image: encode(image, "JPEG", xmp=XMP_TURN.encode()),
    lambda image: _xmp_png(image),
    lambda image: encode(image, "WEBP", xmp=XMP_TURN.encode()),
    lambda image: _late_exif_png(image, 6),
    # EXIF Pillow cannot parse beside the XMP: read as none, as before (it was a 400)
    lambda image: encode(image, "JPEG", xmp=XMP_TURN.encode(),
                         exif=b"Exif\x00\x00" + b"garbage!" * 4),
], ids=["jpeg xmp", "png xmp", "webp xmp", "png exif after the pixels", "jpeg broken exif"])
def test_only_exif_read_as_browsers_read_it_turns_the_image(make):
    """Pillow also turns by XMP's tiff:Orientation and by a PNG eXIf after the pixels, which
    Chromium and Firefox do not: the page showed the photo as stored while the service's boxes
    were for it turned, off the faces."""
    stored = Image.fromarray(np.tile((np.arange(120) % 256).astype(np.uint8), (60, 1)))
    decoded = decode_grayscale(make(stored))
    assert decoded.original_size == (120, 60)
    first_row = np.asarray(decoded.gray, dtype=np.int16)[0, :8]
    assert (np.diff(first_row) >= 0).all() and first_row[-1] > first_row[0]  # not turned
