"""HTTP probes against busybox CGI replicas on the real engine (design.md section 3).

Probe results are observed the way a user sees them: through `ps --json` (each replica has
`probes[]` with `success_streak`, `ready_after`, `symbol`, `last_checked_at`, `last_error`),
polled often enough to see every step of a probe with `interval: 1s`. What reached the
server is read inside the container: /cgi-bin/record appends each request to
/tmp/requests.log. The CLI runs in-process; the agent is a real detached process.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import cli, ps_run, wait_until, write_service

from dstackctl.store import Store

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HTTPD = "httpd -f -p 8000 -h /www"
WAIT = 30.0  # generous upper bound for anything the agent does on a 2-core machine
# What a probe reports when nothing listens in the container yet. Docker's userland proxy
# may accept the connection on the published port and then close or reset it; the runner
# then checks the container's own address and says so.
CONNECTION_ERRORS = {
    "connection refused",
    "connection reset",
    "closed the connection without a response",
    "nothing answers on port 8000 inside the container; check `port:`",
}


def replica(capsys: pytest.CaptureFixture[str], name: str, num: int = 0) -> dict[str, Any]:
    """Replica `num` of `name` in `ps --json` (an empty dict while it is not listed)."""
    rows = [r for r in ps_run(capsys, name)["replicas"] if r["replica_num"] == num]
    return dict(rows[-1]) if rows else {}


def probes_yaml(*probes: str) -> str:
    """A `probes:` block; each argument is one probe's keys as YAML lines (4-space indented)."""
    return "probes:\n" + "".join(f"  - type: http\n{body}" for body in probes)


@dataclass(frozen=True)
class Seen:
    """One distinct state of one probe, as `ps --json` showed it."""

    symbol: str
    streak: int
    in_rotation: bool
    last_error: str | None
    last_status: int | None
    last_checked_at: str | None


def record_probe_states(
    capsys: pytest.CaptureFixture[str], name: str, until: str, timeout: float
) -> list[Seen]:
    """Poll `ps --json` every 50 ms and return the distinct states of replica 0's first probe,
    in the order seen, from the first executed probe until its symbol is `until`."""
    seen: list[Seen] = []

    def observe() -> bool:
        row = replica(capsys, name)
        if row.get("status") != "running" or not row.get("probes"):
            return False
        probe = row["probes"][0]
        if probe["last_checked_at"] is None:
            return False
        state = Seen(
            probe["symbol"],
            probe["success_streak"],
            row["ready"],
            probe["last_error"],
            probe["last_status"],
            probe["last_checked_at"],
        )
        if not seen or seen[-1] != state:
            seen.append(state)
        return state.symbol == until

    wait_until(observe, timeout=timeout, what=f"{name}'s probe to show {until}", interval=0.05)
    return seen


def collapse(symbols: list[str]) -> list[str]:
    """Consecutive repeats folded: ['×', '×', '✓'] -> ['×', '✓']."""
    return [s for i, s in enumerate(symbols) if i == 0 or symbols[i - 1] != s]


def requests_log(docker_client: Any, container_id: str) -> list[str]:
    """The lines /cgi-bin/record wrote in the container (none before the first request)."""
    result = docker_client.containers.get(container_id).exec_run(["cat", "/tmp/requests.log"])
    return result.output.decode().splitlines() if result.exit_code == 0 else []


