"""The bearer token of a service with `auth: true`: `token.json` in the service's folder of the
store (0600, written like every store document), made by the CLI when the service first runs
with auth on and kept for the service's life, across redeploys and stops. The agent reads it
from there; it is never in spec.json, a label, a command line or a log."""

from __future__ import annotations

import secrets
from typing import Any

from dstackctl.errors import DstackctlError
from dstackctl.store import SPEC, Store, StoreError

TOKEN = "token"
TOKEN_BYTES = 32  # 43 URL-safe characters


def wants_auth(config: dict[str, Any]) -> bool:
    """A stored config (spec.json's `config`) asks for a token at the endpoint."""
    return config.get("auth") is True


def read_token(store: Store, name: str) -> str | None:
    """The service's token; None when there is none or its file cannot be read."""
    try:
        document = store.read(name, TOKEN)
    except (StoreError, OSError):
        return None
    token = document.get("token") if document else None
    return token if isinstance(token, str) and token else None


def ensure_token(store: Store, name: str) -> str:
    """The service's token, made now when it has none (or its file was unreadable).
    Takes the service's lock: call it outside any other hold of that lock."""
    with store.lock(name):
        token = read_token(store, name)
        if token is None:
            token = secrets.token_urlsafe(TOKEN_BYTES)
            store.write(name, TOKEN, {"token": token})
        return token


def keep_token(store: Store, name: str, config: dict[str, Any]) -> None:
    """Before `run`/`apply`/`redeploy` write a spec with `auth: true`: the service's token, so
    that the agent finds it (made the first time, then kept)."""
    if wants_auth(config):
        ensure_token(store, name)


def token_of_service(store: Store, name: str) -> str:
    """What `dstackctl token NAME` prints: the token of a service whose configuration (the one
    last submitted) has `auth: true`. Raises NoSuchService as `ps NAME` does, and an error
    when auth is off."""
    from dstackctl.errors import NoSuchService
    from dstackctl.spec_document import SpecDocument

    spec = store.read(name, SPEC) if store.exists(name) else None
    if spec is None:
        raise NoSuchService(name)
    if not wants_auth(SpecDocument.from_json(spec).current.config):
        raise DstackctlError(
            f"{name} has auth off: its endpoint takes requests without a token; add `auth: true` "
            f"to its file and apply it to require one"
        )
    return ensure_token(store, name)
