"""Soak: a service under light steady load for a long time; does its agent grow?

One service of the test image with 2 replicas and an http probe every second, started through
the real CLI (`dstackctl run -d`) in its own DSTACKCTL_HOME with a free endpoint port. After a
warm-up, GETs go to the endpoint at --rps (evenly spaced, each from a pool thread) for
--minutes; every --sample seconds the agent process (the holder of the service's agent lock,
`Store.agent_holder`) is sampled: RSS (VmRSS of /proc/PID/status), open fds (/proc/PID/fd)
and the size of agent.log (its supervisor, where one runs it, for a note). Targets: RSS growth
at most 5 MB, fds at the end at most the first sample + 2, no failed request (non-200 or no
answer), the same agent process throughout, and no line in agent.log from the soak other than
the expected ones (EXPECTED_LOG_LINES).

    .venv/bin/python bench/soak.py [--minutes 10] [--rps 5] [--sample 10] [--warmup 30] [--json]

Needs dockerd and dstackctl-testsrv:latest (scripts/build-test-image.sh). Containers and the
agent are removed on the way out, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _report import load_average
from autoscale import DOCKER, DSTACKCTL, IMAGE, Load, free_port, progress

from dstackctl.store import Store

SERVICE = """type: service
name: {name}
image: {image}
port: "{port}:8000"
replicas: 2
commands: ["exec httpd -f -p 8000 -h /www"]
probes: [{{type: http, url: /cgi-bin/health, interval: 1s}}]
"""
RSS_GROWTH_LIMIT_MB = 5.0
FD_GROWTH_LIMIT = 2
# Lines a healthy agent may log while nothing changes (none today); anything else is reported.
EXPECTED_LOG_LINES: tuple[re.Pattern[str], ...] = ()
AGENT_STARTED = re.compile(r" INFO agent for \S+ started \(pid \d+\)")
_LOG_MESSAGE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \w+ (.*)$")


class BenchError(Exception):
    pass


@dataclass
class Sample:
    seconds: float  # since the first sample
    rss_mb: float
    fds: int
    log_bytes: int


def process_usage(pid: int) -> tuple[float, int]:
    """(RSS in MB, open fds) of a live process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError as exc:
        raise BenchError(f"process {pid} is gone: {exc}") from exc
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    if match is None:
        raise BenchError(f"no VmRSS in /proc/{pid}/status")
    return int(match.group(1)) / 1024, fds


def agent_sample(pid: int, log: Path, since: float) -> Sample:
    rss_mb, fds = process_usage(pid)
    size = log.stat().st_size if log.exists() else 0
    return Sample(round(time.monotonic() - since, 1), rss_mb, fds, size)


class Service:
    def __init__(self, home: Path, name: str) -> None:
        self.home, self.name, self.port = home, name, free_port()
        self.file = home / f"{name}.dstack.yml"
        self.file.write_text(SERVICE.format(name=name, image=IMAGE, port=self.port))
        self.env = {**os.environ, "DSTACKCTL_HOME": str(home)}
        self.store = Store(home)
        self.log = self.store.log_path(name)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [DSTACKCTL, *args]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=False, timeout=180)

    def start(self) -> int:
        """`run -d` until both replicas are ready; the agent's pid."""
        done = self.cli("run", "-d", str(self.file), "--timeout", "120s")
        if done.returncode:
            raise BenchError(f"run -d exited {done.returncode}: {done.stderr.strip()[-300:]}")
        pid = self.store.agent_holder(self.name)
        if pid is None:
            raise BenchError("no agent holds the service's lock after run -d")
        return pid

    def supervisor(self, agent_pid: int) -> int | None:
        """The agent's supervisor, where one runs it (Store.agent_processes: agent, supervisor)."""
        listed = self.store.agent_processes(self.name)
        return next((pid for pid in listed if pid != agent_pid), None)

    def remove(self) -> None:
        """`stop`, then whatever is left: the agent (this home's) and containers (by name)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.cli("stop", self.name)
        pid = self.store.agent_holder(self.name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        query = ["ps", "-aq", "--filter", f"name=dstackctl-{self.name}-"]
        ids = subprocess.run([DOCKER, *query], capture_output=True, text=True, check=False).stdout.split()
        if ids:
            subprocess.run([DOCKER, "rm", "-f", *ids], capture_output=True, check=False)


@contextlib.contextmanager
def removed_on_exit(service: Service) -> Iterator[None]:
    """Remove the service whatever happens (SIGTERM interrupts as Ctrl-C does)."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.remove()


