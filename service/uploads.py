"""Reading images from a request without ever holding more bytes than the limits allow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from service.admission import hold_body
from service.errors import ApiError
from service.inference import ImageInput
from service.preprocessing import TooManyBytesError, byte_count, shown
from service.settings import Settings

FILE_FIELDS = ("file", "files")
# Types whose part is a form field, however the client labels it, unless it names a file.
TEXT_TYPES = (b"application/json", b"application/xml", b"application/x-www-form-urlencoded")
# One part header line; python-multipart's 4 KiB default refuses a long (but legal) file name.
MAX_PART_HEADER_BYTES = 64 * 1024
# Parts besides the images, as Starlette's own form parser bounds them: 2.8 million empty
# ones within the body limit cost a worker 47 s of parsing (a review).
MAX_OTHER_FIELDS = 1000


def _too_large(limit: int, what: str, hint: str = "") -> ApiError:
    return ApiError(413, TooManyBytesError.code,
                    f"{what} is larger than the limit of {byte_count(limit)}{hint}")


def check_content_length(request: Request, limit: int, hint: str = "") -> None:
    """413 for a declared length past ``limit``, before a byte is read. Within it, nothing is
    held yet: held as declared, a few bodies declared large and sent at the least rate
    (70 kB/s in all) kept a worker's budget full for hours while holding 3 MB (a review)."""
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit():
        digits = declared.lstrip("0") or "0"
        if len(digits) > 20:  # past any limit, and int() refuses 4,300 digits (it was a 500)
            raise _too_large(limit, f"the request body, declared in {len(digits)} digits,",
                             hint)
        if int(digits) > limit:
            raise _too_large(limit, f"the request body of {byte_count(int(digits))}", hint)


async def body_chunks(request: Request, settings: Settings) -> AsyncIterator[bytes]:
    """The body as it arrives; 408 once no byte has come for ``body_idle_seconds``, or once,
    past that grace, the body has come slower on average than ``body_min_bytes_per_second``
    (a byte every 29 s held an in-flight place for ever), so that a stalled or trickling
    client does not keep one of the worker's places (uvicorn has no such timeout)."""
    idle, min_rate = settings.body_idle_seconds, settings.body_min_bytes_per_second
    chunks = request.stream().__aiter__()
    started, received = time.monotonic(), 0
    while True:
        wait = idle
        if min_rate:  # when the average falls under the rate, if no more comes
            behind = started + max(idle, received / min_rate) - time.monotonic()
            wait = min(wait, max(behind, 0.0))
        waiting_since = time.monotonic()
        try:
            chunk = await asyncio.wait_for(anext(chunks), wait)
        except StopAsyncIteration:
            return
        except TimeoutError:
            silent = time.monotonic() - waiting_since
            # The rate's deadline falls just before the idle one when a body stops early (its
            # first bytes a moment after the start, longer on a loaded machine): the idle
            # message then, which says what happened, naming the limit.
            if silent < idle * 0.9:
                raise ApiError(408, "body_timeout", f"the request body came slower than "
                               f"{min_rate:g} bytes/s ({received} bytes in "
                               f"{time.monotonic() - started:.0f} s); send it at once"
                               ) from None
            raise ApiError(408, "body_timeout", f"no byte of the request body came for "
                           f"{idle:g} s; send the body without pausing") from None
        received += len(chunk)
        yield chunk


async def limited_chunks(request: Request, limit: int, settings: Settings,
                         what: str = "the request body", hint: str = ""
                         ) -> AsyncIterator[bytes]:
    """The body as it arrives, refused (413) the moment it crosses ``limit`` (or at once,
    declared past it), and held on the worker's budget as it comes: the bytes it holds.
    ``hint`` follows the limit in the refusal."""
    check_content_length(request, limit, hint)
    size = 0
    async for chunk in body_chunks(request, settings):
        size += len(chunk)
        if size > limit:  # stop reading at once: the rest of the body is never buffered
            raise _too_large(limit, what, hint)
        hold_body(request.scope, size)
        yield chunk


async def read_body(request: Request, limit: int, settings: Settings,
                    what: str = "the request body") -> bytes:
    """The whole body, refused (413) the moment it crosses ``limit``."""
    return b"".join([chunk async for chunk in limited_chunks(request, limit, settings, what)])


async def read_raw(request: Request, settings: Settings) -> list[ImageInput]:
    return [ImageInput(None, await read_body(request, settings.max_upload_bytes, settings,
                                             "the image"))]


