#!/usr/bin/env python3
"""A fake SMG (Shepherd Model Gateway) router: the worker API that dstack's router worker sync uses.

Endpoints, shaped as SMG answers them (docs/reference/api/admin.md of the smg project):

- ``GET /workers`` → 200 ``{"workers": [{"id", "url", "worker_type", "connection_mode",
  "runtime_type", "labels"?, "is_healthy", "status", "load"}], "total", "stats"}``
- ``POST /workers`` (JSON spec, ``url`` required) → 202 ``{"status": "accepted", "worker_id",
  "url", "location", "message"}``; 409 ``{"error", "code": "WORKER_ALREADY_EXISTS"}`` for a
  registered URL, ``WORKER_CREATE_IN_PROGRESS`` for one still registering; 415 without
  ``Content-Type: application/json``; 400 for bad JSON or a URL without an http/grpc scheme.
- ``DELETE /workers/{id}`` → 202 ``{"status": "accepted", "worker_id", "message"}``; 400
  ``BAD_REQUEST`` when the id is not a UUID; 404 ``WORKER_NOT_FOUND``.
- ``GET /health`` → 200 ``{"status": "ok"}`` (not recorded).

Knobs (attributes, or ``POST /_fake/knobs`` with the same names as JSON when run standalone):
``fail`` maps a method to the status every such request gets (e.g. ``{"GET": 500}``), ``hang``
is a set of methods whose requests get no answer until ``hang_seconds`` pass or the router stops,
``async_register`` keeps POSTed workers pending (not listed, 409 in progress) until
``complete_pending()`` (``POST /_fake/complete``). ``restart()`` (``POST /_fake/restart``) forgets
every worker. ``calls`` records each worker API request (``GET /_fake/calls``).

Stdlib only, one file: ``python tests/fake_router.py --port 30000 [--host 0.0.0.0]``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import uuid
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_SCHEMES = ("http://", "https://", "grpc://", "grpcs://")


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: Any  # parsed JSON; the raw text when it is not JSON; None without a body


class FakeRouter:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.calls: list[Call] = []
        self.workers: dict[str, dict[str, Any]] = {}  # id → spec, listed
        self.pending: dict[str, dict[str, Any]] = {}  # id → spec, registration in progress
        self.fail: dict[str, int] = {}
        self.hang: set[str] = set()
        self.hang_seconds = 30.0
        self.async_register = False
        self.lock = threading.Lock()
        self._stopped = threading.Event()
        self._server = _Server((host, port), _Handler)
        self._server.router = self
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = str(self._server.server_address[0]), self._server.server_address[1]
        return f"http://{host}:{port}"

    def start(self) -> FakeRouter:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="fake-router", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()  # wakes hung handlers
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeRouter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restart(self) -> None:
        """A restarted router process: every registered or registering worker is forgotten."""
        with self.lock:
            self.workers.clear()
            self.pending.clear()

    def complete_pending(self) -> None:
        with self.lock:
            self.workers.update(self.pending)
            self.pending.clear()

    def add_foreign_worker(self, url: str, labels: dict[str, str] | None = None) -> str:
        """Register a worker the way someone else would (e.g. --worker-urls), without a call."""
        worker_id = str(uuid.uuid4())
        with self.lock:
            self.workers[worker_id] = {"url": url, "labels": dict(labels or {})}
        return worker_id

    def urls(self) -> set[str]:
        with self.lock:
            return {spec["url"] for spec in self.workers.values()}

    def take_calls(self) -> list[Call]:
        with self.lock:
            calls, self.calls = self.calls, []
        return calls

    def set_knobs(self, knobs: dict[str, Any]) -> None:
        with self.lock:
            self.fail = {str(m).upper(): int(s) for m, s in knobs.get("fail", self.fail).items()}
            self.hang = {str(m).upper() for m in knobs.get("hang", self.hang)}
            self.hang_seconds = float(knobs.get("hang_seconds", self.hang_seconds))
            self.async_register = bool(knobs.get("async_register", self.async_register))

    # The request handling proper; every method answers (status, JSON document).

    def handle(self, method: str, path: str, body: Any, is_json: bool) -> tuple[int, Any]:
        with self.lock:
            self.calls.append(Call(method, path, body))
            fail, hang = self.fail.get(method), method in self.hang
        if hang:
            self._stopped.wait(self.hang_seconds)
        if fail is not None:
            return fail, {"error": "injected failure", "code": "INTERNAL_SERVER_ERROR"}
        with self.lock:
            if method == "GET" and path == "/workers":
                return 200, self._list()
            if method == "POST" and path == "/workers":
                return self._create(body, is_json)
            if method == "DELETE" and path.startswith("/workers/"):
                return self._delete(path.removeprefix("/workers/"))
        return 404, {"error": f"no route for {method} {path}", "code": "NOT_FOUND"}

    def _list(self) -> dict[str, Any]:
        workers = [_info(worker_id, spec) for worker_id, spec in self.workers.items()]
        stats = {"prefill_count": 0, "decode_count": 0, "regular_count": len(workers)}
        return {"workers": workers, "total": len(workers), "stats": stats}

    def _create(self, body: Any, is_json: bool) -> tuple[int, Any]:
        if not is_json:
            return 415, "Expected request with `Content-Type: application/json`"
        if not isinstance(body, dict) or not isinstance(body.get("url"), str):
            return 422, "Failed to deserialize the JSON body into the target type: missing field `url`"
        url = body["url"]
        if not url.startswith(_SCHEMES):
            return 400, {"error": f"Invalid value for field 'worker_url': {url}", "code": "BAD_REQUEST"}
        for table, code in (
            (self.workers, "WORKER_ALREADY_EXISTS"),
            (self.pending, "WORKER_CREATE_IN_PROGRESS"),
        ):
            for worker_id, spec in table.items():
                if spec["url"] == url:
                    return 409, {"error": f"Worker {url} exists as {worker_id}", "code": code}
        worker_id = str(uuid.uuid4())
        (self.pending if self.async_register else self.workers)[worker_id] = dict(body)
        return 202, {
            "status": "accepted",
            "worker_id": worker_id,
            "url": url,
            "location": f"/workers/{worker_id}",
            "message": "Worker addition queued for background processing",
        }

    def _delete(self, worker_id: str) -> tuple[int, Any]:
        try:
            uuid.UUID(worker_id)
        except ValueError:
            return 400, {"error": f"Invalid worker id: {worker_id}", "code": "BAD_REQUEST"}
        if self.workers.pop(worker_id, None) is None:
            return 404, {"error": f"Worker {worker_id} not found", "code": "WORKER_NOT_FOUND"}
        message = "Worker removal queued for background processing"
        return 202, {"status": "accepted", "worker_id": worker_id, "message": message}


def _info(worker_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "id": worker_id,
        "url": spec["url"],
        "worker_type": spec.get("worker_type", "regular"),
        "connection_mode": "grpc" if str(spec["url"]).startswith("grpc") else "http",
        "runtime_type": spec.get("runtime_type", "sglang"),
        "priority": 50,
        "cost": 1.0,
        "is_healthy": True,
        "status": "ready",
        "load": 0,
    }
    if spec.get("labels"):  # SMG leaves out an empty map
        info["labels"] = dict(spec["labels"])
    return info


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    router: FakeRouter

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up on a hang
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path == "/_fake/calls":
            with self.server.router.lock:
                calls = [asdict(call) for call in self.server.router.calls]
            self._send(200, calls)
        else:
            self._dispatch()

    def do_POST(self) -> None:
        router = self.server.router
        controls = {"/_fake/restart": router.restart, "/_fake/complete": router.complete_pending}
        if self.path in controls:
            self._read_body()
            controls[self.path]()
            self._send(200, {"status": "ok"})
        elif self.path == "/_fake/knobs":
            router.set_knobs(self._read_body()[0] or {})
            self._send(200, {"status": "ok"})
        else:
            self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        body, is_json = self._read_body()
        self._send(*self.server.router.handle(self.command, self.path, body, is_json))

    def _read_body(self) -> tuple[Any, bool]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        is_json = (self.headers.get("Content-Type") or "").split(";")[0].strip() == "application/json"
        if not raw:
            return None, is_json
        try:
            return json.loads(raw), is_json
        except ValueError:
            return raw.decode(errors="replace"), is_json

    def _send(self, status: int, doc: Any) -> None:
        is_text = isinstance(doc, str)
        data = doc.encode() if is_text else json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if is_text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    router = FakeRouter(args.host, args.port)
    # As PID 1 in a container SIGTERM would be ignored without a handler.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"fake SMG router listening on {router.base_url}", flush=True)
    try:
        router._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        router._stopped.set()
        router._server.server_close()


if __name__ == "__main__":
    main()
