"""Autoscaling benchmark: the first request from zero, then scale-up and scale-down on request rate.

One service of the test image with `replicas: 0..3` and `scaling: {metric: rps, target: 1,
window: 30s, scale_up_delay: 5s, scale_down_delay: 10s}`, in a temporary DSTACKCTL_HOME:

1. From zero, --rounds times (the service stopped and run again in between): one GET until its
   200, next to a plain `docker run -d --init` of the same image and command until its httpd
   answers ("replica start"). Target: median at most replica start + probe interval + 100 ms.
2. Scale-up: a steady load of --rps from zero (evenly spaced, from a thread pool); when the 2nd
   and 3rd replicas first answer. Bound: window + scale_up_delay + replica start + probe
   interval (once the window holds the full rate the final count is due at most one delay
   later). "rule" is dstack's rule applied every 0.5 s to the requests actually sent, plus the
   replica start. Target: no failed request (non-200 or no answer).
3. Scale-down: the load stops; time until `ps --json` shows desired 0 and no replica. Bound:
   window + scale_down_delay + replica stop (`docker stop` of the reference container). Then
   load at --rps again up to 3 replicas, down to 1 rps: failed requests while it scales from
   3 to 1. Target: none.

    .venv/bin/python bench/autoscale.py [--rounds 3] [--rps 3] [--port N]

Exit status: 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from _report import load_average

IMAGE = "dstackctl-testsrv:latest"
SHELL_COMMAND = "exec httpd -f -p 8000 -h /www"
PROBE_INTERVAL, WINDOW, TARGET, MAXIMUM, UP_DELAY, DOWN_DELAY = 1.0, 30.0, 1.0, 3, 5.0, 10.0
DOCKER = shutil.which("docker") or "docker"
DSTACKCTL = str(Path(sys.executable).parent / "dstackctl")
SERVICE = f"""type: service
name: {{name}}
image: {IMAGE}
port: "{{port}}:8000"
replicas: 0..{MAXIMUM}
scaling: {{{{metric: rps, target: {TARGET:g}, window: {WINDOW:g}s, scale_up_delay: {UP_DELAY:g}s, \
scale_down_delay: {DOWN_DELAY:g}s}}}}
commands: ["{SHELL_COMMAND}"]
probes: [{{{{type: http, url: /cgi-bin/health, interval: {PROBE_INTERVAL:g}s}}}}]
"""
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (.*)$")


class BenchError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float) -> tuple[int, str]:
    """(status, body); status 0 when no answer came."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


class Service:
    def __init__(self, home: Path, name: str, port: int) -> None:
        self.home, self.name = home, name
        self.url = f"http://127.0.0.1:{port}/cgi-bin/whoami"
        self.file = home / f"{name}.dstack.yml"
        self.file.write_text(SERVICE.format(name=name, port=port))
        self.env = {**os.environ, "DSTACKCTL_HOME": str(home)}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [DSTACKCTL, *args]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=False, timeout=120)

    def run(self) -> None:
        done = self.cli("run", "-d", str(self.file), "--timeout", "60s")
        if done.returncode:
            raise BenchError(f"run -d exited {done.returncode}: {done.stderr.strip()[-300:]}")

    def stop(self) -> None:
        self.cli("stop", self.name, "-y")

    def ps(self) -> dict[str, Any]:
        runs = json.loads(self.cli("ps", "--json", self.name).stdout or '{"runs": []}')["runs"]
        return dict(runs[0]) if runs else {}

    def log(self, pattern: str, since: float) -> list[tuple[float, re.Match[str]]]:
        """The agent's log lines matching `pattern` from `since` on, with their times."""
        path = self.home / "services" / self.name / "agent.log"
        found = []
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            if (stamp := _LOG_LINE.match(line)) and (match := re.search(pattern, stamp.group(2))):
                moment = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if moment >= since - 0.002:
                    found.append((moment, match))
        return found


class Load:
    """GETs at `rps`, evenly spaced, each from a pool thread so none waits behind another."""

    def __init__(self, url: str, rps: float) -> None:
        self.url, self.rps = url, rps
        self.sends: list[float] = []
        self.answers: list[tuple[float, int]] = []  # (sent, status)
        self.first_seen: dict[str, float] = {}  # replica number -> its first answer
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=16)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due = time.time()
        while not self._stop.wait(max(0.0, due - time.time())):
            self.sends.append(time.time())
            self._pool.submit(self._one, self.sends[-1])
            due += 1 / self.rps

    def _one(self, sent: float) -> None:
        status, body = get(self.url, 70)
        words, now = body.split(), time.time()
        with self._lock:
            self.answers.append((sent, status))
            if status == 200 and len(words) > 1:
                self.first_seen.setdefault(words[1], now)

    def failures(self, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for sent, status in self.answers if sent >= since and status != 200)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)


