"""Socket helpers that need no heavy imports (the CLI uses them before starting an agent, the
agent before it imports aiohttp)."""

from __future__ import annotations

import errno
import socket

from dstackctl.errors import DstackctlError

BACKLOG = 1024


class EndpointError(DstackctlError):
    pass


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def listen(host: str, port: int) -> socket.socket:
    """The service endpoint's listening socket. Connections wait in its backlog until the
    endpoint serves them, so it can be bound before the proxy is ready to answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise EndpointError(
                f"port {port} on {host} is in use by another program; choose another "
                f"with --port or `port: LOCAL:CONTAINER`"
            ) from None
        raise EndpointError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.setblocking(False)
    return sock