def unexpected_log_lines(log: Path, offset: int) -> list[str]:
    """Messages the agent logged after byte `offset` that EXPECTED_LOG_LINES does not cover."""
    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    found = []
    for line in text.splitlines():
        match = _LOG_MESSAGE.match(line)
        message = match.group(1) if match else line
        if not any(pattern.search(message) for pattern in EXPECTED_LOG_LINES):
            found.append(line)
    return found


def agent_starts(log: Path) -> list[str]:
    """The lines of agent.log where an agent started: one, unless it was restarted."""
    with contextlib.suppress(OSError):
        return [line for line in log.read_text(errors="replace").splitlines() if AGENT_STARTED.search(line)]
    return []


def log_tail(log: Path, lines: int = 20) -> list[str]:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace").splitlines()[-lines:]
    return []


def slope_per_minute(samples: list[Sample], value: str) -> float:
    """Least-squares slope of `value` over the samples, per minute."""
    xs = [s.seconds / 60 for s in samples]
    ys = [float(getattr(s, value)) for s in samples]
    if len(xs) < 2:
        return 0.0
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0


def soak(service: Service, args: argparse.Namespace) -> dict[str, Any]:
    progress(f"starting {service.name} (2 replicas, probe every 1s) on port {service.port}")
    pid = service.start()
    load = Load(f"http://127.0.0.1:{service.port}/", args.rps)
    try:
        progress(f"agent pid {pid}; warming up for {args.warmup:g}s at {args.rps:g} req/s")
        time.sleep(args.warmup)
        began = time.monotonic()
        samples = [agent_sample(pid, service.log, began)]
        supervisor = service.supervisor(pid)
        supervisor_usage = [process_usage(supervisor)] if supervisor else []
        log_offset = samples[0].log_bytes
        end = began + args.minutes * 60
        while (now := time.monotonic()) < end:
            time.sleep(min(args.sample, end - now))
            if service.store.agent_holder(service.name) != pid:
                raise BenchError(f"the agent (pid {pid}) is gone or was replaced")
            samples.append(agent_sample(pid, service.log, began))
            if supervisor:
                supervisor_usage.append(process_usage(supervisor))
            last = samples[-1]
            progress(f"+{last.seconds:.0f}s rss {last.rss_mb:.1f} MB, fds {last.fds}, log {last.log_bytes} B")
    finally:
        load.stop()
    statuses = Counter(status for _sent, status in load.answers)
    failed_at = sorted((sent - load.sends[0], status) for sent, status in load.answers if status != 200)
    return {
        "pid": pid,
        "samples": samples,
        "requests": len(load.sends),
        "ok": statuses.pop(200, 0),
        "failed": load.failures(),
        "failures": [f"{n} x {f'HTTP {code}' if code else 'no answer'}" for code, n in statuses.items()],
        "failed_at": [f"+{offset:.1f}s {status or 'no answer'}" for offset, status in failed_at[:20]],
        "log_tail": log_tail(service.log) if failed_at else [],
        "agent_starts": agent_starts(service.log),
        "unexpected_log_lines": unexpected_log_lines(service.log, log_offset) if service.log.exists() else [],
        "supervisor": supervisor_note(supervisor, supervisor_usage),
    }


def supervisor_note(pid: int | None, usage: list[tuple[float, int]]) -> str | None:
    """The supervisor's RSS and fds, for information (the verdict is about the agent)."""
    if pid is None or not usage:
        return None
    (rss_first, fds_first), (rss_last, fds_last) = usage[0], usage[-1]
    rss_peak, fds_peak = max(u[0] for u in usage), max(u[1] for u in usage)
    return (
        f"supervisor (pid {pid}): rss {rss_first:.1f} -> {rss_last:.1f} MB (max {rss_peak:.1f}), "
        f"fds {fds_first} -> {fds_last} (max {fds_peak})"
    )


def verdicts(result: dict[str, Any], minutes: float) -> list[tuple[str, str, bool]]:
    return growth_verdicts(result["samples"]) + service_verdicts(result, minutes)