def docker_start(label: str) -> tuple[float, float]:
    """Seconds from `docker run -d` until the httpd answers, and of `docker stop`."""
    port = free_port()
    argv = [DOCKER, "run", "-d", "--init", "--label", label, "-p", f"127.0.0.1:{port}:8000",
            "--entrypoint", "/bin/sh", IMAGE, "-c", SHELL_COMMAND]  # fmt: skip
    start = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while get(f"http://127.0.0.1:{port}/cgi-bin/health", 1)[0] != 200:
        if proc.poll() not in (None, 0) or time.time() - start > 30:
            raise BenchError("docker run of the reference container failed or never answered")
        time.sleep(0.005)
    started = time.time() - start
    container = proc.communicate()[0].strip()
    start = time.time()
    subprocess.run([DOCKER, "stop", container], capture_output=True, check=False)
    stopped = time.time() - start
    subprocess.run([DOCKER, "rm", "-f", container], capture_output=True, check=False)
    return started, stopped


def rule_events(sends: list[float], start: float, end: float) -> list[tuple[float, int]]:
    """dstack's rule every 0.5 s (the agent's poll) on the requests sent: (when, new count)."""
    events: list[tuple[float, int]] = []
    count, last, now = 0, start, start
    while now <= end:
        rate = sum(1 for sent in sends if now - WINDOW < sent <= now) / WINDOW
        wanted = min(math.ceil(rate / TARGET), MAXIMUM)
        delay = UP_DELAY if wanted > count else DOWN_DELAY
        if wanted != count and (count == 0 or now - last >= delay):
            count, last = wanted, now
            events.append((now, wanted))
        now += 0.5
    return events


def first(events: list[tuple[float, int]], count: int, after: float = 0.0, up: bool = True) -> float:
    """When the count first reaches `count` (from below when `up`, else from above)."""
    return next((t for t, c in events if t >= after and (c >= count if up else c <= count)), math.nan)


