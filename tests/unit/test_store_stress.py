"""The JSON store under stress: concurrent writers, writers killed mid-write, broken files.

Writers are separate processes (as the CLI and the agent are), started with the project's
Python; each test has its own store folder. The CLI checks run in-process
(`dstackctl.cli.main.run`) with a private ``$DSTACKCTL_HOME`` and no Docker engine.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import fast_path_of, wait_until

from dstackctl.cli.main import run
from dstackctl.store import SPEC, STATE, Store

NAME = "svc"
NO_DOCKER = "unix:///nonexistent-dstackctl-test.sock"

# Each writer bumps a counter and appends its own mark, `count` times, under Store.update.
# It starts when the file `go` appears, so that all writers compete from the first cycle.
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dstackctl.store import Store

    home, tag, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    store = Store(home)
    (home / f"ready-{tag}").touch()
    while not (home / "go").exists():
        time.sleep(0.001)
    for i in range(count):
        def bump(doc, i=i):
            doc["counter"] = doc.get("counter", 0) + 1
            doc.setdefault("marks", []).append(f"{tag}:{i}")
        store.update("svc", "state", bump)
    """
)

# Reads while the writers write, until the file `stop` appears; prints what it saw.
READER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from dstackctl.store import Store

    home = Path(sys.argv[1])
    store = Store(home)
    reads = torn = 0
    while not (home / "stop").exists():
        doc = store.read("svc", "state")
        if doc is None:
            continue
        reads += 1
        if doc["counter"] != len(doc["marks"]):
            torn += 1
    print(json.dumps({"reads": reads, "torn": torn}))
    """
)

# Writes numbered documents of varying size as fast as it can; `check` is the blob's length,
# so a document stitched from two writes would not add up.
SCRIBBLER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dstackctl.store import Store

    home, start = Path(sys.argv[1]), int(sys.argv[2])
    store = Store(home)
    n = start
    while True:
        n += 1
        size = 50_000 + (n * 7919) % 150_000
        store.write("svc", "state", {"n": n, "check": size, "blob": "x" * size})
    """
)

# Takes the service's lock through Store.update and holds it until killed.
LOCK_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dstackctl.store import Store

    home = Path(sys.argv[1])
    def hold(doc):
        (home / "holding").touch()
        time.sleep(3600)
    Store(home).update("svc", "state", hold)
    """
)


def python(code: str, *args: str | Path, stdout: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *(str(a) for a in args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 60) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"exit {process.returncode}: {err}"
    return out or ""


@pytest.mark.slow
def test_1000_concurrent_read_modify_write_cycles_lose_no_update(tmp_path: Path) -> None:
    writers, cycles = 5, 200
    home = tmp_path / "home"
    Store(home).write(NAME, STATE, {"counter": 0, "marks": []})
    reader = python(READER, home, stdout=subprocess.PIPE)
    procs = [python(WRITER, home, f"w{k}", str(cycles)) for k in range(writers)]
    try:
        wait_until(
            lambda: all((home / f"ready-w{k}").exists() for k in range(writers)),
            timeout=30,
            what="every writer to start",
        )
        (home / "go").touch()
        for proc in procs:
            finish(proc)
    finally:
        (home / "stop").touch()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    seen = json.loads(finish(reader))

    document = Store(home).read(NAME, STATE)
    assert document is not None
    assert document["counter"] == writers * cycles
    expected = {f"w{k}:{i}" for k in range(writers) for i in range(cycles)}
    assert len(document["marks"]) == writers * cycles
    assert set(document["marks"]) == expected
    # Each writer's own marks keep their order: no cycle ran on a stale copy.
    for k in range(writers):
        own = [m for m in document["marks"] if m.startswith(f"w{k}:")]
        assert own == [f"w{k}:{i}" for i in range(cycles)]
    assert seen["reads"] > 0
    assert seen["torn"] == 0, f"{seen['torn']} of {seen['reads']} reads saw a half-updated document"


@contextlib.contextmanager
def scribbler(home: Path, start: int) -> Iterator[subprocess.Popen[str]]:
    proc = python(SCRIBBLER, home, str(start))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def current_n(store: Store) -> int:
    document = store.read(NAME, STATE)
    return int(document["n"]) if document else 0


@pytest.mark.slow
def test_a_write_killed_by_sigkill_leaves_the_previous_state_readable(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = Store(home)
    store.write(NAME, STATE, {"n": 0, "check": 0, "blob": ""})
    rng = random.Random(20261127)
    last = 0
    for trial in range(15):
        with scribbler(home, last) as proc:
            # Let it write a random number of documents, then kill it mid-stride: it never pauses.
            wanted = last + rng.randint(1, 12)
            wait_until(
                lambda wanted=wanted: current_n(store) >= wanted,
                timeout=30,
                what=f"trial {trial}: the writer to reach document {wanted}",
                interval=0.001,
            )
            seen = current_n(store)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        document = store.read(NAME, STATE)
        assert document is not None, f"trial {trial}: the state file is gone"
        assert document["n"] >= seen, f"trial {trial}: the state went back from {seen} to {document['n']}"
        assert len(document["blob"]) == document["check"], f"trial {trial}: a torn document"
        last = document["n"]
    # A writer killed inside a write leaves its temporary file behind (private like the rest);
    # there must be some, or no kill landed inside a write and the test proved little.
    folder = store.service_dir(NAME)
    leftovers = list(folder.glob(".state.*.tmp"))
    assert leftovers, "no kill landed inside a write"
    for leftover in leftovers:
        assert leftover.stat().st_mode & 0o777 == 0o600, f"{leftover.name} is not 0600"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["state.json"]


def test_a_process_killed_while_holding_the_lock_does_not_block_the_next_update(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = Store(home)
    store.write(NAME, STATE, {"counter": 41})
    holder = python(LOCK_HOLDER, home)
    try:
        wait_until(lambda: (home / "holding").exists(), timeout=30, what="the holder to take the lock")
        lock_file = store.service_dir(NAME) / "lock"
        assert not lock_is_free(lock_file), "the holder should hold the lock now"
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=10)

    wait_until(
        lambda: lock_is_free(lock_file), timeout=5, what="the kernel to release the dead holder's lock"
    )
    updated = store.update(NAME, STATE, lambda doc: {**doc, "counter": doc["counter"] + 1})
    assert updated["counter"] == 42
    assert store.read(NAME, STATE) == {"counter": 42, "version": 1}


def lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


# --- corrupt or foreign files: one sentence, no traceback -------------------------------------

BROKEN = {
    "not-json": (b"{this is not json", "is corrupt (not JSON)"),
    "truncated": (b'{"version": 1, "name": "svc", "desired": "runn', "is corrupt (not JSON)"),
    "empty": (b"", "is corrupt (not JSON)"),
    "binary": (b"\xff\xfe\x00\x01\x9c garbage \x00", "is corrupt (not JSON)"),
    "foreign-version": (
        b'{"version": 99, "name": "svc"}',
        "has schema version 99, this dstackctl reads version 1",
    ),
    "foreign-shape": (b"[1, 2, 3]", "has schema version None, this dstackctl reads version 1"),
}


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private store with one stopped service record, and no Docker engine to reach."""
    home = tmp_path / "home"
    monkeypatch.setenv("DSTACKCTL_HOME", str(home))
    monkeypatch.setenv("DOCKER_HOST", NO_DOCKER)
    store = Store(home)
    store.write(
        NAME,
        SPEC,
        {"name": NAME, "run_id": "r1", "desired": "stopped", "deployment_num": 0, "replicas": 1},
    )
    store.write(NAME, STATE, {"name": NAME, "run_id": "r1", "status": "terminated", "replicas": []})
    return home


