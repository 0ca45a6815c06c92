#!/usr/bin/env python3
"""A small OpenAI-compatible server for dstackctl's tests (standard library only).

It stands in for vLLM / SGLang in test replicas: bind-mount this folder into a container
(`volumes: ["/abs/path/images/openai-fake:/opt/fake"]`) and run
`python3 /opt/fake/server.py --port 8000 --model NAME`.

Routes (a table, ROUTES, at the bottom: add one there):
  GET  /health                 200 {"status": "ok"} (503 with FAIL_HEALTH)
  GET  /v1/models              the one model, in OpenAI's list shape
  POST /v1/chat/completions    chat.completion JSON, or with "stream": true an SSE stream of
                               chat.completion.chunk events ending with `data: [DONE]`
  POST /v1/completions         the same for the legacy text completion API
  GET  /whoami                 the replica identity as text (see IDENTITY below)
  GET  /fake/knobs             the knobs now, as JSON; POST /fake/knobs {"KNOB": value, ...}
                               changes them while the server runs (HANG, FAIL_HEALTH, ...)
  What an SGLang router (smg) asks its workers: GET /health_generate, /get_model_info,
  /get_server_info, /get_load; POST /flush_cache, /generate (a minimal native answer).

Knobs: each is an environment variable and a CLI flag (the flag wins):
  PORT / --port N              port to listen on (default 8000); HOST / --host (0.0.0.0)
  MODEL / --model NAME         the model served (default fake-model); a request naming another
                               model gets 404 with an OpenAI error, as vLLM answers
  START_DELAY / --start-delay S  seconds to wait before listening (a model that loads slowly)
  FAIL_HEALTH / --fail-health  /health (and /health_generate) answer 503
  FAIL_CHAT / --fail-chat      completions answer 500
  HANG / --hang                accept connections and read requests but never answer
  DIE_AFTER / --die-after N    exit with status 1 right after answering the N-th request
                               (every request counts, probes too)
  TOKEN_DELAY / --token-delay S  seconds between streamed tokens (default 0)
  TOKENS / --tokens N          tokens per answer (default 8), fewer when the request's
                               max_tokens / max_completion_tokens is smaller
  TERM_GRACE / --term-grace S  on SIGTERM stop listening, let answers in flight finish for at
                               most S seconds (default 30; 0: exit at once), then exit 0
  IDENTITY                     who answers, default "$DSTACK_RUN_NAME $DSTACK_REPLICA_NUM
                               $DEPLOYMENT_TAG" (those set; "openai-fake" if none); sent as
                               the X-Fake-Replica header, as `system_fingerprint` in every
                               completion and chunk, and by /whoami

Token i of an answer is `tok<i>` followed by a space (the last one without it), so a
client can check that a stream arrived whole: n tokens, in order.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BOOLEAN_KNOBS = ("FAIL_HEALTH", "FAIL_CHAT", "HANG")


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("", "0", "false", "no", "off")


class Knobs:
    """The server's settings; a lock guards changes made through POST /fake/knobs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.lock = threading.Lock()
        self.model: str = args.model
        self.fail_health: bool = args.fail_health
        self.fail_chat: bool = args.fail_chat
        self.hang: bool = args.hang
        self.die_after: int = args.die_after
        self.token_delay: float = args.token_delay
        self.tokens: int = args.tokens
        parts = (
            os.environ.get(name, "") for name in ("DSTACK_RUN_NAME", "DSTACK_REPLICA_NUM", "DEPLOYMENT_TAG")
        )
        self.identity: str = os.environ.get("IDENTITY") or " ".join(p for p in parts if p) or "openai-fake"
        self.answered = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "MODEL": self.model,
            "FAIL_HEALTH": self.fail_health,
            "FAIL_CHAT": self.fail_chat,
            "HANG": self.hang,
            "DIE_AFTER": self.die_after,
            "TOKEN_DELAY": self.token_delay,
            "TOKENS": self.tokens,
            "IDENTITY": self.identity,
            "ANSWERED": self.answered,
        }

    def update(self, changes: dict[str, Any]) -> None:
        setters: dict[str, Callable[[Any], None]] = {
            "MODEL": lambda v: setattr(self, "model", str(v)),
            "FAIL_HEALTH": lambda v: setattr(self, "fail_health", _truthy(v)),
            "FAIL_CHAT": lambda v: setattr(self, "fail_chat", _truthy(v)),
            "HANG": lambda v: setattr(self, "hang", _truthy(v)),
            "DIE_AFTER": lambda v: setattr(self, "die_after", int(v)),
            "TOKEN_DELAY": lambda v: setattr(self, "token_delay", float(v)),
            "TOKENS": lambda v: setattr(self, "tokens", int(v)),
            "IDENTITY": lambda v: setattr(self, "identity", str(v)),
        }
        unknown = sorted(set(changes) - set(setters))
        if unknown:
            raise ValueError(f"unknown knobs: {', '.join(unknown)}")
        with self.lock:
            for name, value in changes.items():
                setters[name](value)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], knobs: Knobs) -> None:
        super().__init__(address, Handler)
        self.knobs = knobs
        self.inflight = 0
        self.inflight_lock = threading.Condition()
        self.stopping = False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"openai-fake: {self.address_string()} {format % args}\n")

    # -- dispatch -----------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("GET")

    def _dispatch(self, method: str) -> None:
        knobs = self.server.knobs
        with self.server.inflight_lock:
            self.server.inflight += 1
        try:
            path = self.path.split("?", 1)[0]
            body = self._read_body()
            if knobs.hang and path != "/fake/knobs":
                self.close_connection = True
                threading.Event().wait()  # accepted and read, never answered
            route = ROUTES.get((method, path))
            if route is None:
                allowed = [m for (m, p) in ROUTES if p == path]
                if allowed:
                    self._json(405, _error(f"use {' or '.join(allowed)} for {path}", "invalid_request_error"))
                else:
                    self._json(404, _error(f"no route {method} {path}", "invalid_request_error"))
            else:
                route(self, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with self.server.inflight_lock:
                self.server.inflight -= 1
                self.server.inflight_lock.notify_all()
            self._count_and_maybe_die()

    def _count_and_maybe_die(self) -> None:
        knobs = self.server.knobs
        with knobs.lock:
            knobs.answered += 1
            die = knobs.die_after > 0 and knobs.answered >= knobs.die_after
        if die:
            sys.stderr.write(f"openai-fake: DIE_AFTER={knobs.die_after} reached, exiting with 1\n")
            sys.stderr.flush()
            os._exit(1)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # -- answers ------------------------------------------------------------------------

    def _headers(self, status: int, content_type: str, length: int | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("X-Fake-Replica", self.server.knobs.identity)
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
        else:
            self.send_header("Content-Length", str(length))
        if self.server.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def _json(self, status: int, document: object) -> None:
        data = json.dumps(document).encode()
        self._headers(status, "application/json", len(data))
        if self.command != "HEAD":
            self.wfile.write(data)

    def _text(self, status: int, text: str) -> None:
        data = text.encode()
        self._headers(status, "text/plain; charset=utf-8", len(data))
        if self.command != "HEAD":
            self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _sse(self, events: Any) -> None:
        """Send `events` (dicts, or the string "[DONE]") as server-sent events, chunked."""
        self._headers(200, "text/event-stream", None)
        for event in events:
            payload = event if isinstance(event, str) else json.dumps(event)
            self._chunk(f"data: {payload}\n\n".encode())
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _request_json(self, body: bytes) -> dict[str, Any] | None:
        """The body as a JSON object, or None after answering 400."""
        try:
            document = json.loads(body or b"null")
        except ValueError as exc:
            self._json(400, _error(f"the body is not JSON: {exc}", "invalid_request_error"))
            return None
        if not isinstance(document, dict):
            self._json(400, _error("the body must be a JSON object", "invalid_request_error"))
            return None
        return document

    def _model_checked(self, request: dict[str, Any]) -> bool:
        """False after answering 404 when the request names a model this server does not serve."""
        knobs = self.server.knobs
        model = request.get("model", knobs.model)
        if model != knobs.model:
            message = f"The model `{model}` does not exist."
            self._json(404, _error(message, "NotFoundError", param="model", code=404))
            return False
        return True

    def _token_count(self, request: dict[str, Any]) -> int:
        count = self.server.knobs.tokens
        for key in ("max_tokens", "max_completion_tokens", "max_new_tokens"):
            limit = request.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
                count = min(count, limit)
        return count

    # -- routes -------------------------------------------------------------------------

    def health(self, _body: bytes) -> None:
        if self.server.knobs.fail_health:
            self._json(503, {"status": "failing", "why": "FAIL_HEALTH is set"})
        else:
            self._json(200, {"status": "ok"})

    def whoami(self, _body: bytes) -> None:
        self._text(200, self.server.knobs.identity + "\n")

    def models(self, _body: bytes) -> None:
        knobs = self.server.knobs
        entry = {"id": knobs.model, "object": "model", "created": STARTED, "owned_by": "openai-fake"}
        self._json(200, {"object": "list", "data": [entry]})

    def chat_completions(self, body: bytes) -> None:
        self._completions(body, chat=True)

    def text_completions(self, body: bytes) -> None:
        self._completions(body, chat=False)

    def _completions(self, body: bytes, chat: bool) -> None:
        knobs = self.server.knobs
        request = self._request_json(body)
        if request is None or not self._model_checked(request):
            return
        if chat and not isinstance(request.get("messages"), list):
            self._json(400, _error("`messages` must be a list", "invalid_request_error", param="messages"))
            return
        if knobs.fail_chat:
            self._json(500, _error("FAIL_CHAT is set", "internal_server_error", code=500))
            return
        count = self._token_count(request)
        tokens = [f"tok{i}" + (" " if i < count - 1 else "") for i in range(count)]
        prompt = request.get("messages") if chat else request.get("prompt")
        usage = {
            "prompt_tokens": len(json.dumps(prompt).split()),
            "completion_tokens": count,
            "total_tokens": len(json.dumps(prompt).split()) + count,
        }
        finish = "length" if count < knobs.tokens else "stop"
        base = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "created": int(time.time()),
            "model": knobs.model,
            "system_fingerprint": knobs.identity,
        }
        if request.get("stream"):
            options = request.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            self._sse(self._stream_events(base, tokens, finish, usage if include_usage else None, chat))
            return
        text = "".join(tokens)
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion" if chat else "text_completion"
        self._json(200, {**base, "object": kind, "choices": [choice], "usage": usage})

    def _stream_events(
        self, base: dict[str, Any], tokens: list[str], finish: str, usage: dict[str, int] | None, chat: bool
    ) -> Any:
        knobs = self.server.knobs
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(piece: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
            choice = {"index": 0, **piece, "logprobs": None, "finish_reason": finish_reason}
            return {**base, "object": kind, "choices": [choice]}

        if chat:
            yield event({"delta": {"role": "assistant", "content": ""}}, None)
        for index, token in enumerate(tokens):
            if index and knobs.token_delay > 0:
                time.sleep(knobs.token_delay)
            yield event({"delta": {"content": token}} if chat else {"text": token}, None)
        yield event({"delta": {}} if chat else {"text": ""}, finish)
        if usage is not None:
            yield {**base, "object": kind, "choices": [], "usage": usage}
        yield "[DONE]"

    def knobs_get(self, _body: bytes) -> None:
        self._json(200, self.server.knobs.as_dict())

    def knobs_post(self, body: bytes) -> None:
        request = self._request_json(body)
        if request is None:
            return
        try:
            self.server.knobs.update(request)
        except ValueError as exc:
            self._json(400, _error(str(exc), "invalid_request_error"))
            return
        self._json(200, self.server.knobs.as_dict())

    # What an SGLang router (smg) asks its workers.

    def health_generate(self, body: bytes) -> None:
        self.health(body)

    def model_info(self, _body: bytes) -> None:
        knobs = self.server.knobs
        self._json(
            200,
            {
                "model_path": knobs.model,
                "tokenizer_path": knobs.model,
                "is_generation": True,
                "model_type": "fake",
                "architectures": ["FakeForCausalLM"],
            },
        )

    def server_info(self, _body: bytes) -> None:
        knobs = self.server.knobs
        self._json(
            200,
            {
                "model_path": knobs.model,
                "served_model_name": knobs.model,
                "tokenizer_path": knobs.model,
                "port": self.server.server_address[1],
                "version": "openai-fake",
            },
        )

    def load(self, _body: bytes) -> None:
        with self.server.inflight_lock:
            running = self.server.inflight - 1  # not this request
        self._json(200, {"load": running, "num_reqs": running, "num_waiting_reqs": 0})

    def flush_cache(self, _body: bytes) -> None:
        self._text(200, "Cache flushed.\n")

    def generate(self, body: bytes) -> None:
        request = self._request_json(body)
        if request is None:
            return
        params = request.get("sampling_params") or {}
        count = self._token_count(params if isinstance(params, dict) else {})
        text = "".join(f"tok{i}" + (" " if i < count - 1 else "") for i in range(count))
        meta = {"id": uuid.uuid4().hex, "finish_reason": {"type": "stop"}, "completion_tokens": count}
        self._json(200, {"text": text, "meta_info": meta})


def _error(message: str, kind: str, param: str | None = None, code: int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


ROUTES: dict[tuple[str, str], Callable[[Handler, bytes], None]] = {
    ("GET", "/health"): Handler.health,
    ("GET", "/whoami"): Handler.whoami,
    ("GET", "/v1/models"): Handler.models,
    ("POST", "/v1/chat/completions"): Handler.chat_completions,
    ("POST", "/v1/completions"): Handler.text_completions,
    ("GET", "/fake/knobs"): Handler.knobs_get,
    ("POST", "/fake/knobs"): Handler.knobs_post,
    ("GET", "/health_generate"): Handler.health_generate,
    ("GET", "/get_model_info"): Handler.model_info,
    ("GET", "/get_server_info"): Handler.server_info,
    ("GET", "/get_load"): Handler.load,
    ("POST", "/flush_cache"): Handler.flush_cache,
    ("POST", "/generate"): Handler.generate,
}

STARTED = int(time.time())


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description="A small OpenAI-compatible server for tests.")
    parser.add_argument("--host", default=env.get("HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(env.get("PORT", "8000")))
    parser.add_argument("--model", default=env.get("MODEL", "fake-model"))
    parser.add_argument("--start-delay", type=float, default=float(env.get("START_DELAY", "0")))
    for knob in BOOLEAN_KNOBS:
        flag = "--" + knob.lower().replace("_", "-")
        parser.add_argument(flag, action="store_true", default=_truthy(env.get(knob, "")))
    parser.add_argument("--die-after", type=int, default=int(env.get("DIE_AFTER", "0")))
    parser.add_argument("--token-delay", type=float, default=float(env.get("TOKEN_DELAY", "0")))
    parser.add_argument("--tokens", type=int, default=int(env.get("TOKENS", "8")))
    parser.add_argument("--term-grace", type=float, default=float(env.get("TERM_GRACE", "30")))
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.start_delay > 0:
        sys.stderr.write(f"openai-fake: START_DELAY: listening in {args.start_delay:g}s\n")
        if stop.wait(args.start_delay):
            return 0
    server = Server((args.host, args.port), Knobs(args))
    threading.Thread(target=server.serve_forever, name="serve", daemon=True).start()
    sys.stderr.write(f"openai-fake: serving {args.model} on {args.host}:{server.server_address[1]}\n")
    sys.stderr.flush()
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    server.stopping = True
    server.shutdown()  # no new connections; requests in flight go on
    server.server_close()
    deadline = time.monotonic() + args.term_grace
    with server.inflight_lock:
        while server.inflight > 0 and (remaining := deadline - time.monotonic()) > 0:
            server.inflight_lock.wait(remaining)
        left = server.inflight
    sys.stderr.write(f"openai-fake: stopped ({left} requests still in flight)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
