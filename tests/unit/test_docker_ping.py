"""`run`'s engine check without docker-py: one `GET /_ping` over the local socket, worded as
docker.py words an engine it cannot reach; other engines are left to docker-py."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstackctl.docker_address import DockerError
from dstackctl.docker_ping import ping_local_engine


@pytest.fixture
def engine_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No docker CLI config (so no context), DOCKER_HOST set by each test."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    return tmp_path


@contextlib.contextmanager
def _serve(path: Path, answer: bytes | None) -> Iterator[list[bytes]]:
    """A unix-socket server that answers each request with `answer` (None: never answers)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    requests: list[bytes] = []
    held: list[socket.socket] = []

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            requests.append(conn.recv(4096))
            if answer is None:
                held.append(conn)
                continue
            conn.sendall(answer)
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    try:
        yield requests
    finally:
        server.close()
        for conn in held:
            conn.close()


@pytest.fixture
def healthy(engine_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    path = engine_env / "docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    with _serve(path, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK") as requests:
        yield requests


def test_a_local_engine_that_answers(healthy: list[bytes]) -> None:
    assert ping_local_engine() is True
    assert healthy[0].startswith(b"GET /_ping HTTP/1.0\r\n")


def test_a_missing_socket_is_docker_not_running(engine_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{engine_env / 'gone.sock'}")
    with pytest.raises(
        DockerError, match=r"^Docker is not running \(cannot reach unix://.*gone\.sock\); start it"
    ):
        ping_local_engine()


def test_a_socket_nobody_listens_on_is_docker_not_running(
    engine_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = engine_env / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens: what a dockerd that died leaves
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    with pytest.raises(DockerError, match="Docker is not running"):
        ping_local_engine()


def test_permission_denied_says_how_to_get_access(
    healthy: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root (these tests' user) passes any file mode, so the kernel's refusal is simulated.
    def refuse(self: socket.socket, address: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(DockerError, match="permission denied on the Docker socket; add your user"):
        ping_local_engine()


def test_an_engine_that_answers_an_error(engine_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = engine_env / "docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    answered = re.escape("its ping answered 'HTTP/1.1 500 Internal Server Error'")
    with (
        _serve(path, b"HTTP/1.1 500 Internal Server Error\r\n\r\n"),
        pytest.raises(DockerError, match=answered),
    ):
        ping_local_engine()


def test_an_engine_that_never_answers_times_out(engine_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = engine_env / "docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    timed_out = r"cannot talk to Docker at unix://.*: timed out"
    with _serve(path, None), pytest.raises(DockerError, match=timed_out):
        ping_local_engine(timeout=0.2)


def test_an_engine_over_tcp_is_left_to_docker_py(engine_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")  # nothing is tried: no error here
    assert ping_local_engine() is False


CONTEXT_CHECK = """
import json, sys
from dstackctl.docker_address import engine_address
print(json.dumps({"address": engine_address(), "docker_py_loaded": "docker" in sys.modules}))
"""


def _engine_address_in_a_fresh_process(config: dict[str, object] | None, tmp_path: Path) -> dict[str, object]:
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir(exist_ok=True)
    if config is not None:
        (config_dir / "config.json").write_text(json.dumps(config))
    env = {"DOCKER_CONFIG": str(config_dir), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", CONTEXT_CHECK], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return dict(json.loads(done.stdout))


def test_no_context_in_the_config_is_found_without_docker_py(tmp_path: Path) -> None:
    assert _engine_address_in_a_fresh_process({"auths": {}}, tmp_path) == {
        "address": None,
        "docker_py_loaded": False,
    }
    assert _engine_address_in_a_fresh_process(None, tmp_path)["docker_py_loaded"] is False


def test_a_config_that_names_a_context_is_read_by_docker_py(tmp_path: Path) -> None:
    # "default" is no context of its own; docker-py reads the file and says so.
    found = _engine_address_in_a_fresh_process({"currentContext": "default"}, tmp_path)
    assert found == {"address": None, "docker_py_loaded": True}