def assert_one_sentence(err: str, path: Path, fragment: str) -> None:
    assert "Traceback" not in err
    assert "unexpected" not in err, err
    assert err.count("\n") == 1, f"expected one line, got {err!r}"
    assert err.startswith(f"error: the state file {path} ")
    assert fragment in err
    assert f"`dstackctl recover {NAME}`" in err


@pytest.mark.parametrize("kind", [SPEC, STATE])
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_store_file_gives_one_sentence(home: Path, kind: str, case: str) -> None:
    raw, fragment = BROKEN[case]
    path = Store(home).service_dir(NAME) / f"{kind}.json"
    path.write_bytes(raw)

    for command in (["ps", NAME], ["ps", "-a", "--json", NAME], ["--debug", "ps", "-v", NAME]):
        code, out, err = cli(*command)
        assert code == 1, f"{command}: exit {code}"
        assert out == ""
        assert_one_sentence(err, path, fragment)
    for args in ([NAME], ["-v", "--json", NAME]):  # the entry point's fast path of `ps`
        handled = fast_path_of(["ps", *args])
        assert handled is not None, f"ps {args} left the fast path"
        code, out, err = handled
        assert (code, out) == (1, ""), f"ps {args}"
        assert_one_sentence(err, path, fragment)
    if kind == SPEC:  # redeploy reads the spec first, and needs no Docker for that
        code, out, err = cli("redeploy", NAME)
        assert (code, out) == (1, "")
        assert_one_sentence(err, path, fragment)


def test_ps_lists_the_readable_services_and_names_the_broken_one(home: Path) -> None:
    store = Store(home)
    store.write("fine", SPEC, {"name": "fine", "run_id": "r2", "desired": "stopped", "deployment_num": 3})
    broken = store.service_dir(NAME) / "spec.json"
    broken.write_bytes(BROKEN["foreign-version"][0])

    code, out, err = cli("ps", "-a", "--json")

    assert code == 1
    assert [r["name"] for r in json.loads(out)["runs"]] == ["fine"]
    assert_one_sentence(err, broken, BROKEN["foreign-version"][1])


def test_the_agent_start_removes_temp_files_of_killed_writes(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    store.write("svc", "state", {"status": "running"})
    leftover = store.service_dir("svc") / ".secrets.abc123.tmp"
    leftover.write_text('{"env": {"TOKEN": "value"}}')
    assert store.remove_leftover_temp_files("svc") == 1
    assert not leftover.exists()
    assert store.read("svc", "state") == {"status": "running", "version": 1}
