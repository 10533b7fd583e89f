"""An origin as a browser writes it in its ``Origin`` header, which CORS compares as text:
an allowed origin written any other way started the service and then matched no request.

The host forms follow the WHATWG URL standard's serialisation, not Python's: IPv4 parts in
hex or octal, or fewer than four, are one address; IPv6 is written in lower-case hex with the
longest run of zero groups compressed (Python 3.13 writes IPv4-mapped ones dotted).
"""

from __future__ import annotations

import ipaddress
import re

ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://([a-z0-9_-]+(?:\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\])"
                    r"(?::([1-9][0-9]{0,4}))?", re.ASCII)
DEFAULT_PORTS = {"http": 80, "https": 443}
NULL_ORIGIN_SCHEMES = {"file", "about", "data", "javascript"}
CREATORS_ORIGIN_SCHEMES = {"ws", "wss", "blob"}  # a WebSocket's handshake, a blob: URL
NUMBER = re.compile(r"0x[0-9a-f]*|[0-9]+", re.ASCII)


def browser_origin(value: str) -> str:
    """``value`` in lower case, or ValueError saying what a browser would send instead."""
    if value == "*":
        return value
    origin = ORIGIN.fullmatch(value.lower())
    try:
        if origin is None or int(origin[3] or 0) > 65535:
            raise ValueError
        scheme, host, port = origin.groups()
        written = ipv6_host(host) if host.startswith("[") else ipv4_host(host)
    except ValueError:
        raise ValueError(f"{value!r} is not an origin; give scheme://host[:port] with no "
                         "path, as https://app.example (a host in punycode), or *") from None
    # each would start the service and then match no request
    if scheme in NULL_ORIGIN_SCHEMES:
        raise ValueError(f"{value!r} is no origin a browser sends: a {scheme}: page sends "
                         "Origin null, which is not taken (it admits sandboxed frames too); "
                         "serve the page over http(s)")
    if scheme in CREATORS_ORIGIN_SCHEMES:
        raise ValueError(f"{value!r} is no origin a browser sends: a {scheme}: request or "
                         "page carries the origin of the page that made it; give that one")
    if written is not None and written != host:
        raise ValueError(f"{value!r} writes its address as a browser does not; give "
                         f"{scheme}://{written}" + (f":{port}" if port else ""))
    if port is not None and DEFAULT_PORTS.get(scheme) == int(port):
        raise ValueError(f"{value!r} names its scheme's default port, which a browser "
                         f"leaves out of Origin; give {scheme}://{host}")
    return value.lower()


def ipv4_host(host: str) -> str | None:
    """The dotted address a browser makes of a host whose last label is a number (``127.1``,
    ``0x7f.0.0.1``); None for a name; ValueError where a browser refuses the URL."""
    parts = host.split(".")
    if not NUMBER.fullmatch(parts[-1]):
        return None
    if len(parts) > 4 or not all(NUMBER.fullmatch(part) for part in parts):
        raise ValueError(host)
    numbers = [int(p[2:] or "0", 16) if p.startswith("0x") else
               int(p, 8) if len(p) > 1 and p.startswith("0") else int(p) for p in parts]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise ValueError(host)
    address = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        address += n << (8 * (3 - i))
    return str(ipaddress.IPv4Address(address))


def ipv6_host(host: str) -> str:
    """``[...]`` as a browser writes it: eight lower-case hex groups, the longest run of two or
    more zero groups (the first of equals) written ``::``."""
    packed = ipaddress.IPv6Address(host[1:-1]).packed
    groups = [int.from_bytes(packed[i:i + 2], "big") for i in range(0, 16, 2)]
    start, length, i = -1, 1, 0
    while i < 8:
        j = i
        while j < 8 and groups[j] == 0:
            j += 1
        if j - i > length:
            start, length = i, j - i
        i = max(j, i + 1)
    text = [f"{g:x}" for g in groups]
    if start < 0:
        return f"[{':'.join(text)}]"
    return f"[{':'.join(text[:start])}::{':'.join(text[start + length:])}]"
