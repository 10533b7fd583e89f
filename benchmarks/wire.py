"""A minimal HTTP/1.1 keep-alive client for latency benchmarks, in the spirit of wrk.

httpx costs several hundred microseconds of Python per request, on the same two cores as the
server; when the model itself takes under a millisecond, that cost would be measured as the
server's. This client sends requests built once in advance and reads each response by its
Content-Length, so nearly all the time it measures is the server's. Benchmarks that check
behaviour (load, soak, overload) keep using httpx through :mod:`benchmarks.load`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from urllib.parse import urlsplit

from benchmarks.load import Outcome


def multipart_request(host: str, path: str, parts: list[tuple[str, bytes]]) -> bytes:
    """The bytes of a POST of ``parts`` ((filename, image bytes)) as ``files`` fields."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n"
        for name, data in parts) + f"--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n")
    return head.encode() + body


def raw_request(host: str, path: str, data: bytes, content_type: str = "image/jpeg") -> bytes:
    """The bytes of a POST with the image itself as the body."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(data)}\r\n"
            f"Content-Type: {content_type}\r\n\r\n")
    return head.encode() + data


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next((int(line.split(b":", 1)[1]) for line in lines[1:]
                   if line[:15].lower() == b"content-length:"), None)
    if length is None:
        raise ValueError("response without Content-Length")
    await reader.readexactly(length)
    return status


async def send_requests(base: str, requests: list[bytes], clients: int, count: int
                        ) -> tuple[list[Outcome], float]:
    """``clients`` keep-alive connections sending ``count`` requests, cycling ``requests``;
    outcomes (status, latency) and the wall time."""
    url = urlsplit(base)
    numbers = itertools.count()
    outcomes: list[Outcome] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        try:
            while (i := next(numbers)) < count:
                sent = time.perf_counter()
                writer.write(requests[i % len(requests)])
                await writer.drain()
                status = await _read_response(reader)
                outcomes.append(Outcome(status, time.perf_counter() - sent))
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes, time.perf_counter() - started
