"""Keep an SMG router's worker list equal to a set of ready replicas (`type: smg` router groups).

Follows dstack 0.22.5, dstack/_internal/server/services/runs/router_worker_sync.py:
`sync_router_workers_for_run_model` (plan: read, add the missing, then remove the gone),
`_get_router_workers` (GET /workers, 200 → {"workers": [{"id", "url", "labels"?}, ...]}),
`_add_worker_to_router` (POST /workers; 202 {"status": "accepted", "worker_id"} or a 409 whose
"code" is WORKER_CREATE_IN_PROGRESS / WORKER_ALREADY_EXISTS is success),
`_remove_worker_from_router` (DELETE /workers/{id}, 202 {"status": "accepted"}),
`_get_sglang_target_worker` / `_set_target_worker_job_id` (the POST body) and
`_get_current_worker_job_id` (the label `dstack.ai/job-id` says which workers are ours; a worker
without it is matched by the host:port of its URL, so it is never added twice and never removed).

Where we differ: the label's value is our replica key, not a job UUID; dstack probes each worker
(/v1/models, /server_info) to pick worker_type and grpc vs http, we register every worker as an
HTTP SGLang "regular" worker; a worker of ours whose key is wanted at another host:port is
replaced; the first network failure ends the sync (dstack logs it and tries the next request).
No retries inside a sync: the next sync is the retry, as in dstack. Like dstack we send no
Authorization header, so a router started with --api-key answers 401 (reported as an error).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

WORKER_LABEL = "dstack.ai/job-id"  # dstack's _WORKER_LABEL_DSTACK_JOB_ID
_MAX_LIST_BYTES = 2 * 1024 * 1024  # dstack's _ROUTER_MAX_WORKERS_RESPONSE_BYTES
_MAX_ACK_BYTES = 64 * 1024  # dstack's _ROUTER_MAX_WORKERS_COMMAND_ACK_BYTES
_MAX_LIST_ITEMS = 8192  # dstack's _ROUTER_MAX_WORKERS_LIST_ITEMS
_BENIGN_CONFLICTS = frozenset({"WORKER_CREATE_IN_PROGRESS", "WORKER_ALREADY_EXISTS"})


@dataclass(frozen=True)
class Worker:
    key: str  # stable id of the replica, e.g. "workers/0/3"; the value of WORKER_LABEL
    url: str  # "http://172.18.0.5:8000"

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if not self.key or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"worker {self.key!r} needs a key and an http(s)://host:port URL")


@dataclass(frozen=True)
class SyncResult:
    added: tuple[str, ...] = ()  # keys the router accepted (202) in this sync
    removed: tuple[str, ...] = ()  # keys of the workers the router accepted to remove
    error: str | None = None  # one sentence, None when every request went as planned


class _Registered(NamedTuple):
    worker_id: str
    key: str | None  # our label's value, None for a worker without it
    netloc: str


class _Router(NamedTuple):
    https: bool
    host: str
    port: int | None
    prefix: str

    @property
    def name(self) -> str:  # host:port only: never the userinfo, path or query of the URL
        return self.host if self.port is None else f"{self.host}:{self.port}"


class _RouterError(Exception):
    """A request failed; the message is one sentence, safe to show."""


class _Unreachable(_RouterError):
    """The router did not answer: no further request is tried in this sync."""


class RouterSync:
    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout  # per socket operation (connect, each read), as http.client does

    def sync(self, router_base_url: str, workers: Collection[Worker]) -> SyncResult:
        """Make the router's worker list equal to `workers`: read it, add the missing, remove the
        ones not wanted (only workers this agent registered or whose URL matches, as dstack
        does), never raise on network errors (return error)."""
        try:
            router = _parse_router(router_base_url)
        except ValueError:
            return SyncResult(error="The router URL is not an http(s)://host:port URL.")
        wanted = {w.key: w for w in workers}
        try:
            current = self._list(router)
        except _RouterError as exc:
            return SyncResult(error=str(exc))
        to_add, to_remove = _plan(current, wanted)
        added: list[str] = []
        removed: list[str] = []
        errors: list[str] = []
        try:
            for worker in to_add:
                _attempt(partial(self._add, router, worker), worker.key, added, errors)
            for reg in to_remove:
                _attempt(
                    partial(self._remove, router, reg.worker_id), reg.key or reg.worker_id, removed, errors
                )
        except _Unreachable as exc:
            errors.append(str(exc))
        error = None
        if errors:
            error = errors[0] if len(errors) == 1 else f"{errors[0]} ({len(errors) - 1} more failed)"
        return SyncResult(tuple(added), tuple(removed), error)

    def _list(self, router: _Router) -> list[_Registered]:
        status, raw = self._request(router, "GET", "/workers", None, _MAX_LIST_BYTES)
        if status != 200:
            raise _RouterError(f"Router at {router.name} answered GET /workers with HTTP {status}.")
        try:
            return _parse_workers(json.loads(raw))
        except (ValueError, TypeError, KeyError) as exc:
            raise _RouterError(
                f"Router at {router.name} sent a /workers list we cannot read ({exc})."
            ) from None

    def _add(self, router: _Router, worker: Worker) -> bool:
        # The body of dstack's _get_sglang_target_worker(connection_mode="http") for a regular
        # worker, plus _set_target_worker_job_id's label, in the same key order.
        body = {
            "url": worker.url,
            "worker_type": "regular",
            "connection_mode": "http",
            "runtime_type": "sglang",
            "labels": {WORKER_LABEL: worker.key},
        }
        status, raw = self._request(router, "POST", "/workers", body, _MAX_ACK_BYTES)
        if status == 202 and _field(raw, "status") == "accepted":
            return True
        if status == 409 and _field(raw, "code") in _BENIGN_CONFLICTS:
            return False  # being registered, or registered and not listed yet
        raise _RouterError(f"Router at {router.name} refused to add {worker.key}: {_answer(status, raw)}.")

    def _remove(self, router: _Router, worker_id: str) -> bool:
        path = "/workers/" + quote(worker_id, safe="")
        status, raw = self._request(router, "DELETE", path, None, _MAX_ACK_BYTES)
        if status == 202 and _field(raw, "status") == "accepted":
            return True
        raise _RouterError(
            f"Router at {router.name} refused to remove worker {worker_id}: {_answer(status, raw)}."
        )

    def _request(
        self, router: _Router, method: str, path: str, body: dict[str, Any] | None, limit: int
    ) -> tuple[int, bytes]:
        cls = http.client.HTTPSConnection if router.https else http.client.HTTPConnection
        conn = cls(router.host, router.port, timeout=self.timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"  # SMG answers 415 without it
        try:
            conn.request(method, router.prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(limit + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise _Unreachable(
                f"Router at {router.name} did not answer {method} {path}: {_describe(exc, self.timeout)}."
            ) from None
        finally:
            conn.close()
        if len(raw) > limit:
            raise _RouterError(f"Router at {router.name} answered {method} {path} with over {limit} bytes.")
        return resp.status, raw


def _attempt(call: Callable[[], bool], key: str, done: list[str], errors: list[str]) -> None:
    """Run one add/remove; a refusal is noted and the next request is tried, _Unreachable is not
    caught: the router is gone for this sync."""
    try:
        if call():
            done.append(key)
    except _Unreachable:
        raise
    except _RouterError as exc:
        errors.append(str(exc))


def _plan(current: list[_Registered], wanted: dict[str, Worker]) -> tuple[list[Worker], list[_Registered]]:
    """dstack's plan: a worker with our label is kept while its key is wanted (and, here, at the
    same host:port), else removed; one without it counts for the wanted worker at its host:port
    and is never removed; every wanted key not kept is added."""
    by_netloc = {urlsplit(w.url).netloc: key for key, w in wanted.items()}
    kept: set[str] = set()
    to_remove: list[_Registered] = []
    for reg in current:
        if reg.key is None:
            if reg.netloc in by_netloc:
                kept.add(by_netloc[reg.netloc])
        elif reg.key in wanted and urlsplit(wanted[reg.key].url).netloc == reg.netloc:
            kept.add(reg.key)
        else:
            to_remove.append(reg)
    to_add = [w for key, w in wanted.items() if key not in kept]
    return to_add, to_remove


def _parse_workers(doc: Any) -> list[_Registered]:
    """dstack's _WorkerListResponse: FailFast, one bad entry makes the whole list unreadable."""
    items = doc["workers"]
    if not isinstance(items, list) or len(items) > _MAX_LIST_ITEMS:
        raise ValueError(f"'workers' is not a list of at most {_MAX_LIST_ITEMS} entries")
    out: list[_Registered] = []
    for item in items:
        worker_id, url, labels = item["id"], item["url"], item.get("labels") or {}
        if not isinstance(worker_id, str) or not isinstance(url, str) or not isinstance(labels, dict):
            raise ValueError("a worker without a string id and url")
        key = labels.get(WORKER_LABEL)
        out.append(
            _Registered(worker_id, key if isinstance(key, str) and key else None, urlsplit(url).netloc)
        )
    return out


def _parse_router(base_url: str) -> _Router:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(base_url)
    return _Router(parts.scheme == "https", parts.hostname, parts.port, parts.path.rstrip("/"))


def _field(raw: bytes, name: str) -> Any:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc.get(name) if isinstance(doc, dict) else None


def _answer(status: int, raw: bytes) -> str:
    code = _field(raw, "code")  # SMG's error code, e.g. BAD_REQUEST; never the message text
    return f"HTTP {status} {code}" if isinstance(code, str) and code.isidentifier() else f"HTTP {status}"


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return getattr(exc, "strerror", None) or type(exc).__name__
