"""The warm supervisor that `run` forks first thing (agent/warm_start.py): it becomes the
service's supervisor when handed one, exits when released or when the CLI ends, and never
holds the CLI's output open. Each case runs in a fresh process (prepare forks); the
supervisor itself is replaced by a stub that writes what it was given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import wait_until

SCRIPT = """
import json, os, sys, time
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
import dstackctl.agent.process as process

def preload():
    (out / "warm.pid").write_text(str(os.getpid()))
    time.sleep(float(os.environ.get("PRELOAD_SECONDS", "0")))

def become_supervisor(home, name):
    (out / "handed.json").write_text(json.dumps({
        "home": home, "name": name, "cwd": os.getcwd(), "pid": os.getpid(),
        "session": os.getsid(0), "stdout": os.readlink("/proc/self/fd/1"),
    }))
    return 0

process.preload, process.become_supervisor = preload, become_supervisor
from dstackctl.agent import warm_start

warm_start.prepare()
print("prepared", os.getpid(), flush=True)
if mode == "hand_over":
    print("handed", warm_start.hand_over("/srv/home", "svc"))
elif mode == "release":
    warm_start.release()
    print("handed", warm_start.hand_over("/srv/home", "svc"))  # released: nothing to hand to
    time.sleep(30)  # the CLI goes on (waiting, following logs); the warm process must not
elif mode == "dead":
    while not (out / "warm.pid").exists():
        time.sleep(0.01)
    warm = int((out / "warm.pid").read_text())
    os.kill(warm, 9)
    while Path(f"/proc/{warm}/stat").exists() and Path(f"/proc/{warm}/stat").read_text().split()[2] != "Z":
        time.sleep(0.01)
    print("handed", warm_start.hand_over("/srv/home", "svc"))
"""


def _start(tmp_path: Path, mode: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path), mode],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie that its new parent (init) has yet to reap."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _warm_pid(tmp_path: Path) -> int:
    pid_file = tmp_path / "warm.pid"
    return wait_until(
        lambda: pid_file.exists() and int(pid_file.read_text()), 30, "the warm process to start"
    )


def test_handed_a_service_it_becomes_its_supervisor_detached_from_the_cli(tmp_path: Path) -> None:
    cli = _start(tmp_path, "hand_over")
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    assert "handed True" in out
    record = tmp_path / "handed.json"
    wait_until(record.exists, 30, "the warm process to take the service")
    handed = json.loads(record.read_text())
    assert handed["home"] == "/srv/home" and handed["name"] == "svc"
    assert handed["cwd"] == "/"
    assert handed["session"] != os.getsid(0)  # a Ctrl-C at the CLI's terminal does not reach it
    assert handed["stdout"] == os.devnull  # become_supervisor points it at the agent log
    assert handed["pid"] != cli.pid


def test_released_it_exits_while_the_cli_goes_on(tmp_path: Path) -> None:
    cli = _start(tmp_path, "release")
    try:
        warm = _warm_pid(tmp_path)
        wait_until(lambda: _gone(warm), 30, "the released warm process to exit")
        assert cli.poll() is None  # the CLI still runs: the release, not its exit, ended it
        assert not (tmp_path / "handed.json").exists()
    finally:
        cli.kill()
        out, _ = cli.communicate(timeout=30)
    assert "handed False" in out


def test_a_cli_that_ends_without_handing_over_ends_it_and_its_output_is_not_held(tmp_path: Path) -> None:
    # The warm process is still importing (here: sleeping) when the CLI exits; a CLI run with
    # its output in a pipe must see EOF then, not when the warm process is done.
    cli = _start(tmp_path, "exit", PRELOAD_SECONDS="3")
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    warm = _warm_pid(tmp_path)
    assert not _gone(warm), "the warm process should still be in its preload when the CLI's output closed"
    wait_until(lambda: _gone(warm), 30, "the warm process to exit after the CLI")
    assert not (tmp_path / "handed.json").exists()


def test_a_warm_process_that_died_is_not_handed_the_service(tmp_path: Path) -> None:
    cli = _start(tmp_path, "dead")
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    assert "handed False" in out  # start_agent then forks or spawns a supervisor as before
    assert not (tmp_path / "handed.json").exists()
