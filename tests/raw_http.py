"""Raw HTTP over a socket: requests a well-behaved client would never send, and reading the answer.

For the tests of the served webhook and console: what aiohttp's HTTP parser refuses must be a 400
problem+json naming the kind of error, never echoing what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson

from producers.openapi import CHANGES_PATH

LOOPBACK = "127.0.0.1"


async def raw(port: int, request: bytes, *, read_s: float = 10.0, first: bool = False) -> bytes:
    """Send bytes as they are on a fresh connection; what the server answers until it closes the
    connection, or only its first chunk with ``first``, or whatever came within ``read_s``."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    answer = b""
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(request)
            await writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(read_s):
                while chunk := await reader.read(65536):
                    answer += chunk
                    if first:
                        break
    finally:
        writer.close()
    return answer


def status_of(answer: bytes) -> int:
    """The status code of the first response in ``answer`` (0 when there is none)."""
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) > 1 and line[0].startswith(b"HTTP/") else 0


#: Requests aiohttp's parser refuses before any handler runs, each carrying a marker that must not
#: be echoed (it stands for a signature or a piece of the body).
MARKER = "Zm9yZ2VkLW1hcmtlcg"
MALFORMED_REQUESTS = {
    "bad request line": f"GET /healthz?{MARKER} HTTP/1.1 extra\r\nHost: x\r\n\r\n".encode(),
    "bad method": f"G\x01T /{MARKER} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "bad header name": f"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name{MARKER}: v\r\n\r\n".encode(),
    "control character in a header": f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Note: {MARKER}\x01\r\n\r\n".encode(),
    "header too long": f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: {MARKER * 600}\r\n\r\n".encode(),
    "request line too long": f"GET /{MARKER * 600} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "bad Content-Length": f"POST {CHANGES_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1{MARKER}\r\n\r\n".encode(),
    "Content-Length and chunked": (
        f"POST {CHANGES_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"0\r\n\r\n{MARKER}"
    ).encode(),
    "bad chunk size": (
        f"POST {CHANGES_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\n\r\nzz{MARKER}\r\n{{}}\r\n0\r\n\r\n"
    ).encode(),
    "not HTTP (a TLS hello)": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + MARKER.encode(),
}


def problem_of(answer: bytes) -> dict[str, object]:
    """The problem+json body of the first response in ``answer``; fails when it is not one."""
    head, _, body = answer.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line)
    headers = {name.lower(): value for name, value in headers.items()}
    assert headers.get("content-type", "").startswith("application/problem+json"), answer[:500]
    problem = orjson.loads(body[: int(headers["content-length"])])
    assert isinstance(problem, dict)
    assert {"type", "title", "status", "detail"} <= set(problem), problem
    return problem


async def assert_malformed_answered_as_problems(port: int) -> None:
    """Every request of MALFORMED_REQUESTS is a 400 problem+json naming the kind of error only."""
    for kind, request in MALFORMED_REQUESTS.items():
        answer = await raw(port, request)
        assert status_of(answer) == 400, (kind, answer[:300])
        problem = problem_of(answer)
        assert problem["status"] == 400, kind
        assert problem["title"] == "Bad Request", kind
        assert MARKER not in answer.decode("latin-1"), kind