def wait_for(service: Service, count: int, timeout: float) -> float:
    """Poll `ps --json` every 0.5 s until desired is `count` and so many replicas are left."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = service.ps()
        if run.get("scaling", {}).get("0", {}).get("desired") == count == len(run.get("replicas", [])):
            return time.time()
        time.sleep(0.5)
    raise BenchError(f"no scaling to {count} in {timeout:.0f}s")


def timeline(service: Service, since: float) -> str:
    lines = service.log(r"group \S+: scaling (\d+ -> \d+)", since)
    return ", ".join(f"+{t - since:.1f}s {m.group(1)}" for t, m in lines)


def ramp(service: Service, rps: float) -> tuple[Load, float]:
    """A load of `rps` from zero until the 3rd replica answers; (load, when it started)."""
    started = time.time()
    load = Load(service.url, rps)
    deadline = started + WINDOW + 2 * UP_DELAY + 60
    while len(load.first_seen) < MAXIMUM and time.time() < deadline:
        time.sleep(0.1)
    return load, started


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, bool | None]] = []
        self.notes = [f"load average at start: {load_average()}"]

    def row(self, what: str, measured: str, rule: str = "", target: str = "", ok: bool | None = None) -> None:
        self.rows.append((what, measured, rule, target, ok))

    def print(self, heading: str) -> bool:
        self.notes.append(f"load average at end: {load_average()}")
        table = [("measure", "measured", "rule", "target", "")]
        table += [(*r[:4], "" if r[4] is None else "PASS" if r[4] else "FAIL") for r in self.rows]
        widths = [max(len(line[i]) for line in table) for i in range(5)]
        for line in table:
            cells = (c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))
            print(line[0].ljust(widths[0]), *cells, sep="  ")
        print("\n".join([heading, *(f"note: {note}" for note in self.notes)]))
        passed = all(r[4] is not False for r in self.rows)
        print("PASS" if passed else "FAIL")
        return passed


def from_zero(service: Service, rounds: int, label: str, report: Report) -> tuple[float, float]:
    """The first request from zero, next to a plain docker run; (replica start, stop) medians."""
    latencies, starts, stops, splits = [], [], [], []
    for index in range(rounds):
        service.run()
        sent = time.time()
        status, _ = get(service.url, 70)
        latencies.append(time.time() - sent)
        if status != 200:
            raise BenchError(f"round {index + 1}: the first request got {status}")
        woke = service.log(r"scaling 0 -> \d", sent)
        up = service.log(r"replica=?\d+ .*started as ", sent)
        if woke and up:
            splits.append((woke[0][0] - sent, up[0][0] - sent))
        service.stop()
        started, stopped = docker_start(label)
        starts.append(started)
        stops.append(stopped)
        progress(f"round {index + 1}: first request {latencies[-1]:.3f} s, docker start {started:.3f} s")
    latency, start, stop = (statistics.median(v) for v in (latencies, starts, stops))
    bound = start + PROBE_INTERVAL + 0.1
    report.row("first request from zero", f"{latency:.3f} s", "", f"<= {bound:.3f} s", latency <= bound)
    report.row("  replica start (docker run -d until it answers)", f"{start:.3f} s")
    report.row("  replica stop (docker stop)", f"{stop:.3f} s")
    if splits:
        decided, created = (statistics.median(s[i] for s in splits) for i in (0, 1))
        report.notes.append(
            f"from zero (medians after the request): scaling decided +{decided:.3f} s, container "
            f"started +{created:.3f} s, answered +{latency:.3f} s"
        )
    return start, stop


def load_step(service: Service, rps: float, start: float, stop: float, report: Report) -> int:
    """Scale-up under a steady load from zero, then down with no load; the failed requests."""
    service.run()
    progress(f"load step: {rps:g} rps from zero")
    load, began = ramp(service, rps)
    load.stop()
    stopped_at, seen = load.sends[-1], sorted(load.first_seen.values())
    progress("load stopped: waiting for zero")
    zero_at = wait_for(service, 0, WINDOW + 3 * DOWN_DELAY + 60)
    report.notes.append(f"load step scaling (agent.log): {timeline(service, began)}")
    rule = rule_events(load.sends, began, zero_at + 5)
    bound = WINDOW + UP_DELAY + start + PROBE_INTERVAL
    for k in (2, 3):
        took = seen[k - 1] - began if len(seen) >= k else math.nan
        due = first(rule, k) - began + start
        what = f"replica #{k} takes traffic (from load start)"
        report.row(what, f"{took:.1f} s", f"{due:.1f} s", f"<= {bound:.1f} s", took <= bound)
    took, bound = zero_at - stopped_at, WINDOW + DOWN_DELAY + stop
    due = first(rule, 0, stopped_at, up=False) - stopped_at + stop
    report.row(
        "0 replicas (from load stop)", f"{took:.1f} s", f"{due:.1f} s", f"<= {bound:.1f} s", took <= bound
    )
    report.notes.append(f"load step: {load.failures()} of {len(load.answers)} requests failed")
    return load.failures()


def light_load(service: Service, rps: float, stop: float, report: Report) -> int:
    """From zero to 3 replicas at `rps` again, then 1 rps until 1 replica is left; failures
    during the ramp, and a row for those during the scale-down."""
    progress(f"light load: {rps:g} rps to {MAXIMUM} replicas, then 1 rps")
    load, began = ramp(service, rps)
    switched = time.time()
    load.rps = 1.0
    one_at = wait_for(service, 1, WINDOW + 3 * DOWN_DELAY + 60)
    time.sleep(3)  # answers to requests sent while the last replicas were stopping
    load.stop()
    report.notes.append(f"light-load phase scaling (agent.log): {timeline(service, began)}")
    due = first(rule_events(load.sends, began, one_at + 10), 1, switched, up=False) - switched + stop
    report.row("1 replica after 3 -> 1 rps (from the switch)", f"{one_at - switched:.1f} s", f"{due:.1f} s")
    failed, total = load.failures(since=switched), sum(1 for sent, _ in load.answers if sent >= switched)
    report.row("failed requests during scale-down (1 rps)", f"{failed} of {total}", "", "0", failed == 0)
    return load.failures() - failed


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the from-zero part")
    parser.add_argument("--rps", type=float, default=3.0, help="the load step's request rate")
    parser.add_argument("--port", type=int, default=0, help="the service's port (default: a free one)")
    args = parser.parse_args(argv)
    token = secrets.token_hex(3)
    label = f"dstackctl-bench-autoscale={token}"
    home = Path(tempfile.mkdtemp(prefix="autoscale-bench-"))
    service = Service(home, f"bench-auto-{token}", args.port or free_port())
    report = Report()
    try:
        start, stop = from_zero(service, args.rounds, label, report)
        failed = load_step(service, args.rps, start, stop, report)
        failed += light_load(service, args.rps, stop, report)
        report.row("failed requests during scale-up (2 ramps)", str(failed), "", "0", failed == 0)
    except BenchError as exc:
        report.row(f"error: {exc}", "", "", "", False)
    finally:
        service.stop()
        for query in (f"name=dstackctl-{service.name}-", f"label={label}"):
            ids = subprocess.run([DOCKER, "ps", "-aq", "--filter", query], capture_output=True, text=True)
            if ids.stdout.split():
                subprocess.run([DOCKER, "rm", "-f", *ids.stdout.split()], capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)
    passed = report.print(
        f"{args.rounds} rounds from zero (medians); load {args.rps:g} rps; window {WINDOW:g}s, target "
        f"{TARGET:g}, delays up {UP_DELAY:g}s / down {DOWN_DELAY:g}s, probe interval {PROBE_INTERVAL:g}s; "
        "rule = dstack's rule on the requests sent + replica start (up) or stop (down)"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
