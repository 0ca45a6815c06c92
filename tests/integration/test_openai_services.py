"""OpenAI-compatible services on the real engine: images/openai-fake/server.py stands in for
vLLM in replicas of dstack's base image (here dstackctl-python:latest, through
DSTACK_DOCKER_BASE_IMAGE), bind-mounted at /opt/fake.

Covered: dstack's default probe for `model:` end to end, the seed example's shape
(`python`, `commands`, `model`, `probes`, `replicas: 2`), a token stream through the
endpoint, and a redeploy under streaming load that breaks no stream. Each answer carries the
replica's identity ("$DSTACK_RUN_NAME $DSTACK_REPLICA_NUM $DEPLOYMENT_TAG") as
`system_fingerprint`, so a test can tell which replica of which deployment served it.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker.errors
import pytest
import requests
from helpers import cli, free_port, ps_run, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow]

PYTHON_IMAGE = "dstackctl-python:latest"
FAKE_DIR = Path(__file__).resolve().parents[2] / "images" / "openai-fake"
SERVE = "python3 /opt/fake/server.py --port 8000"
MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
WAIT = 60.0  # generous: a loaded 2-core machine, containers starting Python
HEALTH = "probes:\n  - type: http\n    url: /health\n    interval: 1s\n"


@pytest.fixture
def python_image(docker_client: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """dstackctl-python:latest as dstack's base image for replicas without `image`."""
    try:
        docker_client.images.get(PYTHON_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{PYTHON_IMAGE} is missing: run scripts/build-base-image.sh", pytrace=False)
    monkeypatch.setenv("DSTACK_DOCKER_BASE_IMAGE", PYTHON_IMAGE)
    return PYTHON_IMAGE


def write_openai_service(
    directory: Path,
    name: str,
    commands: list[str],
    *,
    replicas: int = 1,
    env: list[str] | None = None,
    model: str | None = None,
    extra: str = "",
) -> Path:
    """A service without `image` (so on the base image) with images/openai-fake at /opt/fake,
    container port 8000 behind a free local endpoint port."""
    lines = [
        "type: service",
        f"name: {name}",
        f'port: "{free_port()}:8000"',
        f"replicas: {replicas}",
        f"volumes: {json.dumps([f'{FAKE_DIR}:/opt/fake:ro'])}",
        f"commands: {json.dumps(commands)}",
    ]
    if env:
        lines.append(f"env: {json.dumps(env)}")
    if model:
        lines.append(f"model: {json.dumps(model)}")
    path = directory / f"{name}.dstack.yml"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def replica_row(capsys: pytest.CaptureFixture[str], name: str, num: int = 0) -> dict[str, Any]:
    rows = [r for r in ps_run(capsys, name)["replicas"] if r["replica_num"] == num]
    return dict(rows[-1]) if rows else {}


def chat(url: str, model: str, **fields: Any) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    return requests.post(url + "/v1/chat/completions", json=body, timeout=10)


@dataclass
class Stream:
    """One streamed chat completion as a client saw it."""

    started: float  # time.monotonic() when the request was sent
    status: int | None = None
    token_times: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    identities: set[str] = field(default_factory=set)
    done: bool = False
    error: str | None = None

    def broken(self, expected_tokens: int) -> bool:
        whole = [f"tok{i}" + (" " if i < expected_tokens - 1 else "") for i in range(expected_tokens)]
        return (
            self.status != 200
            or self.error is not None
            or not self.done
            or self.tokens != whole
            or len(self.identities) != 1
        )

    @property
    def identity(self) -> str:
        return next(iter(self.identities), "")


def stream_chat(connection: http.client.HTTPConnection, model: str) -> Stream:
    """Send one `stream: true` chat completion on `connection` and read it to its end."""
    stream = Stream(time.monotonic())
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    try:
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        stream.status = response.status
        if response.status != 200:
            stream.error = response.read().decode(errors="replace")[:200]
            return stream
        for line in iter(response.readline, b""):
            text = line.decode().rstrip("\n")
            if not text.startswith("data: "):
                continue
            payload = text[len("data: ") :]
            if payload == "[DONE]":
                stream.done = True
                continue
            chunk = json.loads(payload)
            stream.identities.add(chunk["system_fingerprint"])
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if content:
                stream.token_times.append(time.monotonic())
                stream.tokens.append(content)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
        connection.close()
    return stream


def endpoint_connection(url: str, timeout: float = 30) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


class StreamingLoad:
    """`clients` threads, each streaming chat completions one after another over its own
    keep-alive connection to the endpoint (a new connection after a failure)."""

    def __init__(self, url: str, model: str, clients: int) -> None:
        self.url, self.model = url, model
        self.streams: list[Stream] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, name=f"streamer-{i}", daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> StreamingLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self) -> None:
        connection = endpoint_connection(self.url)
        while not self._stop.is_set():
            self.streams.append(stream_chat(connection, self.model))
        connection.close()

    def started_between(self, start: float, end: float = float("inf")) -> list[Stream]:
        return [s for s in list(self.streams) if start <= s.started < end]