def test_a_replica_that_listens_late_goes_from_cross_through_tilde_to_check(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens for 3 s, then every probe passes: with ready_after 3 the probe must
    # show × (connection-level errors), ~ at streaks 1 and 2, then ✓ at 3.
    probes = probes_yaml("    url: /cgi-bin/health\n    interval: 1s\n    ready_after: 3\n")
    path = write_service(tmp_path, "latecomer", test_image, ["sleep 3", HTTPD], extra=probes)
    assert cli(capsys, "run", "--no-wait", path).code == 0

    seen = record_probe_states(capsys, "latecomer", until="✓", timeout=WAIT)

    assert collapse([s.symbol for s in seen]) == ["×", "~", "✓"], seen
    failures = [s for s in seen if s.symbol == "×"]
    for failure in failures:
        # a connection-level failure, not an HTTP answer
        assert failure.last_status is None, failure
        assert failure.last_error in CONNECTION_ERRORS, failure
        assert (failure.streak, failure.in_rotation) == (0, False)
    passing = [s for s in seen if s.symbol == "~"]
    assert [s.streak for s in passing] == [1, 2]
    assert all(s.last_status == 200 and s.last_error is None for s in passing), passing
    assert not any(s.in_rotation for s in passing), "a replica that is not ready was in rotation"
    last = seen[-1]
    assert (last.streak, last.in_rotation, last.last_status) == (3, True, 200)
    table = cli(capsys, "ps", "-v", "latecomer")
    [row] = [line for line in table.out.splitlines() if "replica=0" in line]
    assert " ✓ " in row


def test_run_detached_returns_only_when_every_replica_is_ready(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Replica 1 starts listening 3 s after replica 0: returning on the first ready replica
    # (or on "running") would show here.
    late_for_one = 'if [ "$DSTACK_REPLICA_NUM" = 1 ]; then sleep 3; fi'
    probes = probes_yaml("    url: /cgi-bin/health\n    interval: 1s\n    ready_after: 2\n")
    path = write_service(tmp_path, "patient", test_image, [late_for_one, HTTPD], replicas=2, extra=probes)

    started = time.monotonic()
    result = cli(capsys, "run", "-d", "--timeout", "60s", path)
    waited = time.monotonic() - started

    assert result.code == 0, result.err
    assert "patient is ready (2 of 2 replicas)" in result.out
    assert waited >= 3, f"returned after {waited:.1f}s, before replica 1 could listen"
    replicas = ps_run(capsys, "patient")["replicas"]
    assert [(r["replica_num"], r["status"], r["ready"]) for r in replicas] == [
        (0, "running", True),
        (1, "running", True),
    ]
    for row in replicas:
        [probe] = row["probes"]
        assert probe["symbol"] == "✓", row
        assert probe["success_streak"] >= probe["ready_after"] == 2


def test_run_timeout_exits_3_naming_the_replicas_and_probes_not_ready_and_why(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # /cgi-bin/health answers 503 while /tmp/unhealthy exists: replica 1 never gets ready.
    sick_one = 'if [ "$DSTACK_REPLICA_NUM" = 1 ]; then touch /tmp/unhealthy; fi'
    probes = probes_yaml("    url: /cgi-bin/health\n    interval: 1s\n")
    path = write_service(tmp_path, "halfway", test_image, [sick_one, HTTPD], replicas=2, extra=probes)

    result = cli(capsys, "run", "-d", "--timeout", "6s", path)

    assert result.code == 3, (result.out, result.err)
    assert "Traceback" not in result.err
    # Progress lines come first on stderr; the error is the last line.
    error = result.err.splitlines()[-1]
    assert error.startswith("error: halfway was not ready within 6s: "), result.err
    assert "replica=1 running: /cgi-bin/health 0/1 (HTTP 503)" in error
    assert "replica=0" not in error, "replica 0 was ready and must not be named"
    assert "it keeps running" in error
    assert "dstackctl stop halfway" in error
    # The service keeps running, and `ps` says why replica 1 is not ready.
    shown = ps_run(capsys, "halfway")
    assert (shown["status"], shown["agent_alive"]) == ("running", True)
    first, second = shown["replicas"]
    assert (first["ready"], first["probes"][0]["symbol"]) == (True, "✓")
    assert (second["status"], second["ready"]) == ("running", False)
    [probe] = second["probes"]
    assert (probe["symbol"], probe["success_streak"], probe["last_error"], probe["last_status"]) == (
        "×",
        0,
        "HTTP 503",
        503,
    )
    table = cli(capsys, "ps", "-v", "halfway")
    [row] = [line for line in table.out.splitlines() if "replica=1" in line]
    assert "×" in row and "probe /cgi-bin/health: HTTP 503" in row
    assert cli(capsys, "stop", "halfway").code == 0


def test_probe_requests_carry_headers_and_bodies_and_only_2xx_passes(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    api_key = f"key-{uuid.uuid4().hex}"
    wrong_key = f"wrong-{uuid.uuid4().hex}"
    probes = probes_yaml(
        # /cgi-bin/auth: 200 iff X-API-Key equals the container's $PROBES_API_KEY, else 401
        "    url: /cgi-bin/auth?right\n    interval: 1s\n"
        "    headers:\n      - name: X-API-Key\n        value: ${{ env.PROBES_API_KEY }}\n",
        "    url: /cgi-bin/auth?wrong\n    interval: 1s\n"
        "    headers:\n      - name: X-API-Key\n        value: ${{ env.WRONG_KEY }}\n",
        "    url: /cgi-bin/auth?none\n    interval: 1s\n",
        # /cgi-bin/record appends "METHOD QUERY BODY" to /tmp/requests.log
        "    url: /cgi-bin/record?body\n    method: post\n    interval: 1s\n"
        "    body: hello ${{ env.GREETING }}\n",
        "    url: /cgi-bin/status?302\n    interval: 1s\n",
        "    url: /cgi-bin/slow?5\n    interval: 1s\n    timeout: 1s\n",
    )
    path = write_service(
        tmp_path,
        "prober",
        test_image,
        [HTTPD],
        env=[f"PROBES_API_KEY={api_key}", f"WRONG_KEY={wrong_key}", "GREETING=world"],
        extra=probes,
    )
    submitted = cli(capsys, "run", "--no-wait", path)
    assert submitted.code == 0, submitted.err
    expected = [
        ("✓", None, 200),
        ("×", "HTTP 401", 401),
        ("×", "HTTP 401", 401),
        ("✓", None, 200),
        ("×", "HTTP 302", 302),
        ("×", "timed out after 1s", None),
    ]

    def settled() -> dict[str, Any] | None:
        row = replica(capsys, "prober")
        outcome = [(p["symbol"], p["last_error"], p["last_status"]) for p in row.get("probes") or []]
        return row if outcome == expected else None

    row = wait_until(settled, timeout=WAIT, what="every probe of prober to show its expected outcome")

    assert [p["url"] for p in row["probes"]] == [
        "/cgi-bin/auth?right",
        "/cgi-bin/auth?wrong",
        "/cgi-bin/auth?none",
        "/cgi-bin/record?body",
        "/cgi-bin/status?302",
        "/cgi-bin/slow?5",
    ]
    assert row["ready"] is False, "a replica with failing probes must not be in rotation"
    # The POST body, with ${{ env.GREETING }} expanded, reached the server.
    logged = requests_log(docker_client, row["container_id"])
    assert logged, "the POST probe never reached /cgi-bin/record"
    assert set(logged) == {"POST body hello world"}
    # `ps -v` shows one symbol per probe, in config order.
    table = cli(capsys, "ps", "-v", "prober")
    [line] = [text for text in table.out.splitlines() if "replica=0" in text]
    assert " ✓××✓×× " in line
    # The key's value reached the server (the first probe passed) but is never shown.
    outputs = {
        "run": submitted,
        "ps": cli(capsys, "ps"),
        "ps -v --wide": cli(capsys, "ps", "-v", "--wide"),
        "ps --json": cli(capsys, "ps", "--json"),
        "ps -a -v --wide --json prober": cli(capsys, "ps", "-a", "-v", "--wide", "--json", "prober"),
    }
    log = Store(dstack_home).log_path("prober").read_text()
    assert "agent for prober started" in log
    for secret in (api_key, wrong_key):
        for command, result in outputs.items():
            assert result.code == 0, f"{command}: {result.err}"
            assert secret not in result.out + result.err, f"`{command}` shows a probe header value"
        assert secret not in log, "the agent's log holds a probe header value"


def test_until_ready_stops_probing_once_the_probe_is_ready(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Both probes hit /cgi-bin/record, which logs each request: the control probe keeps
    # running every second, the until_ready one must stop after its second success.
    probes = probes_yaml(
        "    url: /cgi-bin/record?until\n    interval: 1s\n    ready_after: 2\n    until_ready: true\n",
        "    url: /cgi-bin/record?control\n    interval: 1s\n",
    )
    path = write_service(tmp_path, "once", test_image, [HTTPD], extra=probes)
    assert cli(capsys, "run", "-d", "--timeout", "60s", path).code == 0

    row = wait_until(
        lambda: (r := replica(capsys, "once")) and r["probes"][0]["symbol"] == "✓" and r,
        timeout=WAIT,
        what="the until_ready probe of once to be ready",
    )
    container_id = row["container_id"]
    checked_at = row["probes"][0]["last_checked_at"]

    def counts() -> tuple[int, int]:
        lines = requests_log(docker_client, container_id)
        return lines.count("GET until "), lines.count("GET control ")

    until_at_ready, control_at_ready = counts()
    assert until_at_ready == 2, f"expected 2 requests of the until_ready probe, got {until_at_ready}"
    wait_until(
        lambda: counts()[1] >= control_at_ready + 3,
        timeout=WAIT,
        what="three more requests of the control probe",
    )
    assert counts()[0] == 2, "the until_ready probe kept probing after it was ready"
    after = replica(capsys, "once")
    assert after["ready"] is True
    first = after["probes"][0]
    assert (first["symbol"], first["success_streak"], first["last_checked_at"]) == ("✓", 2, checked_at)
