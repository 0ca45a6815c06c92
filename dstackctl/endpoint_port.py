"""The service endpoint's local port: which one a file asks for, whether it is free, and
moving a running service's endpoint to another one (its agent serves the new port before it
closes the old)."""

from __future__ import annotations

import contextlib

from dstackctl.config.loader import LoadedConfig
from dstackctl.errors import DstackctlError
from dstackctl.store import SPEC, Store, StoreError


def endpoint_port(loaded: LoadedConfig, override: int | None) -> int:
    """`--port`, else the local part of `port: LOCAL:CONTAINER`, else the container port."""
    port = loaded.config.port
    return override or port.local_port or port.container_port


def check_port_free(store: Store, name: str, port: int) -> None:
    from dstackctl.netutil import port_is_free

    if not port_is_free("127.0.0.1", port):
        holder = next((other for other in _endpoint_holders(store, port) if other != name), None)
        who = f"the endpoint of {holder} (dstackctl)" if holder else "another program"
        raise DstackctlError(
            f"port {port} on 127.0.0.1 is in use by {who}, and {name}'s endpoint needs it; "
            f"choose another with --port or `port: LOCAL:CONTAINER`"
        )


def move_endpoint(store: Store, name: str, port: int) -> int | None:
    """Ask the agent to move the running service's endpoint to `port` (it serves on the new
    port before it closes the old one); returns the old port, None when it had `port` already."""
    with store.lock(name):
        data = store.read(name, SPEC) or {}
        old = data.get("endpoint_port")
        if old is None or old == port:
            return None
        check_port_free(store, name, port)
        store.write(name, SPEC, {**data, "endpoint_port": port})
    return int(old)


def _endpoint_holders(store: Store, port: int) -> list[str]:
    """Running services of this store whose endpoint has `port`."""
    holders = []
    for other in store.names():
        with contextlib.suppress(StoreError):
            spec = store.read(other, SPEC) or {}
            if spec.get("desired") == "running" and spec.get("endpoint_port") == port:
                holders.append(other)
    return holders
