"""The one preprocessing function shared by training and serving.

The study's contract: grayscale, resized to 350x350. Every image the models ever see, in
training, evaluation or a request, goes through the two steps of
:func:`preprocess_image_uint8`: :func:`decode_grayscale`, then :func:`resize_to_input` (of
the whole image, or of a face's crop). Serving calls them apart, to find the faces between
them; change a step there, not a copy, so that a model is always fed what it was trained on.

Stated choices (changing any of them changes :data:`PREPROCESSING_VERSION`):

* decoding with Pillow, restricted to :data:`ALLOWED_FORMATS` (multi-picture JPEGs from phones
  open as JPEG); first frame of an animation;
* EXIF orientation applied;
* a large JPEG is decoded with DCT scaling (``Image.draft``) to the smallest size still at
  least 350x350, which is what makes a 12-megapixel photo cheap to serve;
* grayscale by ITU-R 601-2 luma (Pillow's ``L`` conversion); 16-bit and 32-bit integer
  images are read as 0..65535, float images as 0..1; transparency is flattened onto a
  white background (:data:`ALPHA_BACKGROUND`);
* the whole image is resized (not cropped) to 350x350 with Pillow's antialiased bilinear
  filter (:data:`RESAMPLE`);
* the model input is ``uint8 / 255`` as float32, shape (350, 350), values in [0, 1].
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import struct
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # phone photos: HEIC/HEIF through pillow-heif (AVIF is Pillow's own)
    from pillow_heif import register_heif_opener
except ImportError:  # pragma: no cover - the serve extra installs it
    pass
else:
    register_heif_opener()

PREPROCESSING_VERSION = "1"
INPUT_SIZE = 350
RESAMPLE = Image.Resampling.BILINEAR
ALPHA_BACKGROUND = 255
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "HEIF", "AVIF")

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
# Decodes past this many pixels take turns within a process: each holds several full-size
# copies (a lossless WebP of 50 megapixels and 19 KB took 830 MB), and the inference threads
# decoded three at once, 2.6 GB in one worker (a review). A JPEG decodes at a reduced scale,
# below it unless very long and thin; the size after that reduction is what counts.
LARGE_DECODE_PIXELS = 16_000_000
_LARGE_DECODE = threading.Lock()
# glibc keeps what a thread frees in that thread's arena: decodes taking turns on three
# threads still held 1.9 GB, against 1.1 GB once given back (None where there is no glibc).
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)
# Pillow refuses an image past this when it reads the header, whatever our limit says.
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS

_EXIF_ORIENTATION = 0x0112
# What turns each EXIF orientation upright, as Pillow's ImageOps.exif_transpose does
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_WIDE_INTEGER_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


# Pillow and its plugins report truncated and malformed streams with a zoo of exception
# types (struct.error from a malformed EXIF block, RuntimeError from the HEIF
# and AVIF decoders, OverflowError from a BigTIFF offset past what a seek takes); all of them
# are the upload's fault.
DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                  struct.error, RuntimeError, ArithmeticError)


class PreprocessingError(ValueError):
    """Base of every error an upload can cause; ``code`` is stable, the message is for people."""

    code = "invalid_image"


class NotAnImageError(PreprocessingError):
    code = "not_an_image"


class CorruptImageError(PreprocessingError):
    code = "corrupt_image"


class TooManyBytesError(PreprocessingError):
    code = "too_many_bytes"

    @classmethod
    def past(cls, limit: int) -> TooManyBytesError:
        """An image refused once it is more than ``limit`` bytes, before it is read whole:
        the same words from /predict's multipart reader and the command line."""
        return cls(f"the image has more than {byte_count(limit)}, the limit")


class TooManyPixelsError(PreprocessingError):
    code = "too_many_pixels"


class TooManyScansError(PreprocessingError):
    code = "too_many_scans"


