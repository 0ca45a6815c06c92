"""How `stop` finds a service's agent: the pid and start time its lock file records.

The holders are real processes (the project's Python) taking the real lock; no Docker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

from dstackctl.store import Store

NAME = "svc"
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dstackctl.store import Store

    with Store(Path(sys.argv[1])).agent_lock(sys.argv[2]) as held:
        print("held" if held else "refused", flush=True)
        time.sleep(60)
    """
)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), NAME], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "held\n"
        yield process
    finally:
        process.kill()
        process.wait()


def test_the_holder_of_the_agent_lock_is_found_by_its_pid(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    assert Store(tmp_path).agent_holder(NAME) == holder.pid


def test_no_holder_once_the_agent_is_gone(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    store = Store(tmp_path)
    holder.kill()
    holder.wait()
    wait_until(lambda: not store.agent_alive(NAME), timeout=5, what="the lock to be released")
    assert store.agent_holder(NAME) is None


def test_a_recorded_pid_that_now_belongs_to_another_process_is_not_taken(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    lock_file = Store(tmp_path).service_dir(NAME) / "agent.lock"
    recorded_ticks = lock_file.read_text().split()[1]
    # The same pid with another start time: what a pid reused after the agent died looks like.
    lock_file.write_text(f"{holder.pid} {int(recorded_ticks) + 1}\n")
    assert Store(tmp_path).agent_holder(NAME) is None


@pytest.mark.slow
def test_a_second_agent_is_refused_and_leaves_the_record_of_the_first(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    second = subprocess.run(
        [sys.executable, "-c", HOLDER.replace("time.sleep(60)", "pass"), str(tmp_path), NAME],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert second.stdout == "refused\n"
    assert Store(tmp_path).agent_holder(NAME) == holder.pid
    assert holder.pid != os.getpid()