def growth_verdicts(samples: list[Sample]) -> list[tuple[str, str, bool]]:
    """The agent's RSS and open fds, first sample against last."""
    first, last = samples[0], samples[-1]
    rss_peak = max(s.rss_mb for s in samples)
    fd_peak = max(s.fds for s in samples)
    second_half = [s for s in samples if s.seconds >= last.seconds / 2]  # after the allocator settles
    return [
        (
            f"RSS growth <= {RSS_GROWTH_LIMIT_MB:g} MB",
            f"{first.rss_mb:.1f} -> {last.rss_mb:.1f} MB (max {rss_peak:.1f}, "
            f"slope {slope_per_minute(samples, 'rss_mb') * 1024:+.1f} KB/min, "
            f"second half {slope_per_minute(second_half, 'rss_mb') * 1024:+.1f} KB/min)",
            last.rss_mb - first.rss_mb <= RSS_GROWTH_LIMIT_MB,
        ),
        (
            f"open fds at the end <= start + {FD_GROWTH_LIMIT}",
            f"{first.fds} -> {last.fds} (max {fd_peak}, slope {slope_per_minute(samples, 'fds'):+.2f}/min)",
            last.fds <= first.fds + FD_GROWTH_LIMIT,
        ),
    ]


def service_verdicts(result: dict[str, Any], minutes: float) -> list[tuple[str, str, bool]]:
    """Requests, agent restarts and the log."""
    first, last = result["samples"][0], result["samples"][-1]
    log_rate = (last.log_bytes - first.log_bytes) / max(minutes, 1e-9)
    unexpected, starts = result["unexpected_log_lines"], result["agent_starts"]
    return [
        (
            "no failed request",
            f"{result['failed']} of {result['requests']} failed ({result['ok']} answered 200)",
            result["failed"] == 0,
        ),
        (
            "one agent throughout (agent.log, from its start)",
            f"{len(starts)} start(s)" + "".join(f"; {line}" for line in starts[1:4]),
            len(starts) == 1,
        ),
        (
            "agent.log grows only by expected lines",
            f"{first.log_bytes} -> {last.log_bytes} B ({log_rate:.0f} B/min), "
            f"{len(unexpected)} unexpected line(s)",
            not unexpected,
        ),
    ]


def render(result: dict[str, Any], checks: list[tuple[str, str, bool]], notes: list[str]) -> None:
    print("   seconds   rss MB   fds   log bytes")
    for s in result.get("samples", []):
        print(f"{s.seconds:10.0f} {s.rss_mb:8.1f} {s.fds:5d} {s.log_bytes:11d}")
    for line in result.get("unexpected_log_lines", [])[:10]:
        print(f"unexpected log line: {line}")
    for failure in result.get("failures", []):
        print(f"failed request: {failure}")
    if result.get("failed_at"):
        print(
            f"failed requests, sent after the load began (warm-up included): {', '.join(result['failed_at'])}"
        )
    for line in result.get("log_tail", []):
        print(f"agent.log: {line}")
    for note in notes:
        print(f"note: {note}")
    for what, measured, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {what}: {measured}")
    print("PASS" if checks and all(c[2] for c in checks) else "FAIL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to sample under load")
    parser.add_argument("--rps", type=float, default=5.0, help="requests per second to the endpoint")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of load before the first sample")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="soak-bench-"))
    service = Service(home, f"soak-{secrets.token_hex(3)}")
    notes = [f"load average at start: {load_average()}"]
    result: dict[str, Any] = {}
    checks: list[tuple[str, str, bool]] = []
    try:
        with removed_on_exit(service):
            result = soak(service, args)
        checks = verdicts(result, args.minutes)
    except BenchError as exc:
        checks = [(f"error: {exc}", "", False)]
        notes += [f"agent.log: {line}" for line in log_tail(service.log)]
    except KeyboardInterrupt:
        progress("interrupted; the service was removed")
        return 130
    finally:
        shutil.rmtree(home, ignore_errors=True)
    notes += [result["supervisor"]] if result.get("supervisor") else []
    notes.append(f"load average at end: {load_average()}")
    notes.append(
        f"{args.minutes:g} min at {args.rps:g} req/s after {args.warmup:g}s of warm-up; probes every 1s"
    )
    if args.json:
        samples = [asdict(s) for s in result.get("samples", [])]
        checks_json = [{"check": c[0], "measured": c[1], "passed": c[2]} for c in checks]
        print(json.dumps({**result, "samples": samples, "checks": checks_json, "notes": notes}, indent=1))
    else:
        render(result, checks, notes)
    return 0 if checks and all(c[2] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