class _MultipartCollector:
    """python-multipart callbacks that keep image parts in memory, each within its limit.

    Image bytes never touch the disk (nothing to clean up), a part over the byte limit stops
    being buffered the moment it crosses it, and the whole body is capped by the caller.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.uploads: list[ImageInput] = []
        self.other_fields: dict[str, None] = {}  # an ordered set: names in arrival order
        self.other_parts = 0
        self._name = self._filename = None
        self._is_file = False
        self._data = bytearray()
        self._over = False
        self._header_name = self._header_value = b""
        self._disposition = self._content_type = b""

    def on_part_begin(self) -> None:
        self._name = self._filename = None
        self._is_file = False
        self._data, self._over = bytearray(), False
        self._disposition = self._content_type = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        elif self._header_name.lower() == b"content-type":
            self._content_type = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._filename = None if filename is None else filename.decode("utf-8", "replace")
        media = self._content_type.split(b";", 1)[0].strip().lower()
        # A client sending bytes with no file name (requests' (None, data, "image/png"),
        # Spring's ByteArrayResource) still names a type that is not text.
        self._is_file = self._filename is not None or (
            bool(media) and not media.startswith(b"text/") and media not in TEXT_TYPES)
        if self._name in FILE_FIELDS and not self._is_file:
            # The classic curl slip: -F file=face.jpg sends the text "face.jpg". Said by the
            # headers that decided it: raw image bytes with neither were called "text".
            sent_as = (f"the type {media.decode('latin-1')!r}" if media
                       else "no content type")
            raise ApiError(422, "not_a_file", f"the field {self._name!r} was sent as a text "
                           f"field (no file name, and {sent_as}); send the image as a file, "
                           f"with a file name or an image type (with curl: -F "
                           f"{self._name}=@face.jpg)")
        if self._is_image_part():
            if len(self.uploads) >= self.settings.max_images_per_request:
                raise ApiError(422, "too_many_files", "too many files: at most "
                               f"{self.settings.max_images_per_request} images per request")
        else:
            self.other_parts += 1
            if self.other_parts > MAX_OTHER_FIELDS:
                raise ApiError(422, "too_many_fields", f"more than {MAX_OTHER_FIELDS} fields "
                               "besides the images; send each image as a file field named "
                               "'file' (or several named 'files')")
            self.other_fields.setdefault(self._name)

    def _is_image_part(self) -> bool:
        return self._name in FILE_FIELDS and self._is_file

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._is_image_part() or self._over:
            return  # other fields are named in errors, never kept
        self._data += data[start:end]
        if len(self._data) > self.settings.max_upload_bytes:
            self._over, self._data = True, bytearray()

    def on_part_end(self) -> None:
        if not self._is_image_part():
            return
        if self._over:
            self.uploads.append(ImageInput(self._filename, error=TooManyBytesError.past(
                self.settings.max_upload_bytes)))
        else:
            self.uploads.append(ImageInput(self._filename, bytes(self._data)))
        self._data = bytearray()


async def read_multipart(request: Request, settings: Settings) -> list[ImageInput]:
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "malformed_multipart", "the multipart body has no boundary")
    collector = _MultipartCollector(settings)
    callbacks = {name: getattr(collector, name) for name in (
        "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value",
        "on_header_end", "on_headers_finished")}
    try:  # the parser refuses a boundary over 256 bytes when it is made
        parser = MultipartParser(boundary, callbacks, max_header_size=MAX_PART_HEADER_BYTES)
        # bytes are held as they come, only now, after every check of the headers: a
        # client's mistake is told so (400), not to retry (503)
        # the limit per image too: told only "160.1 MiB", a user sent 150 MB and was refused
        # at 10 MiB (a review)
        per_image = (f": at most {settings.max_images_per_request} images of "
                     f"{byte_count(settings.max_upload_bytes)} each")
        async for chunk in limited_chunks(request, settings.max_body_bytes, settings,
                                          hint=per_image):
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:  # MultipartParseError and the boundary's own
        raise ApiError(400, "malformed_multipart",
                       f"the multipart body is malformed: {exc}") from None
    if parser.state != MultipartState.END:
        raise ApiError(400, "malformed_multipart", "the multipart body ended before its "
                       "closing boundary: was the upload cut short?")
    if not collector.uploads:
        raise ApiError(422, "no_file", "no image found: send it as a multipart file field "
                       f"named 'file' (or several named 'files'); got "
                       f"{_field_list(list(collector.other_fields))}")
    return collector.uploads


def _field_list(names: list[str], shown: int = 10) -> str:
    """The fields a request sent instead of a file, at most ``shown`` of them by name."""
    if not names:
        return "no fields"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    # a name can be as long as a part's headers allow: each is cut, not echoed whole
    named = [n if len(n) <= 64 else n[:64] + "..." for n in names[:shown]]
    return f"fields {named}{more}"


async def read_uploads(request: Request, settings: Settings) -> list[ImageInput]:
    # empty: no coding, as on /v2 (it was refused here as Content-Encoding '')
    encoding = request.headers.get("content-encoding", "").strip().lower() or "identity"
    if encoding != "identity":  # a gzip body was read as a broken image, a 'br' one as plain
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {shown(encoding)} is not "
                       "supported on /predict: send the image bytes as they are (images are "
                       "compressed already)")
    content_type = request.headers.get("content-type", "")
    mime = content_type.split(";")[0].strip().lower()
    if mime == "multipart/form-data":
        return await read_multipart(request, settings)
    if mime.startswith("image/"):
        return await read_raw(request, settings)
    raise ApiError(415, "unsupported_media_type",
                   f"content type {shown(mime or 'none')} is not supported: send "
                   "multipart/form-data with a 'file' field, or the image itself with an "
                   "image/* content type")
