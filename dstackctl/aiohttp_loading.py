"""aiohttp, imported without the TLS client contexts it builds at import.

Importing aiohttp.connector creates a verified and an unverified default `SSLContext`, and
both load the system's CA certificates: about 100 ms of CPU on a 2-core machine, spent while
the agent's first containers are being created (and again by every restarted agent). The
endpoint never makes a TLS connection with aiohttp: its upstreams are replicas on 127.0.0.1,
spoken to in plain HTTP. So while aiohttp is imported, those two contexts are made without
loading any CA certificate: a TLS client that used them would fail verification, never skip
it. The patch lasts for the import alone; the agent calls `load_aiohttp` before it imports
the endpoint (dstackctl.proxy), which the CLI never imports.
"""

from __future__ import annotations

import ssl
import sys
import threading
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()


def load_aiohttp() -> None:
    """Import aiohttp (once per process) without loading CA certificates for it."""
    with _lock:
        if "aiohttp" in sys.modules:
            return
        create: Callable[..., ssl.SSLContext] = ssl.create_default_context
        own_paths = vars(ssl.SSLContext).get("set_default_verify_paths")  # else inherited from _ssl

        def without_certificates(*args: Any, **kwargs: Any) -> ssl.SSLContext:
            if args or kwargs:  # a purpose or CA files: not aiohttp's import-time call
                return create(*args, **kwargs)
            return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies against no CA at all

        ssl.create_default_context = without_certificates
        ssl.SSLContext.set_default_verify_paths = lambda self: None  # type: ignore[method-assign]
        try:
            import aiohttp  # noqa: F401
        finally:
            ssl.create_default_context = create
            if own_paths is not None:
                ssl.SSLContext.set_default_verify_paths = own_paths  # type: ignore[method-assign]
            else:
                del ssl.SSLContext.set_default_verify_paths
