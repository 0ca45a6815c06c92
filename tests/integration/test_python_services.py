"""`python:` services for real: replicas of dstack's base image, here dstackctl-python:latest
(scripts/build-base-image.sh: Debian bookworm's Python 3.11, uv, this machine's CA bundle),
chosen with DSTACK_DOCKER_BASE_IMAGE as a user would set it for `dstackctl run`.

Covered: the prelude's venv (`uv venv -p X --seed /dstack/venv`, activated), `commands`
joined as dstack joins them (one shell, ` && `, a trailing `&` in braces), `env` and the
DSTACK_* variables seen by the commands, a real `uv pip install` from PyPI inside a replica,
and the two failures a user meets first: a package that does not exist, and a `python:`
version the image does not have (uv cannot download interpreters here), each reported by
`run -d` with exit 1 and the replica's last log lines.

Each replica serves its working folder with `python -m http.server 8000` once its commands
are done, so `run -d` returns when it listens and the test reads what the commands wrote.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import requests
from helpers import cli, free_port, ps_run, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-base-image.sh"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PYTHON_IMAGE = "dstackctl-python:latest"
IMAGE_PYTHON = "3.11"  # Debian bookworm's python3, the only interpreter in the image
VENV = "/dstack/venv"
SERVE = "python -m http.server 8000"
# `uv venv --seed` and `uv pip install` download from PyPI: generous on a loaded machine.
TIMEOUT = "180s"
HTTP_TIMEOUT = 5.0
UV_DEPRECATION = "is deprecated"  # uv's warning for UV_NATIVE_TLS, which would fill log tails


@pytest.fixture(scope="module")
def built_python_image(docker_client: Any) -> str:
    """dstackctl-python:latest, built by scripts/build-base-image.sh when its recipe changed
    (CI's setup.sh has built it; then the script only compares a label)."""
    build = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    if build.returncode != 0:
        pytest.fail(
            f"building {PYTHON_IMAGE} failed (exit {build.returncode}):\n{build.stdout}{build.stderr}",
            pytrace=False,
        )
    try:
        docker_client.images.get(PYTHON_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{PYTHON_IMAGE} is missing after scripts/build-base-image.sh", pytrace=False)
    return PYTHON_IMAGE


@pytest.fixture
def base_image(built_python_image: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The image as the user chooses it: DSTACK_DOCKER_BASE_IMAGE in the environment of
    `dstackctl run`, which the service's agent (started by that run) inherits."""
    monkeypatch.setenv("DSTACK_DOCKER_BASE_IMAGE", built_python_image)
    return built_python_image


def write_python_service(
    directory: Path,
    name: str,
    commands: list[str],
    *,
    python: str = IMAGE_PYTHON,
    env: list[str] | None = None,
) -> tuple[Path, int]:
    """A `python:` service (no `image`) on container port 8000 behind a free local endpoint
    port; returns the file and that port."""
    port = free_port()
    lines = [
        "type: service",
        f"name: {name}",
        f"python: {json.dumps(python)}",
        f'port: "{port}:8000"',
        f"commands: {json.dumps(commands)}",
    ]
    if env:
        lines.append(f"env: {json.dumps(env)}")
    path = directory / f"{name}.dstack.yml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, port


def http_json(url: str) -> Any:
    """The JSON body of a 200 answer, or None while there is none (yet)."""
    try:
        response = requests.get(url, timeout=HTTP_TIMEOUT)
    except requests.ConnectionError:
        return None
    return response.json() if response.status_code == 200 else None


def served_json(port: int, file: str) -> Any:
    """A JSON file the replica's commands wrote, as its http.server serves it through the
    service endpoint."""
    url = f"http://127.0.0.1:{port}/{file}"
    return wait_until(lambda: http_json(url), timeout=30, what=f"{url} to answer 200")


def test_the_image_carries_its_recipe_and_the_script_then_has_nothing_to_do(
    built_python_image: str, docker_client: Any
) -> None:
    image = docker_client.images.get(built_python_image)
    recipe = hashlib.sha256(BUILD_SCRIPT.read_bytes() + HOST_CA_BUNDLE.read_bytes()).hexdigest()
    assert image.labels["dstackctl.base-image.recipe"] == recipe
    env = dict(item.split("=", 1) for item in image.attrs["Config"]["Env"])
    assert (env["UV_SYSTEM_CERTS"], env["UV_PYTHON_DOWNLOADS"]) == ("1", "never")
    assert env["SSL_CERT_FILE"] == str(HOST_CA_BUNDLE)

    again = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)

    assert again.returncode == 0, again.stderr
    assert again.stdout == f"build-base-image: {built_python_image} is up to date (recipe {recipe[:12]})\n"
    assert docker_client.images.get(built_python_image).id == image.id


# Writes what the interpreter on PATH sees, as JSON, to the file named by its argument.
FACTS = (
    "python -c 'import json, os, sys; "
    'json.dump({"prefix": sys.prefix, "executable": sys.executable, '
    '"version": list(sys.version_info[:2]), "env": dict(os.environ), "cwd": os.getcwd()}, '
    'open(sys.argv[1], "w"))\' facts.json'
)


def test_a_python_service_runs_its_commands_in_one_shell_inside_the_seeded_venv(
    dstack_home: Path, tmp_path: Path, base_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = [
        "mkdir -p /srv/site",
        "cd /srv/site",  # one shell: the next commands run here
        'echo "{\\"shell\\": \\"$BASH_VERSION\\"}" > shell.json',
        # dstack wraps a command ending in `&` in braces, so the ` && ` join stays valid
        'sleep 1 && echo "{\\"background\\": true}" > background.json &',
        "pip --version > /dev/null",  # --seed put pip into the venv
        FACTS,
        SERVE,
    ]
    config, port = write_python_service(tmp_path, "pyvenv", commands, env=["GREETING=hello world", "EMPTY="])

    result = cli(capsys, "run", "-d", "--timeout", TIMEOUT, config)

    assert result.code == 0, result.err
    assert "pyvenv is ready (1 of 1 replica)" in result.out
    [replica] = ps_run(capsys, "pyvenv")["replicas"]
    facts = served_json(port, "facts.json")
    assert facts["prefix"] == VENV
    assert facts["executable"] == f"{VENV}/bin/python"
    assert ".".join(map(str, facts["version"])) == IMAGE_PYTHON
    assert facts["cwd"] == "/srv/site"
    env = facts["env"]
    assert env["VIRTUAL_ENV"] == VENV
    assert env["PATH"].startswith(f"{VENV}/bin:")
    assert (env["GREETING"], env["EMPTY"]) == ("hello world", "")
    expected = {
        "DSTACK_RUN_NAME": "pyvenv",
        "DSTACK_REPLICA_NUM": "0",
        "DSTACK_NODE_RANK": "0",
        "DSTACK_NODES_NUM": "1",
        "DSTACK_GPUS_NUM": "0",
        "DSTACK_MASTER_NODE_IP": "127.0.0.1",
    }
    assert {name: env.get(name) for name in expected} == expected
    assert env["DSTACK_RUN_ID"] and env["DSTACK_JOB_ID"].startswith(env["DSTACK_RUN_ID"])
    assert env["UV_SYSTEM_CERTS"] == "1"
    assert served_json(port, "shell.json")["shell"].startswith("5.")  # /bin/bash, as on dstack
    assert served_json(port, "background.json") == {"background": True}
    assert replica["status"] == "running"


def test_uv_pip_install_from_pypi_works_inside_a_replica(
    dstack_home: Path, tmp_path: Path, base_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = [
        "uv pip install six",
        "mkdir -p /srv/site && cd /srv/site",
        'python -c \'import json, six; json.dump({"file": six.__file__, "version": six.__version__}, '
        'open("six.json", "w"))\'',
        SERVE,
    ]
    config, port = write_python_service(tmp_path, "pysix", commands)

    result = cli(capsys, "run", "-d", "--timeout", TIMEOUT, config)

    assert result.code == 0, result.err
    six = served_json(port, "six.json")
    assert six["file"].startswith(f"{VENV}/lib/python{IMAGE_PYTHON}/site-packages/"), six
    assert six["version"].count(".") >= 1, six
    logs = cli(capsys, "logs", "pysix")
    assert logs.code == 0, logs.err
    assert "+ six==" in logs.out + logs.err  # uv's own report of what it installed
    assert UV_DEPRECATION not in logs.out + logs.err


def test_a_uv_pip_install_that_fails_is_reported_by_run_with_its_log_tail(
    dstack_home: Path, tmp_path: Path, base_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = "dstackctl-no-such-package-7f3a9c"
    config, _port = write_python_service(tmp_path, "pymissing", [f"uv pip install {missing}", SERVE])

    result = cli(capsys, "run", "-d", "--timeout", TIMEOUT, config)

    assert result.code == 1, result.out + result.err
    assert "pymissing: replica=0 failed: exited with code 1; last log lines:" in result.err
    assert f"Because {missing} was not found in the package registry" in result.err
    assert UV_DEPRECATION not in result.err
    [replica] = ps_run(capsys, "pymissing")["replicas"]
    assert (replica["status"], replica["exit_code"]) == ("failed", 1)


def test_a_python_version_the_image_lacks_fails_at_once_with_uv_s_reason(
    dstack_home: Path, tmp_path: Path, base_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The image has Debian's 3.11 only, and uv may not download another (no route to its
    # downloads here; UV_PYTHON_DOWNLOADS=never in the image makes that immediate).
    config, _port = write_python_service(tmp_path, "py312", [SERVE], python="3.12")

    result = cli(capsys, "run", "-d", "--timeout", TIMEOUT, config)

    assert result.code == 1, result.out + result.err
    assert "py312: replica=0 failed: exited with code 2; last log lines:" in result.err
    assert "No interpreter found for Python 3.12" in result.err
    assert "Python downloads are set to 'never'" in result.err
    [replica] = ps_run(capsys, "py312")["replicas"]
    assert (replica["status"], replica["exit_code"]) == ("failed", 2)
