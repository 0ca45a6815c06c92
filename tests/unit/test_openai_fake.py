"""The OpenAI-compatible test server (images/openai-fake/server.py), run as a process on this
machine: each route, each knob, and dstack's default `model` probe sent to it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import free_port, wait_until

from dstackctl.config.loader import parse_service
from dstackctl.probe_wire import execute_probe

SERVER = Path(__file__).resolve().parents[2] / "images" / "openai-fake" / "server.py"
WAIT = 20.0
HI = [{"role": "user", "content": "hi"}]


@dataclass
class Fake:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 5) -> requests.Response:
        return requests.get(self.url + path, timeout=timeout)

    def post(self, path: str, document: object, timeout: float = 5) -> requests.Response:
        return requests.post(self.url + path, json=document, timeout=timeout)

    def chat(self, **fields: Any) -> requests.Response:
        return self.post("/v1/chat/completions", {"model": "m1", "messages": HI, **fields})


def start(tmp_path: Path, *args: str, env: dict[str, str] | None = None, port: int = 0) -> Fake:
    """Start the server on 127.0.0.1 (port 0: any free port, read from its log line)."""
    log = tmp_path / f"fake-{time.monotonic_ns()}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**environ, **(env or {})},
        )
    fake = Fake(process, port, log)
    if port == 0:

        def listening() -> int | None:
            for line in log.read_text().splitlines():
                if line.startswith("openai-fake: serving "):
                    return int(line.rsplit(":", 1)[1])
            assert process.poll() is None, log.read_text()
            return None

        fake.port = wait_until(listening, timeout=WAIT, what="the fake server to listen")
    return fake


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[list[Fake]]:
    """Servers started by a test; each is killed at the end."""
    started: list[Fake] = []
    yield started
    for fake in started:
        if fake.process.poll() is None:
            fake.process.kill()
        fake.process.wait(10)


@pytest.fixture
def serve(tmp_path: Path, fakes: list[Fake]) -> Any:
    def run(*args: str, env: dict[str, str] | None = None, port: int = 0) -> Fake:
        fake = start(tmp_path, *args, env=env, port=port)
        fakes.append(fake)
        return fake

    return run


def sse_events(response: http.client.HTTPResponse) -> Iterator[tuple[float, str]]:
    """(time.monotonic() when it arrived, payload) of each `data:` event of a stream."""
    while True:
        line = response.readline()
        if not line:
            return
        text = line.decode().rstrip("\n")
        if text.startswith("data: "):
            yield time.monotonic(), text[len("data: ") :]
        else:
            assert text == "", f"unexpected line in the stream: {text!r}"


def open_stream(fake: Fake, **fields: Any) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    body = json.dumps({"model": "m1", "messages": HI, "stream": True, **fields})
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    return connection.getresponse()


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# -- routes ---------------------------------------------------------------------------------


def test_health_models_and_whoami_name_the_model_and_the_replica(serve: Any) -> None:
    fake = serve(
        "--model", "m1", env={"DSTACK_RUN_NAME": "svc", "DSTACK_REPLICA_NUM": "1", "DEPLOYMENT_TAG": "v2"}
    )

    health = fake.get("/health")
    models = fake.get("/v1/models")
    whoami = fake.get("/whoami")

    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert models.status_code == 200
    assert models.json()["object"] == "list"
    assert [(m["id"], m["object"]) for m in models.json()["data"]] == [("m1", "model")]
    assert whoami.text == "svc 1 v2\n"
    assert {health.headers["X-Fake-Replica"], models.headers["X-Fake-Replica"]} == {"svc 1 v2"}


def test_model_and_identity_come_from_the_environment_too(serve: Any) -> None:
    fake = serve(env={"MODEL": "org/env-model", "IDENTITY": "replica-x"})
    assert [m["id"] for m in fake.get("/v1/models").json()["data"]] == ["org/env-model"]
    assert fake.get("/whoami").text == "replica-x\n"


def test_a_chat_completion_answers_in_openais_shape(serve: Any) -> None:
    fake = serve("--model", "m1", "--tokens", "4", env={"IDENTITY": "r0"})

    whole = fake.chat()
    short = fake.chat(max_tokens=1)

    assert whole.status_code == 200
    document = whole.json()
    assert document["object"] == "chat.completion"
    assert document["id"].startswith("chatcmpl-")
    assert (document["model"], document["system_fingerprint"]) == ("m1", "r0")
    [choice] = document["choices"]
    assert choice["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3"}
    assert choice["finish_reason"] == "stop"
    assert document["usage"]["completion_tokens"] == 4
    assert short.json()["choices"][0]["message"]["content"] == "tok0"
    assert short.json()["choices"][0]["finish_reason"] == "length"


def test_a_legacy_completion_and_the_sglang_worker_routes_answer(serve: Any) -> None:
    fake = serve("--model", "m1", "--tokens", "2")

    completion = fake.post("/v1/completions", {"model": "m1", "prompt": "hi"})
    generate = fake.post("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 1}})

    assert completion.json()["object"] == "text_completion"
    assert completion.json()["choices"][0]["text"] == "tok0 tok1"
    assert generate.json()["text"] == "tok0"
    assert fake.get("/health_generate").status_code == 200
    assert fake.get("/get_model_info").json()["model_path"] == "m1"
    assert fake.get("/get_server_info").json()["served_model_name"] == "m1"
    assert fake.get("/get_load").json()["load"] == 0
    assert fake.post("/flush_cache", {}).status_code == 200


def test_a_wrong_model_a_bad_body_an_unknown_route_and_a_wrong_method_are_refused(serve: Any) -> None:
    fake = serve("--model", "m1")

    wrong = fake.post("/v1/chat/completions", {"model": "m2", "messages": HI})
    not_json = requests.post(fake.url + "/v1/chat/completions", data=b"{", timeout=5)
    no_messages = fake.post("/v1/chat/completions", {"model": "m1"})

    assert wrong.status_code == 404
    assert wrong.json()["error"]["message"] == "The model `m2` does not exist."
    assert (not_json.status_code, no_messages.status_code) == (400, 400)
    assert fake.get("/nowhere").status_code == 404
    assert fake.get("/v1/chat/completions").status_code == 405


def test_a_stream_is_sse_chunks_in_openais_shape_ending_with_done(serve: Any) -> None:
    fake = serve("--model", "m1", "--tokens", "3", env={"IDENTITY": "r0"})

    response = open_stream(fake, stream_options={"include_usage": True})
    payloads = [payload for _, payload in sse_events(response)]

    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert {c["system_fingerprint"] for c in chunks} == {"r0"}
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == "tok0 tok1 tok2"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert (chunks[-1]["choices"], chunks[-1]["usage"]["completion_tokens"]) == ([], 3)


# -- knobs ----------------------------------------------------------------------------------


def test_token_delay_spaces_the_streamed_tokens(serve: Any) -> None:
    fake = serve("--model", "m1", env={"TOKENS": "6", "TOKEN_DELAY": "0.3"})

    events = list(sse_events(open_stream(fake)))

    tokens = [
        (t, json.loads(p)) for t, p in events[:-1] if json.loads(p)["choices"][0]["delta"].get("content")
    ]
    assert len(tokens) == 6
    spread = tokens[-1][0] - tokens[0][0]
    assert spread >= 1.2, f"6 tokens 0.3 s apart arrived within {spread:.2f}s"


def test_start_delay_keeps_the_port_closed_until_it_passes(serve: Any) -> None:
    port = free_port()
    launched = time.monotonic()
    serve("--model", "m1", env={"START_DELAY": "1.5"}, port=port)

    assert refuses(port)

    def healthy() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(healthy, timeout=WAIT, what="the delayed server to answer")
    assert time.monotonic() - launched >= 1.5


def test_fail_health_answers_503_and_fail_chat_500(serve: Any) -> None:
    health_fails = serve("--model", "m1", "--fail-health")
    chat_fails = serve("--model", "m1", env={"FAIL_CHAT": "1"})

    assert health_fails.get("/health").status_code == 503
    assert health_fails.get("/health_generate").status_code == 503
    assert health_fails.chat().status_code == 200
    assert chat_fails.get("/health").status_code == 200
    assert chat_fails.chat().status_code == 500


def test_hang_accepts_and_never_answers_until_switched_off(serve: Any) -> None:
    fake = serve("--model", "m1", env={"HANG": "1"})

    with pytest.raises(requests.ReadTimeout):
        fake.get("/health", timeout=1)
    with pytest.raises(requests.ReadTimeout):
        fake.post("/v1/chat/completions", {"model": "m1", "messages": HI}, timeout=1)
    knobs = fake.post("/fake/knobs", {"HANG": False})

    assert knobs.status_code == 200
    assert knobs.json()["HANG"] is False
    assert fake.get("/health").status_code == 200
    assert fake.post("/fake/knobs", {"NOPE": 1}).status_code == 400


def test_die_after_exits_1_right_after_the_nth_answer(serve: Any) -> None:
    fake = serve("--model", "m1", env={"DIE_AFTER": "3"})

    answers = [fake.get("/health").status_code for _ in range(3)]

    assert answers == [200, 200, 200]
    assert fake.process.wait(WAIT) == 1
    assert "DIE_AFTER=3 reached" in fake.log.read_text()


def test_sigterm_lets_a_stream_in_flight_finish_then_exits_0(serve: Any) -> None:
    fake = serve("--model", "m1", "--tokens", "8", "--token-delay", "0.2")

    response = open_stream(fake)
    events = sse_events(response)
    first = next(events)
    fake.process.send_signal(signal.SIGTERM)
    rest = [payload for _, payload in events]

    assert json.loads(first[1])["choices"][0]["delta"]["role"] == "assistant"
    assert rest[-1] == "[DONE]"
    assert len(rest) == 8 + 2  # the tokens, the finish chunk, [DONE]
    assert fake.process.wait(WAIT) == 0
    assert refuses(fake.port)


def test_sigterm_with_no_grace_breaks_the_stream_in_flight(serve: Any) -> None:
    fake = serve("--model", "m1", "--tokens", "50", "--token-delay", "0.2", env={"TERM_GRACE": "0"})

    response = open_stream(fake)
    events = sse_events(response)
    next(events)
    fake.process.send_signal(signal.SIGTERM)
    assert fake.process.wait(WAIT) == 0
    try:
        rest = [payload for _, payload in events]
    except (http.client.HTTPException, OSError):
        rest = []

    assert "[DONE]" not in rest


# -- dstack's default probe for `model:` ----------------------------------------------------


def default_model_probe(name: str) -> Any:
    loaded = parse_service(f"type: service\nimage: x\ncommands: [x]\nport: 8000\nmodel: {name}\n")
    [probe] = loaded.config.effective_probes()
    return probe


def test_the_default_model_probe_is_a_one_token_chat_completion() -> None:
    probe = default_model_probe("org/m1")

    assert (probe.method, probe.url, probe.timeout) == ("post", "/v1/chat/completions", 30)
    assert [(h.name, h.value) for h in probe.headers] == [("Content-Type", "application/json")]
    assert json.loads(probe.body) == {"model": "org/m1", "messages": HI, "max_tokens": 1}


def test_the_default_model_probe_passes_on_the_served_model_only(serve: Any) -> None:
    probe = default_model_probe("org/m1")
    right = serve("--model", "org/m1", "--fail-health")
    wrong = serve("--model", "org/other")

    passed = execute_probe("127.0.0.1", right.port, probe)
    failed = execute_probe("127.0.0.1", wrong.port, probe)

    assert (passed.ok, passed.status) == (True, 200)  # /health fails there: not what it asks
    assert (failed.ok, failed.status) == (False, 404)
    wait_until(
        lambda: '"POST /v1/chat/completions HTTP/1.1" 200' in right.log.read_text(),
        timeout=WAIT,
        what="the server to log the probe",
    )
