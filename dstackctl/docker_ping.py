"""Is the Docker engine up? `run` asks before it starts anything. Where the engine is a local
socket, as it nearly always is, the answer comes from one `GET /_ping` over that socket, not
from docker-py: importing docker-py costs `run` ~0.1 s before its agent can start (the agent
loads docker-py itself, ahead of time: agent/warm_start.py)."""

from __future__ import annotations

import os
import socket

from dstackctl.docker_address import (
    DEFAULT_SOCKET,
    PERMISSION_DENIED,
    DockerError,
    engine_address,
    not_running,
)

PING = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n"


def ping_local_engine(timeout: float = 30.0) -> bool:
    """True when the engine is a local socket and answered; False when it is elsewhere (TCP,
    SSH, a context's host), for docker-py to reach. Raises DockerError when the local socket
    does not answer, worded as docker.py words it."""
    address = engine_address() or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
    if not address.startswith("unix://"):
        return False
    path = address.removeprefix("unix://")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(PING)
            answer = _read_status_line(sock)
    except PermissionError:
        raise DockerError(PERMISSION_DENIED) from None
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        raise not_running(address) from None
    except OSError as exc:  # a timeout, a reset: the engine is there but not answering
        raise DockerError(f"cannot talk to Docker at {address}: {exc.strerror or exc}") from None
    parts = answer.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or parts[1] != b"200":
        shown = answer.decode("ascii", "replace").strip() or "nothing"
        raise DockerError(f"cannot talk to Docker at {address}: its ping answered {shown!r}")
    return True


def _read_status_line(sock: socket.socket) -> bytes:
    received = b""
    while b"\r\n" not in received and len(received) < 1024:
        chunk = sock.recv(1024)
        if not chunk:
            break
        received += chunk
    return received.partition(b"\r\n")[0]
