"""One HTTP probe on the wire: the request's bytes, and what an answer (or its absence) means.

A probe needs the status code only, so nothing past the status line is parsed: reading the
headers with http.client cost about half of the runner's CPU at 1000 probes/s. The blocking
`execute_probe` serves one-off checks; the runner drives the same bytes through non-blocking
sockets (probe_transport.py).
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from urllib.parse import quote

from dstackctl import __version__
from dstackctl.config.probe_model import ProbeConfig

USER_AGENT = f"dstackctl/{__version__}"
# Only the status line is read; anything after the first 8 KiB is never looked at.
STATUS_LINE_CAP_BYTES = 8 * 1024
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})")
CONNECT_TIMEOUT_SECONDS = 2.0
NO_RESPONSE = "closed the connection without a response"
# What Docker's userland proxy does when nothing listens behind a published port (it varies).
PROXY_ANSWERS = (NO_RESPONSE, "connection reset")


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    status: int | None
    error: str | None


def request_bytes(host: str, port: int, probe: ProbeConfig) -> bytes:
    """The whole HTTP/1.1 request of a probe; header values cannot smuggle a line break."""
    url = quote(probe.url, safe="/?&=%:+,;@!$'()*~#[]-._")
    lines = [
        f"{probe.method.upper()} {url} HTTP/1.1",
        f"Host: {host}:{port}",
        f"User-Agent: {USER_AGENT}",
        "Connection: close",
    ]
    lines += [f"{h.name}: {_one_line(h.value)}" for h in probe.headers]
    body = probe.body.encode() if probe.body is not None else b""
    if probe.body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


def head_complete(head: bytes) -> bool:
    """True once `head` holds the status line, or as much as is ever read."""
    return b"\n" in head or len(head) >= STATUS_LINE_CAP_BYTES


def answer_of(head: bytes) -> ProbeResult:
    """The result of a probe whose server sent `head` (possibly nothing) and then stopped."""
    if not head:
        return ProbeResult(False, None, NO_RESPONSE)
    match = _STATUS_LINE.match(head)
    if match is None:
        return ProbeResult(False, None, "answered with something that is not HTTP")
    status = int(match.group(1))
    if 200 <= status < 300:
        return ProbeResult(True, status, None)
    return ProbeResult(False, status, f"HTTP {status}")


def failure_of(exc: OSError, timeout: float) -> ProbeResult:
    """The result of a probe whose connection failed with `exc`."""
    if isinstance(exc, ConnectionRefusedError):
        return ProbeResult(False, None, "connection refused")
    if isinstance(exc, TimeoutError):
        return timed_out(timeout)
    if isinstance(exc, ConnectionResetError):
        return ProbeResult(False, None, "connection reset")
    return ProbeResult(False, None, f"{type(exc).__name__}: {exc.strerror or exc}"[:200])


def timed_out(timeout: float) -> ProbeResult:
    return ProbeResult(False, None, f"timed out after {timeout}s")


def execute_probe(host: str, port: int, probe: ProbeConfig) -> ProbeResult:
    """Send one probe request and read its status line, blocking; never raises, never
    follows redirects."""
    deadline = time.monotonic() + probe.timeout
    try:
        with socket.create_connection((host, port), timeout=probe.timeout) as sock:
            sock.sendall(request_bytes(host, port, probe))
            head = b""
            while not head_complete(head):
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(STATUS_LINE_CAP_BYTES - len(head))
                if not chunk:
                    break
                head += chunk
    except OSError as exc:
        return failure_of(exc, probe.timeout)
    return answer_of(head)


def can_connect(host: str, port: int) -> bool:
    """True when a TCP connection to host:port succeeds: something listens there."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False