# A progressive JPEG has about 10 scans; each is a pass over the whole image, and libjpeg
# decodes a repeated scan again (a review: 1,000 scans of 75 bytes cost 4.6 s of CPU). So
# scans times pixels is bounded: 20 scans at the pixel limit in force, at most 100 for any
# size. From the limit set, not the default: past 100 megapixels a raised limit refused an
# ordinary progressive JPEG of 10 scans (a review).
MAX_JPEG_SCANS = 100
JPEG_SCANS_AT_PIXEL_LIMIT = 20


def jpeg_scan_limit(pixels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    budget = JPEG_SCANS_AT_PIXEL_LIMIT * max_pixels
    return max(1, min(MAX_JPEG_SCANS, budget // max(pixels, 1)))


def jpeg_scans(data: bytes) -> int:
    """The start-of-scan markers of the first picture, up to its end-of-image marker: marker
    segments are skipped by their lengths and coded data by its byte stuffing, so that bytes
    in metadata, or in the video a motion photo appends, are not counted."""
    scans, at, end = 0, 2, len(data)
    while at + 1 < end:
        if data[at] != 0xFF:
            # bytes where a marker belongs: libjpeg skips to the next 0xFF with a warning and
            # decodes on, so the count does too (stopping here let one stray byte hide 1,000)
            at = data.find(b"\xff", at)
            if at < 0:
                return scans
            continue
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte
            at += 1
            continue
        if marker == 0x00:  # no marker: libjpeg discards the pair as it does stray bytes
            at += 2
            continue
        if marker == 0xD9:  # end of image
            return scans
        # no length follows TEM, the reserved markers (libjpeg skips one inside a restart
        # scan and decodes on: read as a length, FF 02 FF FF hid 3,000 scans), RSTn or SOI
        if marker < 0xC0 or 0xD0 <= marker <= 0xD8:
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
        if marker != 0xDA:
            continue
        scans += 1
        while True:  # the scan's coded data: up to a 0xFF that is neither stuffing nor RSTn
            at = data.find(b"\xff", at)
            if at < 0 or at + 1 >= end:
                return scans
            following = data[at + 1]
            if following != 0x00 and not 0xD0 <= following <= 0xD7:
                break
            at += 2
    return scans


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def preprocess_image(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Turn uploaded bytes into the model input: float32 (350, 350) in [0, 1]."""
    return pixels_to_input(preprocess_image_uint8(data, limits))


def pixels_to_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 grayscale pixels (any leading shape) to the float32 [0, 1] model input."""
    return pixels.astype(np.float32) / np.float32(255.0)


def preprocess_image_uint8(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Decode, orient, grayscale, resize: uint8 (350, 350). Raises :class:`PreprocessingError`."""
    return resize_to_input(decode_grayscale(data, limits).gray)


@dataclass(frozen=True)
class DecodedImage:
    """An upload decoded to grayscale, upright, before the resize.

    A large JPEG is decoded at a reduced scale; ``scale`` maps ``gray``'s pixels back to
    the upload's own (upright) pixel coordinates, which is what face boxes are reported in.
    """

    gray: Image.Image
    original_size: tuple[int, int]  # (width, height), after EXIF orientation

    @property
    def scale(self) -> tuple[float, float]:
        return (self.original_size[0] / self.gray.width, self.original_size[1] / self.gray.height)


def decode_grayscale(data: bytes, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """Decode, orient and grayscale an upload. Raises :class:`PreprocessingError`."""
    image = _open_checked(data, limits)
    kind = image.format  # for the message of a failure at any step
    try:
        width, height = image.size  # the header's, before a JPEG's reduced-scale decode
        # Silence Pillow's own bomb warning: our pixel limit has already been applied.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if image.format in ("JPEG", "MPO"):
                limit = jpeg_scan_limit(width * height, limits.max_pixels)
                # a marker cannot occur in coded data (0xFF is stuffed), so the cheap count
                # is never short; only when it passes the limit are the scans walked
                if data.count(b"\xff\xda") > limit and (scans := jpeg_scans(data)) > limit:
                    raise TooManyScansError(f"the JPEG has {scans} scans; at most {limit} "
                                            f"are decoded at {width}x{height} pixels")
                image.draft(None, (INPUT_SIZE, INPUT_SIZE))
            exif_before_pixels = image.info.get("exif")
            large = image.width * image.height > LARGE_DECODE_PIXELS  # after a JPEG's draft
            with _LARGE_DECODE if large else contextlib.nullcontext():
                image.load()
                _keep_only_exif_orientation(image, exif_before_pixels)
                # Read after load: Pillow's TIFF reader turns orientations 5-8 itself and
                # drops the tag then (its header size is already upright); turning those
                # again skewed every face box, x by 0.6 and y by 1.6.
                exif = _pillow_exif(image)
                orientation = 1 if exif is None else exif.get(_EXIF_ORIENTATION, 1)
                if orientation in (5, 6, 7, 8):
                    width, height = height, width  # these turn the image a quarter
                # Not ImageOps.exif_transpose: it also writes the EXIF back, which nothing
                # here reads, and which failed on a mistyped tag beside the orientation
                if orientation in _UPRIGHT:
                    image = image.transpose(_UPRIGHT[orientation])
                gray = _to_grayscale(image)
                if large:  # its full-size copies go before the next large decode starts
                    del image
                    if _MALLOC_TRIM is not None:
                        _MALLOC_TRIM(0)
            return DecodedImage(gray, (width, height))
    except PreprocessingError:
        raise
    except DECODER_ERRORS as exc:
        failure = str(exc)
    # Raised out here, and the image let go: raised in the handler, the error kept the
    # decoder's traceback and its half-decoded image, and a batch keeping its failed entry
    # made a cycle that held them until a full collection (25 cut 50-megapixel PNGs in a row
    # took a worker to 2.1 GB; a review)
    del image
    raise CorruptImageError(
        f"the {kind} image is truncated or corrupt and could not be decoded ({failure})")


def _orientation_as_browsers_read(raw: bytes) -> int:
    """The first IFD's orientation where it is one SHORT, as Chromium and Firefox read it;
    stored otherwise (a LONG, an SSHORT, a count of 2) they ignore it, and Pillow did not:
    the face boxes were drawn on a photo turned another way (the page review). Read by hand,
    as those browsers do: Pillow gives neither the count nor, past a warning, the excess."""
    tiff = raw[6:] if raw.startswith(b"Exif\x00\x00") else raw
    order = {b"II": "<", b"MM": ">"}[tiff[:2]]  # KeyError: not TIFF, read as no orientation
    magic, first = struct.unpack_from(order + "HI", tiff, 2)
    if magic != 42:
        return 1
    (entries,) = struct.unpack_from(order + "H", tiff, first)
    for at in range(first + 2, first + 2 + 12 * entries, 12):
        tag, kind, count = struct.unpack_from(order + "HHI", tiff, at)
        if tag == _EXIF_ORIENTATION and (kind, count) == (3, 1):  # else on, as Chromium
            value = struct.unpack_from(order + "H", tiff, at + 8)[0]
            if 1 <= value <= 8:
                return value
    return 1


def _keep_only_exif_orientation(image: Image.Image, exif_before_pixels: bytes | None) -> None:
    """Turn only by what browsers read, so that face boxes land on the photo a page shows:
    Pillow also takes XMP's tiff:Orientation, ImageMagick's raw EXIF text and a PNG eXIf
    after the pixels, none of which Chromium or Firefox applies. (A TIFF, which browsers do
    not show, keeps Pillow's reading: its orientation is a tag of the image itself. An AVIF
    keeps the orientation Pillow writes into the EXIF it gives from its irot/imir, which
    browsers follow, whatever its type; not one from XMP.)"""
    if image.format == "TIFF":
        return
    raw = exif_before_pixels if image.format == "PNG" else image.info.get("exif")
    wanted = 1
    if raw:
        try:
            if image.format == "AVIF":
                exif_only = Image.Exif()
                exif_only.load(raw)
                wanted = exif_only.get(_EXIF_ORIENTATION, 1)
            else:
                wanted = _orientation_as_browsers_read(raw)
        except DECODER_ERRORS:
            wanted = 1  # EXIF Pillow cannot parse: it reads no orientation from it either
    # Pillow's own reading, cached (for a JPEG at open, where a broken EXIF reads as none),
    # is corrected where it differs, so that the turn upright follows it
    exif = _pillow_exif(image)
    if exif is None:  # nothing Pillow can read: it turns by nothing
        return
    if exif.get(_EXIF_ORIENTATION, 1) != wanted:
        if wanted == 1:
            del exif[_EXIF_ORIENTATION]
        else:
            exif[_EXIF_ORIENTATION] = wanted


def _pillow_exif(image: Image.Image) -> Image.Exif | None:
    """Pillow's EXIF of ``image``; None where it is no TIFF (an eXIf chunk of other bytes
    was a 400 for an image browsers show, the orientation read as none already)."""
    try:
        return image.getexif()
    except DECODER_ERRORS:
        return None


def decoded_from_image(image: Image.Image) -> DecodedImage:
    """An image already in memory (a video frame, say) through the same grayscale step."""
    return DecodedImage(_to_grayscale(image), image.size)


def resize_to_input(gray: Image.Image) -> np.ndarray:
    """The last step of the contract: the whole grayscale image to uint8 (350, 350)."""
    resized = gray.resize((INPUT_SIZE, INPUT_SIZE), RESAMPLE)
    return np.asarray(resized, dtype=np.uint8).copy()


# A client's value quoted in a message whole up to this long (a name the protocols allow),
# cut past it: error bodies echoed 21 MB of a list, and 5 MB of a header (reviews)
QUOTED_CHARACTERS = 256


def shown(value) -> str:
    """A client's value as a message quotes it, its repr cut past QUOTED_CHARACTERS."""
    text = repr(value)
    return text if len(text) <= QUOTED_CHARACTERS + 2 else text[:QUOTED_CHARACTERS] + "..."


def byte_count(count: int) -> str:
    """A size as people read it in a message: ``10,485,760 bytes (10 MiB)``, ``1.5 GiB``."""
    text = f"{count:,} bytes"
    for shift, unit in ((30, "GiB"), (20, "MiB")):
        value = round(count / (1 << shift), 1)  # the unit after rounding: not "1,024 MiB"
        if value >= 1:
            return f"{text} ({f'{value:,.1f}'.removesuffix('.0')} {unit})"
    return text


def _open_checked(data: bytes, limits: ImageLimits) -> Image.Image:
    if len(data) == 0:
        raise NotAnImageError("the upload is empty; send the bytes of a JPEG, PNG or other image")
    if len(data) > limits.max_bytes:
        raise TooManyBytesError(
            f"the upload has {byte_count(len(data))}; the limit is {byte_count(limits.max_bytes)}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own guard (far above ours) fired while reading the header.
        raise TooManyPixelsError(
            f"the image declares too many pixels; the limit is {limits.max_pixels} pixels"
        ) from None
    except UnidentifiedImageError:
        if _has_image_signature(data):
            raise CorruptImageError(
                "the upload starts like an image but its header is truncated or corrupt"
            ) from None
        raise NotAnImageError(
            "the upload is not an image in a supported format "
            f"({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except DECODER_ERRORS as exc:
        raise CorruptImageError(f"the image header is corrupt ({exc})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"the image declares an empty size {width}x{height}")
    # Refuse a decompression bomb from its header, before a single pixel is decoded.
    if width * height > limits.max_pixels:
        raise TooManyPixelsError(
            f"the image is {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_pixels} pixels"
        )
    return image


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00",
               b"MM\x00*", b"II+\x00", b"MM\x00+")  # TIFF, then BigTIFF
# ISO base media files (HEIC, AVIF): 'ftyp' at byte 4, then the brand.
_FTYP_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")


def _has_image_signature(data: bytes) -> bool:
    """A known format's magic number: the client sent an image, but a broken one."""
    return (data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
            or (data[4:8] == b"ftyp" and data[8:12] in _FTYP_BRANDS))


def _to_grayscale(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("L", "1", "RGB") and "transparency" in image.info:
        # a PNG's tRNS colour key: its pixels are transparent, flattened like an alpha's
        return _flatten_alpha(image.convert("RGBA").convert("LA"))
    if mode == "L":
        return image
    if mode in _WIDE_INTEGER_MODES:
        key = image.info.get("transparency")  # a 16-bit PNG's tRNS colour key
        return _from_sixteen_bits(image, key if isinstance(key, int) else None)
    if mode == "F":
        return _from_unit_range(image)
    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    if mode == "La":  # premultiplied grey (a TIFF's associated alpha): Pillow converts
        image, mode = image.convert("LA"), "LA"  # it to LA only, undoing the premultiplying
    if mode in _ALPHA_MODES:
        # LA straight from RGBA and LA: converting to their own mode is a full copy
        return _flatten_alpha(image if mode == "LA" else (
            image if mode == "RGBA" else image.convert("RGBA")).convert("LA"))
    if mode in ("1", "RGB"):
        return image.convert("L")
    # CMYK, YCbCr, LAB, HSV, RGBX, I;16 variants Pillow adds later: through RGB.
    return image.convert("RGB").convert("L")


# Wide pixels become bytes a block of rows at a time: whole-image copies of a 50-megapixel
# float or alpha image took 0.7 to 1.4 GB (a review's 300 kB float TIFF: 1.6 GB).
BLOCK_ROWS = 256


def _by_row_blocks(image: Image.Image, to_bytes) -> Image.Image:
    """``to_bytes(pixels)`` over the image's blocks of rows (each cropped, never the whole
    image as an array), into one uint8 image."""
    width, height = image.size
    gray = np.empty((height, width), np.uint8)
    for top in range(0, height, BLOCK_ROWS):
        bottom = min(top + BLOCK_ROWS, height)
        gray[top:bottom] = to_bytes(np.asarray(image.crop((0, top, width, bottom))))
    return Image.fromarray(gray)


def _from_sixteen_bits(image: Image.Image, transparent: int | None = None) -> Image.Image:
    """0..65535 to 0..255, rounded: round(v / 257) is (v + 128) // 257 (v / 257 is never a
    half), in integers. Pixels of the ``transparent`` value are flattened onto the
    background, as an alpha's are."""
    def to_bytes(block: np.ndarray) -> np.ndarray:
        wide = (block.astype(np.uint32) if block.dtype == np.uint16
                else np.clip(block, 0, 65535).astype(np.uint32))
        wide += 128
        wide //= 257
        if transparent is not None:
            wide[block == transparent] = ALPHA_BACKGROUND
        return wide

    return _by_row_blocks(image, to_bytes)


def _from_unit_range(image: Image.Image) -> Image.Image:
    def to_bytes(block: np.ndarray) -> np.ndarray:
        block = np.nan_to_num(block.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return np.rint(np.clip(block, 0.0, 1.0) * 255.0)

    return _by_row_blocks(image, to_bytes)


def _flatten_alpha(image_la: Image.Image) -> Image.Image:
    """Onto the background, rounded: (luma * a + background * (255 - a)) / 255 is never a
    half (255 is odd), so + 127 then // 255 rounds it, in integers, the same byte as in
    floats for all 65,536 pairs, in 16 bits."""
    def to_bytes(la: np.ndarray) -> np.ndarray:
        alpha = la[..., 1].astype(np.uint16)  # every sum below is at most 255 * 255 + 127
        flat = la[..., 0] * alpha
        alpha ^= 255  # 255 - alpha, in place
        alpha *= ALPHA_BACKGROUND
        flat += alpha
        flat += 127
        flat //= 255
        return flat

    return _by_row_blocks(image_la, to_bytes)