# -- (a) dstack's default probe for `model:` ------------------------------------------------


def test_a_model_service_without_probes_is_ready_only_once_the_chat_probe_is_answered(
    dstack_home: Path, tmp_path: Path, python_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens for 5 s (a model loading); /health fails all along, which must not
    # matter: the default probe asks for a one-token chat completion, nothing else.
    path = write_openai_service(
        tmp_path,
        "chatty",
        [f"{SERVE} --model {MODEL}"],
        env=["START_DELAY=5", "FAIL_HEALTH=1"],
        model=MODEL,
    )
    launched = time.monotonic()
    assert cli(capsys, "run", "--no-wait", path).code == 0

    def failed_before_listening() -> dict[str, Any] | None:
        row = replica_row(capsys, "chatty")
        probes = row.get("probes") or []
        return row if probes and probes[0]["last_checked_at"] and probes[0]["last_status"] is None else None

    early = wait_until(failed_before_listening, timeout=WAIT, what="chatty's first probe, before it listens")
    [probe] = early["probes"]
    assert probe["url"] == "/v1/chat/completions"
    assert (early["ready"], probe["symbol"]) == (False, "×"), early

    # The default probe's interval is dstack's 15 s: the next one finds the server up.
    ready = wait_until(
        lambda: (row := replica_row(capsys, "chatty")) and row["ready"] and row,
        timeout=WAIT,
        what="chatty to become ready",
        interval=0.5,
    )
    assert (ready["probes"][0]["symbol"], ready["probes"][0]["last_status"]) == ("✓", 200)
    with capsys.disabled():
        print(f"\nchatty: ready {time.monotonic() - launched:.1f}s after `run` (START_DELAY=5)")
    logs = cli(capsys, "logs", "chatty")
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in logs.out, logs.out
    assert "/health" not in logs.out, "something asked /health"
    url = ps_run(capsys, "chatty")["url"]
    assert [m["id"] for m in requests.get(url + "/v1/models", timeout=10).json()["data"]] == [MODEL]
    assert requests.get(url + "/health", timeout=10).status_code == 503


def test_a_model_service_whose_server_serves_another_model_never_gets_ready(
    dstack_home: Path, tmp_path: Path, python_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_openai_service(tmp_path, "mismatch", [f"{SERVE} --model org/other"], model=MODEL)

    result = cli(capsys, "run", "-d", "--timeout", "25s", path)

    assert result.code == 3, (result.out, result.err)
    row = replica_row(capsys, "mismatch")
    assert row["status"] == "running"
    assert row["ready"] is False
    [probe] = row["probes"]
    assert (probe["url"], probe["last_status"], probe["symbol"]) == ("/v1/chat/completions", 404, "×"), probe
    url = ps_run(capsys, "mismatch")["url"]
    assert requests.get(url + "/v1/models", timeout=10).status_code == 503  # no ready replica


# -- (b) the seed example's shape -----------------------------------------------------------


def test_the_seed_example_shape_runs_with_the_fake_server_in_place_of_vllm(
    dstack_home: Path,
    tmp_path: Path,
    python_image: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # reference/seed-service-probes.txt, with the fake server for `vllm serve`, a check that
    # the `python:` venv is active for `uv pip install vllm`, the image's Python (3.11), a
    # 2 s probe interval (15 s in the seed) and no GPU.
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    path = tmp_path / "llama31.dstack.yml"
    path.write_text(
        f"""type: service
name: llama31

python: "3.11"
env:
  - HF_TOKEN
commands:
  - python -c "import sys; assert sys.prefix == '/dstack/venv', sys.prefix"
  - |
    python /opt/fake/server.py --model {MODEL} \\
      --port 8000 --tokens $DSTACK_GPUS_NUM
port: "{free_port()}:8000"
model: {MODEL}

probes:
  - type: http
    url: /health
    interval: 2s

replicas: 2

volumes:
  - {FAKE_DIR}:/opt/fake:ro
""",
        encoding="utf-8",
    )

    result = cli(capsys, "run", "-d", "--timeout", "150s", path)

    assert result.code == 0, (result.out, result.err)
    shown = ps_run(capsys, "llama31")
    assert [(r["replica_num"], r["ready"]) for r in shown["replicas"]] == [(0, True), (1, True)]
    assert [[p["url"] for p in r["probes"]] for r in shown["replicas"]] == [["/health"], ["/health"]]
    url = shown["url"]
    models = requests.get(url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    seen: set[str] = set()

    def both_answered() -> bool:
        response = chat(url, MODEL, max_tokens=1)
        assert response.status_code == 200, response.text
        seen.add(response.json()["system_fingerprint"])
        return seen == {"llama31 0", "llama31 1"}

    wait_until(both_answered, timeout=WAIT, what="answers from both replicas")
    # --tokens $DSTACK_GPUS_NUM: no GPU here, so 0 tokens, and the shell expanded it.
    assert chat(url, MODEL).json()["usage"]["completion_tokens"] == 0


# -- (c) a token stream through the endpoint ------------------------------------------------


def test_a_streamed_chat_completion_arrives_token_by_token_through_the_endpoint(
    dstack_home: Path, tmp_path: Path, python_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_openai_service(
        tmp_path,
        "tokens",
        [f"{SERVE} --model {MODEL}"],
        env=["TOKENS=12", "TOKEN_DELAY=0.25"],
        model=MODEL,
        extra=HEALTH,
    )
    assert cli(capsys, "run", "-d", "--timeout", "90s", path).code == 0
    url = ps_run(capsys, "tokens")["url"]

    connection = endpoint_connection(url)
    try:
        stream = stream_chat(connection, MODEL)
    finally:
        connection.close()

    assert not stream.broken(12), stream
    assert stream.identities == {"tokens 0"}
    first, last = stream.token_times[0] - stream.started, stream.token_times[-1] - stream.started
    with capsys.disabled():
        print(f"\nstream through the endpoint: first token at {first:.3f}s, last at {last:.3f}s")
    # 11 gaps of 0.25 s between the first token and the last: a buffered stream would
    # deliver them together.
    assert last - first >= 2.0, f"first token at {first:.3f}s, last at {last:.3f}s"
    assert first < 1.0, f"the first token took {first:.3f}s"


# -- (d) a redeploy under streaming load ----------------------------------------------------


def test_a_redeploy_under_streaming_load_breaks_no_stream_and_ends_on_the_new_deployment(
    dstack_home: Path, tmp_path: Path, python_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = 10
    v1 = write_openai_service(
        tmp_path,
        "rolling",
        [f"{SERVE} --model {MODEL}"],
        replicas=2,
        # TERM_GRACE=0: a replica dies at SIGTERM, so a stream still running on an old
        # replica when it is stopped breaks; only the endpoint's drain can prevent that.
        env=["DEPLOYMENT_TAG=v1", f"TOKENS={tokens}", "TOKEN_DELAY=0.05", "TERM_GRACE=0"],
        model=MODEL,
        extra=HEALTH,
    )
    v2 = v1.with_name("rolling-v2.dstack.yml")
    v2.write_text(v1.read_text().replace("DEPLOYMENT_TAG=v1", "DEPLOYMENT_TAG=v2"))
    assert cli(capsys, "run", "-d", "--timeout", "90s", v1).code == 0
    url = ps_run(capsys, "rolling")["url"]

    with StreamingLoad(url, MODEL, clients=4) as load:
        wait_until(lambda: len(load.streams) >= 20, timeout=WAIT, what="20 streams before the redeploy")
        redeploy_started = time.monotonic()
        result = cli(capsys, "redeploy", "rolling", "-f", v2, "--timeout", "120s")
        redeploy_done = time.monotonic()
        wait_until(
            lambda: len(load.started_between(redeploy_done)) >= 20,
            timeout=WAIT,
            what="20 streams after the redeploy",
        )

    assert result.code == 0, (result.out, result.err)
    assert "rolling now runs deployment 1 (2 replicas)" in result.out
    streams = load.streams
    broken = [s for s in streams if s.broken(tokens)]
    before = load.started_between(0, redeploy_started)
    during = load.started_between(redeploy_started, redeploy_done)
    after = load.started_between(redeploy_done)
    with capsys.disabled():
        print(
            f"\nstreams: {len(streams)} in all, {len(before)} before the redeploy, {len(during)} during it "
            f"({redeploy_done - redeploy_started:.1f}s), {len(after)} after; {len(broken)} broken"
        )
    assert broken == [], f"{len(broken)} of {len(streams)} streams broke, the first: {broken[0]}"
    assert len(during) >= 20, f"only {len(during)} streams while the redeploy ran"
    assert {s.identity for s in before} == {"rolling 0 v1", "rolling 1 v1"}
    assert {s.identity for s in during} & {"rolling 0 v1", "rolling 1 v1"}, "no old replica served"
    assert {s.identity for s in during} & {"rolling 0 v2", "rolling 1 v2"}, "no new replica served"
    assert {s.identity for s in after} == {"rolling 0 v2", "rolling 1 v2"}
    shown = ps_run(capsys, "rolling")
    assert shown["deployment_num"] == 1
    assert [(r["replica_num"], r["deployment_num"], r["ready"]) for r in shown["replicas"]] == [
        (0, 1, True),
        (1, 1, True),
    ]
