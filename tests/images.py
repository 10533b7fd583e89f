"""Images the tests generate, encoded in memory, so no binary fixtures are committed."""

from __future__ import annotations

import io
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 255 // max(width - 1, 1) + y * 3) % 256
    return np.clip(base + rng.integers(-10, 10, size=base.shape), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def gray_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(gradient(width, height, seed))


def rgb_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    g = gradient(width, height, seed)
    return Image.fromarray(np.stack([g, 255 - g, g // 2], axis=-1))


def png_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    return encode(gray_image(width, height, seed))


def jpeg_bytes(width: int = 64, height: int = 48, seed: int = 0, mode: str = "RGB") -> bytes:
    image = rgb_image(width, height, seed)
    return encode(image.convert(mode), "JPEG", quality=90)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def png_declaring(width: int, height: int, with_data: bool = True) -> bytes:
    """A PNG of a few hundred bytes whose header declares ``width`` x ``height`` pixels."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    data = png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) if with_data else b""
    return b"\x89PNG\r\n\x1a\n" + header + data + (png_chunk(b"IEND", b"") if with_data else b"")


def git_repository(folder: Path, files: dict[str, bytes]) -> str:
    """A repository holding ``files`` in one commit that a fetch by commit id may ask for;
    returns the commit."""
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    for args in (["init", "--quiet"], ["config", "uploadpack.allowAnySHA1InWant", "true"],
                 ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit",
                                "--quiet", "-m", "data"]):
        subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, check=True,
                          capture_output=True, text=True).stdout.strip()


def later_commit(folder: Path, files: dict[str, bytes]) -> None:
    """A commit after the pinned one that changes ``files`` in place, as the FER-2013 mirror's
    later commits did: a fetch that took the tip instead of the pin gets other bytes."""
    for name, data in files.items():
        (folder / name).write_bytes(data)
    for args in (["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit",
                                "--quiet", "-m", "later"]):
        subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)


def bigtiff_strip_at(offset: int) -> bytes:
    """A BigTIFF (64-bit offsets) whose one strip is said to start at ``offset``."""
    data = bytearray(encode(gray_image(8, 8), "TIFF", big_tiff=True))
    ifd = struct.unpack_from("<Q", data, 8)[0]
    for entry in range(struct.unpack_from("<Q", data, ifd)[0]):
        at = ifd + 8 + 20 * entry
        if struct.unpack_from("<H", data, at)[0] == 273:  # StripOffsets, as one LONG8
            struct.pack_into("<HHQQ", data, at, 273, 16, 1, offset)
            return bytes(data)
    raise AssertionError("Pillow wrote no StripOffsets")


def upright_marker(width: int, height: int) -> np.ndarray:
    """Dark at the left and light at the right, and lighter in the top half: every one of
    the eight orientations changes it (a left-to-right gradient alone hid a vertical flip,
    so 3 could not be told from 2, nor 8 from 5)."""
    x = np.arange(width) * 180 // max(width - 1, 1)
    top = np.where(np.arange(height) < height // 2, 60, 0)
    return (x[None, :] + top[:, None]).astype(np.uint8)


def assert_upright(gray: Image.Image) -> None:
    pixels = np.asarray(gray, dtype=np.float32)
    half_width, half_height = pixels.shape[1] // 2, pixels.shape[0] // 2
    assert pixels[:, half_width:].mean() - pixels[:, :half_width].mean() > 60  # not mirrored
    assert pixels[:half_height].mean() - pixels[half_height:].mean() > 40  # not upside down


def with_scans(jpeg: bytes, total: int) -> bytes:
    """The progressive JPEG with its last scan repeated until it has ``total`` scans: libjpeg
    only warns, and decodes each again, a pass over the whole image for a few dozen bytes."""
    last = jpeg.rindex(b"\xff\xda")
    return jpeg[:last] + jpeg[last:-2] * (total - jpeg.count(b"\xff\xda") + 1) + jpeg[-2:]
