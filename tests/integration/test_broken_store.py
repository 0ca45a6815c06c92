"""A store that cannot be written stops nothing (issue 15, item 7): `stop` removes the
containers all the same and says what it could not record; `ps` says how old a state is that
the agent has not refreshed."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from helpers import cli, wait_until, write_service

from dstackctl.store import Store

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_stop_removes_the_containers_when_the_store_cannot_be_written(
    dstack_home: Path,
    tmp_path: Path,
    test_image: str,
    docker_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_service(tmp_path, "full", test_image, ["exec httpd -f -p 8000 -h /www"], replicas=2)
    assert cli(capsys, "run", "-d", path, "--timeout", "60s").code == 0

    def disk_full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(Store, "write", disk_full)
        stopped = cli(capsys, "stop", "full")
    assert stopped.code == 1
    assert "stopped full (2 containers removed, its agent too), but could not record it" in stopped.err
    assert "No space left on device" in stopped.err
    assert docker_client.containers.list(all=True, filters={"label": "dstackctl.run=full"}) == []
    assert not Store(dstack_home).agent_alive("full")

    again = cli(capsys, "stop", "full")  # the disk has room again
    assert again.code == 0, again.err
    assert " terminated " in cli(capsys, "ps", "-a").out


def test_ps_says_how_old_a_state_is_that_the_agent_has_not_refreshed(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(tmp_path, "frozen", test_image, ["exec httpd -f -p 8000 -h /www"])
    assert cli(capsys, "run", "-d", path, "--timeout", "60s").code == 0
    assert "old" not in cli(capsys, "ps").err
    processes = Store(dstack_home).agent_processes("frozen")
    assert len(processes) == 2, processes
    for pid in reversed(processes):  # the supervisor first: it would replace a stopped agent
        os.kill(pid, signal.SIGSTOP)
    try:
        warned = wait_until(
            lambda: "warning: the state of frozen is" in (err := cli(capsys, "ps").err) and err,
            timeout=30,
            interval=1,
            what="ps to warn about the frozen agent's state",
        )
    finally:
        for pid in processes:
            os.kill(pid, signal.SIGCONT)
    assert "s old: its agent has not written it since" in warned
    wait_until(lambda: "old" not in cli(capsys, "ps").err, timeout=10, what="the warning to go")
    assert cli(capsys, "stop", "frozen").code == 0
