"""The Open Inference Protocol's (KServe v2) tensors, in JSON and in its binary extension.

Only the codec lives here: a request body in, named tensors out, and the reverse for the
response. What the tensors mean (``image``, ``image_bytes``, ``probabilities``) is the
router's; the model work is the predictor's.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from service.preprocessing import QUOTED_CHARACTERS, byte_count, shown

HEADER_LENGTH = "inference-header-content-length"
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8,
             "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
             "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "BOOL": np.bool_}


class ProtocolError(ValueError):
    """A request that does not follow the protocol: answered with ``{"error": ...}`` and
    ``status``."""

    status = 400


class TooLargeError(ProtocolError):
    """Too many images, or a body that inflates past the limit."""

    status = 413


class UnsupportedEncodingError(ProtocolError):
    status = 415


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    # numeric tensors: an array of ``shape``; BYTES: a list of bytes, one per element, or
    # None where there are more than the request's max_images (left unread)
    value: np.ndarray | list[bytes] | None
    parameters: dict = field(default_factory=dict)  # the input's own, as sent


@dataclass
class InferRequest:
    inputs: list[Tensor]
    id: str | None = None
    parameters: dict = field(default_factory=dict)
    outputs: list[dict] = field(default_factory=list)  # the requested outputs, as sent

    def binary_output(self, name: str) -> bool:
        """The output's own ``binary_data`` where it says, else the request's
        ``binary_data_output`` (Triton's binary extension); JSON true only, not "true"."""
        for output in self.outputs:
            if output.get("name") == name and "binary_data" in output["parameters"]:
                return output["parameters"]["binary_data"] is True
        return self.parameters.get("binary_data_output") is True


MAX_DIMENSIONS = 32  # NumPy's own limit was 32 until 2.0
INT64_MAX = 2**63 - 1  # the protocol's shapes are int64


def _shape(value) -> list[int]:
    """Checked before anything multiplies it: a shape of a few hundred 4,299-digit numbers
    (JSON allows them) held the GIL for seconds in math.prod, and stalled the worker."""
    if not isinstance(value, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= INT64_MAX
            for d in value):
        raise ProtocolError("'shape' must be a list of non-negative int64 integers")
    if len(value) > MAX_DIMENSIONS:
        raise ProtocolError(f"'shape' has {len(value)} dimensions; at most {MAX_DIMENSIONS}")
    return value


def _parameters(value, where: str) -> dict:
    """A ``parameters`` member: absent, null or an object."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}'parameters' must be an object")
    return value


def _unpack_bytes(raw: memoryview, count: int, name: str) -> list[bytes]:
    """The binary extension's BYTES: each element a 4-byte little-endian length, then data.
    Stops at one element past ``count``: 224 MB of empty elements made 37 million objects."""
    out, offset = [], 0
    while offset < len(raw) and len(out) <= count:
        if offset + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element's length is cut short")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element runs past its data")
        out.append(bytes(raw[offset:offset + length]))
        offset += length
    if len(out) != count or offset < len(raw):
        found = len(out) if offset == len(raw) else f"more than {count}"
        raise ProtocolError(f"input {name!r}: {found} BYTES elements for a shape of {count}")
    return out


def _json_bytes(data, shape: list[int], count: int, name: str) -> list[bytes]:
    """BYTES in JSON: strings holding base64 (JSON cannot carry raw bytes), or the
    ``{"b64": ...}`` objects some clients send."""
    flat = _flatten(data, shape, name)
    if len(flat) != count:
        raise ProtocolError(f"input {name!r}: {len(flat)} elements for a shape of {count}")
    out = []
    for i, item in enumerate(flat):
        text = item.get("b64") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise ProtocolError(f"input {name!r}[{i}]: a BYTES element in JSON is a base64 "
                                "string")
        try:
            out.append(_base64(text))
        except (binascii.Error, ValueError):
            raise ProtocolError(f"input {name!r}[{i}]: not valid base64; in JSON, send each "
                                "image base64-encoded, or use the binary extension") from None
    return out


_URL_SAFE = str.maketrans("-_", "+/")
_LINE_SPACE = " \r\n\t"
_NO_LINE_SPACE = dict.fromkeys(map(ord, _LINE_SPACE))


def _base64(text: str) -> bytes:
    """Base64 as encoders write it: wrapped in lines (MIME's, openssl's), unpadded, or in
    the URL-safe alphabet; each was refused as not base64. One alphabet a string, and only
    the spaces lines are wrapped with."""
    if not text.isascii():
        raise ValueError("not ASCII")
    if any(space in text for space in _LINE_SPACE):
        text = text.translate(_NO_LINE_SPACE)
    if ("-" in text or "_" in text) and not ("+" in text or "/" in text):
        text = text.translate(_URL_SAFE)
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _flatten(data, shape: list[int], name: str) -> list:
    """The values of ``data``, sent flat or nested as ``shape`` says: a nesting that is
    ragged or of another shape was read as its values in order, a client's transposed or
    cut rows answered as if right."""
    if not isinstance(data, list):
        return [data]
    out, depth = [], 1  # the deepest list's depth, data's own being 1
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                depth = max(depth, len(stack))
                break
            out.append(item)
        else:
            stack.pop()
    if depth > 1 and not _nested_as(data, shape, depth):
        raise ProtocolError(f"input {name!r}: the data are nested, but not as its shape "
                            f"{shape}; send them flat or nested as the shape says")
    return out


def _nested_as(data: list, shape: list[int], depth: int) -> bool:
    """Lists ``depth`` deep, each of the length ``shape`` says at its depth: the values
    are then all at the last depth. Only lists are walked, not the values."""
    level = [data]
    for at, size in enumerate(shape):
        if any(not isinstance(item, list) or len(item) != size for item in level):
            return False
        if at == len(shape) - 1:
            return depth == len(shape)  # no list inside the last lists
        level = [value for item in level for value in item]
        if not level:  # a dimension of 0: [2, 0, 3] is [[], []], no list deeper
            return True
    return False  # a shape of no dimensions holds one value, not a list


# A binary request's JSON is a few hundred bytes: a failed parse looks no further than this
# for it, so that a refused body costs no second copy of itself.
HINT_SCAN_BYTES = 64 * 1024
# In JSON past this size, text beyond ASCII (or a \u escape past U+00FF) only in short
# strings: one such character made Python hold a whole long string at 4 bytes a character,
# 3.9 GB for a 217 KB gzip body (a security review). Numbers and base64 are ASCII.
CHECKED_BEYOND_BYTES = 64 * 1024
MAX_WIDE_STRING_BYTES = 4096
_NOT_ASCII = re.compile(rb"[\x80-\xff]")
_SCAN_CHUNK = 1 << 20  # isascii() skips a megabyte at a time; a regex alone took 2.6 s
# Every string but the tensors' data: names, ids, datatypes, parameters (keys too) are
# quoted in messages and echoed back, and one of 224 MB was sent back whole.
MAX_NAME_CHARACTERS = QUOTED_CHARACTERS


def _quote_near(data, position: int, step: int) -> int | None:
    """The nearest unescaped '"' within MAX_WIDE_STRING_BYTES before (step -1) or after
    (step 1) ``position``; None when there is none that near (a long string, or none), or
    past 64 escaped ones."""
    low, high = max(0, position - MAX_WIDE_STRING_BYTES), position + MAX_WIDE_STRING_BYTES
    for _ in range(64):
        found = (data.rfind(b'"', low, position) if step < 0
                 else data.find(b'"', position + 1, high))
        if found < 0:
            return None
        backslashes = 0
        while found - backslashes > 0 and data[found - backslashes - 1] == 0x5C:
            backslashes += 1
        if backslashes % 2 == 0:
            return found
        position = found
    return None


def _wide_positions(data) -> Iterator[int]:
    """Where text past ASCII is: raw bytes past 0x7F, and \\u escapes past U+00FF."""
    view = memoryview(data)
    for offset in range(0, len(data), _SCAN_CHUNK):
        chunk = bytes(view[offset:offset + _SCAN_CHUNK])
        if not chunk.isascii():
            for match in _NOT_ASCII.finditer(chunk):
                yield offset + match.start()
    position, seen = data.find(b"\\u"), 0
    while position >= 0:
        digits = bytes(data[position + 2:position + 6])
        seen += 1  # past this many escapes of any kind, each counts (a bound on this loop)
        if seen > MAX_WIDE_STRING_BYTES or (
                re.fullmatch(rb"[0-9a-fA-F]{4}", digits) and int(digits, 16) > 0xFF):
            yield position
        position = data.find(b"\\u", position + 2)


def _wide_text_in_a_long_string(data) -> bool:
    """Text past ASCII anywhere but in short strings: each search for its quotes looks only
    as far as the longest such string (unbounded, a body without quotes took 35 s), and a
    quote not found that near, or hidden behind escaped ones, counts as a long string."""
    for count, position in enumerate(_wide_positions(data)):
        if count >= MAX_WIDE_STRING_BYTES:
            return True
        if _quote_near(data, position, -1) is None or _quote_near(data, position, 1) is None:
            return True
    return False


def _short_strings(value, where: str, skip_data: bool = False) -> None:
    """Every string in ``value`` (keys too) at most MAX_NAME_CHARACTERS long; a tensor's
    'data' is left to its own checks."""
    if isinstance(value, str):
        if len(value) > MAX_NAME_CHARACTERS:
            raise ProtocolError(f"{where} is a string of {len(value):,} characters; at most "
                                f"{MAX_NAME_CHARACTERS}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _short_strings(key, f"{where}: a key")
            if not (skip_data and key == "data"):
                _short_strings(item, f"{where}.{key[:40]}")
    elif isinstance(value, list):
        for item in value:
            _short_strings(item, where)
MISSING_HEADER_HINT = ("; binary data after the JSON needs the Inference-Header-Content-Length "
                       "header")


def _json_then_binary(body, error: ValueError) -> bool:
    """Whether ``body``, which ``json.loads`` refused with ``error``, is a JSON request
    naming binary data followed by more bytes: binary tensors sent without the header that
    says where the JSON ends."""
    if isinstance(error, UnicodeDecodeError):  # the binary data's first byte not UTF-8
        try:
            text = bytes(body[:min(error.start, HINT_SCAN_BYTES)]).decode("utf-8")
        except UnicodeDecodeError:
            return False
    elif isinstance(error, json.JSONDecodeError) and error.msg == "Extra data" \
            and error.pos <= HINT_SCAN_BYTES:
        text = error.doc[:error.pos]
    else:
        return False
    return _names_binary_data(text)


def _names_binary_data(text: str) -> bool:
    """Whether ``text`` starts with a whole JSON request with an input of binary data."""
    try:  # the JSON ends before the bytes that stopped the parse (its BOM, spaces skipped)
        request, _ = json.JSONDecoder().raw_decode(text.lstrip("\ufeff \t\n\r"))
    except (ValueError, RecursionError):
        return False
    inputs = request.get("inputs") if isinstance(request, dict) else None
    return isinstance(inputs, list) and any(
        isinstance(item, dict) and isinstance(item.get("parameters"), dict)
        and "binary_data_size" in item["parameters"] for item in inputs)


def _check_json_size(header: bytes, max_values: int, max_images: int | None) -> None:
    """Refuse, before parsing, JSON with more values or arrays than a largest real request
    has: parsed, every value and array is a Python object, so 15 MB of ``[],`` took 367 MB
    and a body at the size limit would take gigabytes. Counting bytes overestimates (a comma
    in a string counts), which only errs on the safe side."""
    values = header.count(b",") + 1
    containers = header.count(b"[") + header.count(b"{")
    if values > max_values or containers > max_values // 64 + 1000:
        # the batch's size named: the advice alone (the binary extension) sent a client with
        # too many images to a 413
        batch = f" ({max_images} images)" if max_images is not None else ""
        raise ProtocolError(f"the request's JSON holds more values ({values}) or arrays "
                            f"({containers}) than a request of the largest allowed batch{batch}; "
                            "send images as 'image_bytes', or tensors with the binary extension")


INFLATE_STEP = 1 << 20  # bytes inflated between two checks of the size and the budget


def decode_content(body: bytes, encoding: str | None, limit: int,
                   hold: Callable[[int], None] = lambda size: None) -> bytes | bytearray:
    """A body sent with ``Content-Encoding`` gzip or deflate (tritonclient's request
    compression) inflated, refused past ``limit`` bytes the moment it crosses it.
    ``hold(size)`` is told the bytes held (the body and what is inflated, a step ahead)
    before each step, so that a worker's budget can refuse before the memory is taken."""
    coding = (encoding or "").strip().lower() or "identity"  # " ": none, as on /predict
    if coding == "identity":
        return body
    if coding not in ("gzip", "x-gzip", "deflate"):
        raise UnsupportedEncodingError(f"Content-Encoding {shown(encoding)} is not supported; send "
                                       "gzip, deflate, identity, or no Content-Encoding")
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or a zlib header, either
    out, pending = bytearray(), body
    try:
        while not inflater.eof:
            hold(len(body) + min(len(out) + INFLATE_STEP, limit + 1))
            step = inflater.decompress(pending, INFLATE_STEP)
            out += step
            if len(out) > limit:
                raise TooLargeError("the inflated request is over the limit of "
                                    f"{byte_count(limit)}")
            pending = inflater.unconsumed_tail
            if not step and not pending:  # nothing left to give and no end: cut short
                break
    except zlib.error as exc:
        raise ProtocolError(f"the {coding} body could not be inflated ({exc})") from None
    if not inflater.eof:
        raise ProtocolError(f"the {coding} body is cut short")
    if inflater.unused_data:  # a second gzip member, or junk: not what any client sends
        raise ProtocolError(f"the {coding} body has data after its end")
    return out


def parse_infer_request(body: bytes, header_length: str | None,
                        max_values: int | None = None,
                        max_images: int | None = None) -> InferRequest:
    """A ``POST .../infer`` body, JSON alone or a JSON header followed by binary tensors.

    ``max_values``: the most JSON values a request may hold (see :func:`_check_json_size`);
    ``max_images``: the most BYTES elements (encoded images) an input is unpacked with; past
    it the input's value is None, for the router to refuse by what it knows (the input's
    name, its datatype, the image count); None: no bound.
    """
    if header_length is not None:
        # ASCII digits only: str.isdigit() also accepts '²', which int() refuses; and short,
        # since int() refuses more than 4,300 digits
        if not (header_length.isascii() and header_length.isdigit()) \
                or len(header_length) > 20 or int(header_length) > len(body):
            raise ProtocolError(f"the {HEADER_LENGTH} header ({shown(header_length)}) does not fit "
                                f"the body of {len(body)} bytes")
        split = int(header_length)
        # a view: slicing bytes copies, and a body of 160 MB was held three times over
        header_bytes, binary = body[:split], memoryview(body)[split:]
    else:
        header_bytes, binary = body, memoryview(b"")
    if max_values is not None:
        try:
            _check_json_size(header_bytes, max_values, max_images)
        except ProtocolError as exc:
            # megabytes of binary tensors sent without the header count as JSON values
            if header_length is None and _names_binary_data(
                    bytes(header_bytes[:HINT_SCAN_BYTES]).decode("utf-8", "ignore")):
                raise ProtocolError(f"{exc}{MISSING_HEADER_HINT}") from None
            raise
    if len(header_bytes) > CHECKED_BEYOND_BYTES and _wide_text_in_a_long_string(header_bytes):
        hint = MISSING_HEADER_HINT if header_length is None and _names_binary_data(
            bytes(header_bytes[:HINT_SCAN_BYTES]).decode("utf-8", "ignore")) else ""
        raise ProtocolError(f"the request's JSON has text past ASCII outside a string of at "
                            f"most {MAX_WIDE_STRING_BYTES:,} bytes: numbers and base64 are "
                            f"ASCII, and other text belongs only in short strings{hint}")
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:  # malformed, not UTF-8, or an integer past Python's digit limit
        hint = ""
        if header_length is None and _json_then_binary(header_bytes, exc):
            hint = MISSING_HEADER_HINT
        raise ProtocolError(f"the request is not valid JSON: {exc}{hint}") from None
    except RecursionError:
        raise ProtocolError("the request's JSON is nested too deeply") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    for key, value in header.items():
        if key == "inputs":
            for item in value:
                _short_strings(item, "an input", skip_data=True)
        else:
            _short_strings(value, f"'{key[:40]}'")
        _short_strings(key, "a key")
    offset, inputs = 0, []
    for item in header["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError("every input needs a 'name', a 'datatype' and a 'shape'")
        name, datatype = item["name"], item.get("datatype")
        if not isinstance(datatype, str):
            raise ProtocolError(f"input {name!r}: 'datatype' must be a string such as 'FP32' "
                                "or 'BYTES'")
        shape = _shape(item.get("shape"))
        count = math.prod(shape)  # exact: np.prod wraps around on huge shapes
        # each element would be a Python object; refusing it here as too many images also
        # told a client that sent one image under the wrong name or shape to send fewer
        unread = datatype == "BYTES" and max_images is not None and count > max_images
        parameters = _parameters(item.get("parameters"), f"input {name!r}: ")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"input {name!r}: binary_data_size must be a "
                                    f"non-negative integer, not {shown(size)}")
            if header_length is None:
                raise ProtocolError(f"input {name!r} has binary_data_size, but the request "
                                    "has no Inference-Header-Content-Length header")
            if offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size!r} runs past "
                                    "the body")
            raw = binary[offset:offset + size]
            offset += size
        elif "data" not in item:
            raise ProtocolError(f"input {name!r} has neither 'data' nor binary data")
        if unread:
            value = None
        elif datatype == "BYTES":
            value = (_unpack_bytes(raw, count, name) if size is not None
                     else _json_bytes(item["data"], shape, count, name))
        elif datatype in DATATYPES:
            dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
            if size is not None:
                if len(raw) != count * dtype.itemsize:
                    raise ProtocolError(f"input {name!r}: {len(raw)} bytes of binary data for "
                                        f"{count} {datatype} values")
                array = np.frombuffer(raw, dtype=dtype)
            else:
                flat = _flatten(item["data"], shape, name)
                if len(flat) != count:
                    raise ProtocolError(f"input {name!r}: {len(flat)} values for a shape of "
                                        f"{shape}")
                try:
                    # JSON numbers only (true and false for BOOL): NumPy also reads "0.5"
                    # and true as numbers
                    allowed = {bool} if datatype == "BOOL" else {int, float}
                    if not set(map(type, flat)) <= allowed:
                        raise TypeError
                    array = np.asarray(flat, dtype=dtype)
                except (TypeError, ValueError, OverflowError):
                    raise ProtocolError(f"input {name!r}: the data are not {datatype} "
                                        "numbers") from None
            try:
                value = array.reshape(shape)
            except ValueError as exc:  # more dimensions than NumPy takes, or one too large
                raise ProtocolError(f"input {name!r}: shape {shape} cannot be made ({exc})"
                                    ) from None
        else:
            raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}")
        inputs.append(Tensor(name, datatype, shape, value, parameters))
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data belong to no input")
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError("'outputs' must be a list of objects")
    outputs = [{**o, "parameters": _parameters(o.get("parameters"),
                                               f"output {shown(o.get('name'))}: ")}
               for o in outputs]
    parameters = _parameters(header.get("parameters"), "")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")  # echoed back as a Python repr before
    return InferRequest(inputs, request_id, parameters, outputs)


def encode_infer_response(model_name: str, model_version: str, request: InferRequest,
                          outputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and the headers it needs; outputs the client asked for in binary
    follow the JSON header."""
    header: dict = {"model_name": model_name, "model_version": model_version, "outputs": []}
    if request.id is not None:
        header["id"] = request.id
    binary = []
    for name, array in outputs.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        entry = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if request.binary_output(name):
            raw = array.astype("<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        header["outputs"].append(entry)
    text = json.dumps(header).encode()
    if not binary:
        return text, {"content-type": "application/json"}
    return text + b"".join(binary), {"content-type": "application/octet-stream",
                                     HEADER_LENGTH: str(len(text))}
