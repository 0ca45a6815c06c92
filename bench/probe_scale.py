"""Probe-runner scale benchmark: many HTTP probe targets at a 1 s interval.

Starts the target HTTP servers in a *separate process* (Debian's nginx with a generated
config listening on N ports, or a small asyncio server process with --server asyncio), so
their CPU is not counted as the runner's. Then, in this process, a real
``dstackctl.probes.ProbeRunner`` watches N targets (one ``ProbeConfig(type="http",
url="/health", interval=1)`` each, on its own non-blocking sockets) for --seconds.

Measured per run:
- lateness = started - due of every probe (from the runner's ``on_sample`` hook); the first
  round (all targets due at registration) is reported separately;
- CPU share of this process (all threads, user+sys, ``time.process_time``) over the steady
  window (after --warmup seconds) divided by wall time, and CPU ms per probe;
- probes per second achieved in the window, failed probes, the server's own CPU share, and
  how busy the whole machine was (from /proc/stat) so contention can be judged.

Targets (the issue): lateness p99 <= 50 ms, runner CPU <= 30 % of one core, 0 failures.
--workers 0 (the default) is the runner as the agent builds it; N > 0 runs blocking
``execute_probe`` calls on N threads instead (the design before the socket loop, for a
comparison in the same run). Each is run in interleaved rounds (--rounds); medians reported.
--with-agent runs the real ``ServiceAgent`` in this process instead (bench/_agent_harness.py:
a fake Docker engine reports N running replicas whose ports are the N targets); the agent
builds and registers the runner itself (all replicas at once, as when an agent adopts its
containers), and its reconcile loop and publisher write state.json to a temporary store, so
the CPU is the agent process's rather than the bare runner's. --stagger is ignored then.

    .venv/bin/python bench/probe_scale.py [--targets 1000] [--seconds 60] [--workers 0,32]
        [--rounds 1] [--server nginx|asyncio] [--stagger] [--with-agent] [--json]

Exit status: 0 when every run meets the targets, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

LATENESS_P99_TARGET_MS = 50.0
CPU_TARGET_PERCENT = 30.0
NGINX = "/usr/sbin/nginx"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
)


# --- target servers (separate processes) ------------------------------------------------


def _tree_cpu_seconds(pid: int) -> float:
    """user+sys CPU of a process and all its descendants (reaped children not counted)."""
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat.rsplit(") ", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                stack.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total


@dataclass
class TargetServer:
    kind: str
    process: subprocess.Popen[bytes]
    ports: list[int]
    workdir: Path | None = None

    def cpu_seconds(self) -> float:
        return _tree_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM if self.kind == "asyncio" else signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _ports_free(ports: list[int]) -> list[int]:
    busy = []
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def _wait_listening(server: TargetServer, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(server.ports)
    while pending:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.kind} server exited with {server.process.returncode}")
        port = pending[-1]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pending.pop()
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.kind} server does not listen on {port}") from None
            time.sleep(0.05)


def start_nginx(ports: list[int]) -> TargetServer:
    workdir = Path(tempfile.mkdtemp(prefix="probe-scale-nginx-"))
    listens = "\n".join(f"    listen 127.0.0.1:{port} backlog=1024;" for port in ports)
    temp_paths = "\n".join(
        f"  {name}_temp_path {workdir}/{name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temp_paths}
  server {{
{listens}
    location / {{ default_type text/plain; return 200 "ok\\n"; }}
  }}
}}
"""
    (workdir / "nginx.conf").write_text(config)
    process = subprocess.Popen(
        [NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = TargetServer("nginx", process, ports, workdir)
    try:
        _wait_listening(server)
    except RuntimeError:
        error = process.stderr.read().decode() if process.poll() is not None and process.stderr else ""
        server.stop()
        raise RuntimeError(f"nginx did not start: {error.strip()}") from None
    return server


def start_asyncio(ports: list[int]) -> TargetServer:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve-asyncio", str(ports[0]), str(ports[-1])],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    server = TargetServer("asyncio", process, ports)
    _wait_listening(server)
    return server


def serve_asyncio(first: int, last: int) -> None:
    """The --server asyncio target: answers every request on every port with 200 and closes."""

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            if b"\r\n\r\n" in self.buffer:
                self.transport.write(RESPONSE)  # type: ignore[attr-defined]
                self.transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for port in range(first, last + 1):
            await loop.create_server(Answer, "127.0.0.1", port, backlog=1024, reuse_address=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    asyncio.run(main())


# --- measuring ------------------------------------------------------------------------


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in 0..100) of an unsorted list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class RunResult:
    workers: int
    seconds: float
    targets: int
    window_seconds: float = 0.0
    probes_in_window: int = 0
    probes_total: int = 0
    failures: int = 0
    failure_examples: list[str] = field(default_factory=list)
    first_round_ms: dict[str, float] = field(default_factory=dict)
    lateness_p99_by_10s_ms: list[float] = field(default_factory=list)
    lateness_ms: dict[str, float] = field(default_factory=dict)
    late_over_50ms: int = 0
    duration_ms: dict[str, float] = field(default_factory=dict)
    cpu_percent: float = 0.0
    cpu_user_percent: float = 0.0
    cpu_sys_percent: float = 0.0
    cpu_ms_per_probe: float = 0.0
    context_switches_per_probe: float = 0.0
    server_cpu_percent: float = 0.0
    machine_busy_percent: float = 0.0
    state_writes: int | None = None
    state_write_ms: float | None = None
    state_kib: float | None = None
    loadavg_start: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def probes_per_second(self) -> float:
        return self.probes_in_window / self.window_seconds if self.window_seconds else 0.0

    @property
    def passed(self) -> bool:
        return (
            self.lateness_ms["p99"] <= LATENESS_P99_TARGET_MS
            and self.cpu_percent <= CPU_TARGET_PERCENT
            and self.failures == 0
        )


def _summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 2),
        "p99": round(percentile(ms, 99), 2),
        "max": round(max(ms), 2) if ms else float("nan"),
    }


def run_once(
    workers: int,
    ports: list[int],
    targets: int,
    seconds: float,
    warmup: float,
    stagger: bool,
    server: TargetServer,
    with_agent: bool,
) -> RunResult:
    from dstackctl.config.probe_model import ProbeConfig
    from dstackctl.probe_wire import execute_probe
    from dstackctl.probes import ProbeRunner, ProbeSample

    probe = ProbeConfig(type="http", url="/health", interval=1)
    samples: list[ProbeSample] = []
    # workers 0: the runner's own non-blocking sockets; N: blocking execute_probe on N
    # threads, the runner's design before the socket loop, to compare in the same run.
    transport: dict[str, Any] = {"execute": execute_probe, "workers": workers} if workers else {}
    monotonic = time.monotonic

    result = RunResult(workers=workers, seconds=seconds, targets=targets, loadavg_start=os.getloadavg())
    writes: list[float] = []  # seconds spent in each state.json write (with_agent)
    work = Path(tempfile.mkdtemp(prefix="probe-scale-agent-")) if with_agent else None
    agent = agent_thread = runner = None
    try:
        if with_agent:
            import _agent_harness as harness

            assert work is not None
            store = harness.RecordingStore(work, lambda _doc, spent: writes.append(spent))
            cfg_hash = harness.write_spec(store, "scale", targets, probe.url, probe.interval)
            writes.clear()
            replicas = harness.running_replicas(
                store, "scale", cfg_hash, [ports[i % len(ports)] for i in range(targets)]
            )
            harness.instrument_runner(on_sample=samples.append, **transport)
            started = monotonic()
            agent, agent_thread = harness.start_agent(store, "scale", harness.FakeEngine(replicas))
        else:
            runner = ProbeRunner(on_sample=samples.append, **transport)
            started = monotonic()
            for i in range(targets):
                runner.watch(f"t{i}", "127.0.0.1", ports[i % len(ports)], [probe])
                if stagger:
                    time.sleep(max(0.0, started + (i + 1) * probe.interval / targets - monotonic()))
        window_start = started + warmup
        time.sleep(max(0.0, window_start - monotonic()))
        cpu0, usage0, server0, machine0 = (
            time.process_time(),
            resource.getrusage(resource.RUSAGE_SELF),
            server.cpu_seconds(),
            _machine_cpu(),
        )
        wall0 = monotonic()
        writes0 = len(writes)
        time.sleep(max(0.0, started + seconds - monotonic()))
        cpu1, usage1, server1, machine1 = (
            time.process_time(),
            resource.getrusage(resource.RUSAGE_SELF),
            server.cpu_seconds(),
            _machine_cpu(),
        )
        wall1 = monotonic()
        window_writes = writes[writes0:]
        if work is not None:
            state_file = work / "services" / "scale" / "state.json"
            result.state_kib = round(state_file.stat().st_size / 1024, 1) if state_file.exists() else None
    finally:
        if runner is not None:
            runner.close()
        if agent is not None and agent_thread is not None:
            agent.stop.set()
            agent_thread.join(5)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

    wall = wall1 - wall0
    seen: set[tuple[str, int]] = set()
    first_round, later = [], []
    buckets: dict[int, list[float]] = {}
    in_window = 0
    for sample in list(samples):
        identity = (sample.key, sample.index)
        if identity in seen:
            later.append(sample.started - sample.due)
            buckets.setdefault(int((sample.started - started) // 10), []).append(sample.started - sample.due)
        else:
            seen.add(identity)
            first_round.append(sample.started - sample.due)
        if wall0 <= sample.started < wall1:
            in_window += 1
    result.window_seconds = wall
    result.probes_in_window = in_window
    result.probes_total = len(samples)
    failures = [f"{s.key}: {s.result.error}" for s in samples if not s.result.ok]
    durations = [s.ended - s.started for s in samples]
    result.failures = len(failures)
    result.failure_examples = failures[:5]
    result.first_round_ms = _summary(first_round)
    result.lateness_ms = _summary(later)
    result.lateness_p99_by_10s_ms = [round(1000 * percentile(buckets[b], 99), 1) for b in sorted(buckets)]
    result.late_over_50ms = sum(1 for v in later if v > LATENESS_P99_TARGET_MS / 1000)
    result.duration_ms = _summary(list(durations))
    result.cpu_percent = round(100 * (cpu1 - cpu0) / wall, 1)
    result.cpu_user_percent = round(100 * (usage1.ru_utime - usage0.ru_utime) / wall, 1)
    result.cpu_sys_percent = round(100 * (usage1.ru_stime - usage0.ru_stime) / wall, 1)
    result.cpu_ms_per_probe = round(1000 * (cpu1 - cpu0) / in_window, 3) if in_window else float("nan")
    switches = (usage1.ru_nvcsw + usage1.ru_nivcsw) - (usage0.ru_nvcsw + usage0.ru_nivcsw)
    result.context_switches_per_probe = round(switches / in_window, 2) if in_window else float("nan")
    result.server_cpu_percent = round(100 * (server1 - server0) / wall, 1)
    busy, total = machine1[0] - machine0[0], machine1[1] - machine0[1]
    result.machine_busy_percent = round(100 * busy / total * (os.cpu_count() or 1), 1) if total else 0.0
    if with_agent:
        result.state_writes = len(window_writes)
        result.state_write_ms = round(1000 * statistics.mean(window_writes), 2) if window_writes else None
    return result


# --- reporting ------------------------------------------------------------------------


def render_table(summary: dict[str, Any]) -> str:
    header = (
        "workers",
        "probes/s",
        "late p50",
        "p99",
        "max ms",
        ">50ms",
        "1st-round p99/max ms",
        "probe ms p50/p99",
        "CPU %core (usr+sys)",
        "CPU ms/probe",
        "failed",
        "server %",
        "machine %",
        "target",
    )
    lines = [header]
    for row in summary["runs"]:
        lat, first, dur = row["lateness_ms"], row["first_round_ms"], row["duration_ms"]
        lines.append(
            (
                str(row["workers"]),
                f"{row['probes_per_second']:.0f}",
                f"{lat['p50']:.1f}",
                f"{lat['p99']:.1f}",
                f"{lat['max']:.1f}",
                str(row["late_over_50ms"]),
                f"{first['p99']:.0f}/{first['max']:.0f}",
                f"{dur['p50']:.2f}/{dur['p99']:.1f}",
                f"{row['cpu_percent']:.1f} ({row['cpu_user_percent']:.1f}+{row['cpu_sys_percent']:.1f})",
                f"{row['cpu_ms_per_probe']:.3f}",
                str(row["failures"]),
                f"{row['server_cpu_percent']:.1f}",
                f"{row['machine_busy_percent']:.0f}",
                "PASS" if row["passed"] else "FAIL",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
    medians = summary.get("medians") or []
    if medians:
        out.append("medians over rounds:")
        for row in medians:
            out.append(
                f"  workers={row['workers']}: late p99 {row['lateness_p99_ms']:.1f} ms, "
                f"CPU {row['cpu_percent']:.1f} %, failed {row['failures']} -> "
                f"{'PASS' if row['passed'] else 'FAIL'}"
            )
    out.append(
        f"targets: {summary['targets']} x interval 1 s for {summary['seconds']:.0f} s "
        f"(CPU/throughput window after {summary['warmup']:.0f} s), server: {summary['server']}, "
        f"registration: {'staggered over 1 s' if summary['stagger'] else 'all at once'}"
        f"{'; runner inside the real ServiceAgent (fake Docker engine)' if summary['with_agent'] else ''}"
    )
    out.append(
        f"target: lateness p99 <= {LATENESS_P99_TARGET_MS:.0f} ms (after the first round), "
        f"CPU <= {CPU_TARGET_PERCENT:.0f} % of one core, 0 failed; machine % = all cores busy, "
        f"in % of one core ({os.cpu_count()} cores)"
    )
    out.append(f"load average before: {summary['loadavg_before']}, after: {summary['loadavg_after']}")
    out.extend(f"note: {note}" for note in summary["notes"])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each run")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the CPU window")
    parser.add_argument(
        "--workers",
        default="0",
        help="comma-separated: 0 for the runner's socket loop, N for blocking probes on N threads",
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the worker counts")
    parser.add_argument("--server", choices=("nginx", "asyncio"), default=None)
    parser.add_argument("--ports", type=int, default=None, help="listening ports (default: one per target)")
    parser.add_argument("--base-port", type=int, default=20000)
    parser.add_argument("--stagger", action="store_true", help="register targets spread over one interval")
    parser.add_argument(
        "--with-agent", action="store_true", help="probe from the real ServiceAgent (fake Docker)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--serve-asyncio", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_asyncio:
        serve_asyncio(*args.serve_asyncio)
        return 0
    if args.seconds <= args.warmup + 1:
        parser.error("--seconds must exceed --warmup by more than 1")

    worker_counts = [int(w) for w in args.workers.split(",")]
    notes: list[str] = []
    server_kind = args.server or ("nginx" if os.access(NGINX, os.X_OK) else "asyncio")
    ports = list(range(args.base_port, args.base_port + (args.ports or args.targets)))
    busy = _ports_free(ports)
    if busy:
        parser.error(f"ports in use in the range (first: {busy[:5]}); pick --base-port")
    server = start_nginx(ports) if server_kind == "nginx" else start_asyncio(ports)
    loadavg_before = os.getloadavg()
    runs: list[RunResult] = []
    try:
        for _ in range(args.rounds):
            for workers in worker_counts:
                runs.append(
                    run_once(
                        workers,
                        ports,
                        args.targets,
                        args.seconds,
                        args.warmup,
                        args.stagger,
                        server,
                        args.with_agent,
                    )
                )
                time.sleep(1.0)  # let abandoned probe threads drain
    finally:
        server.stop()
    loadavg_after = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for run in runs:
        row = {
            "workers": run.workers,
            "probes_per_second": round(run.probes_per_second, 1),
            "probes_total": run.probes_total,
            "lateness_ms": run.lateness_ms,
            "late_over_50ms": run.late_over_50ms,
            "lateness_p99_by_10s_ms": run.lateness_p99_by_10s_ms,
            "first_round_ms": run.first_round_ms,
            "duration_ms": run.duration_ms,
            "cpu_percent": run.cpu_percent,
            "cpu_user_percent": run.cpu_user_percent,
            "cpu_sys_percent": run.cpu_sys_percent,
            "cpu_ms_per_probe": run.cpu_ms_per_probe,
            "context_switches_per_probe": run.context_switches_per_probe,
            "failures": run.failures,
            "failure_examples": run.failure_examples,
            "server_cpu_percent": run.server_cpu_percent,
            "machine_busy_percent": run.machine_busy_percent,
            "loadavg_start": [round(v, 2) for v in run.loadavg_start],
            "state_writes_per_second": (
                None if run.state_writes is None else round(run.state_writes / run.window_seconds, 2)
            ),
            "state_write_ms": run.state_write_ms,
            "state_kib": run.state_kib,
            "passed": run.passed,
        }
        rows.append(row)
        if run.state_writes is not None:
            notes.append(
                f"workers={run.workers}: the agent wrote state.json {row['state_writes_per_second']}/s, "
                f"{run.state_write_ms} ms per write (json.dumps + fsync), {run.state_kib} KiB"
            )
        if run.probes_per_second < 0.95 * args.targets / 1.0:
            notes.append(
                f"workers={run.workers}: {run.probes_per_second:.0f} probes/s, below 95 % of "
                f"{args.targets}/s: the runner does not keep up"
            )
    medians: list[dict[str, Any]] = []
    if args.rounds > 1:
        for workers in worker_counts:
            mine = [r for r in rows if r["workers"] == workers]
            p99 = statistics.median(r["lateness_ms"]["p99"] for r in mine)
            cpu = statistics.median(r["cpu_percent"] for r in mine)
            failed = sum(r["failures"] for r in mine)
            medians.append(
                {
                    "workers": workers,
                    "lateness_p99_ms": p99,
                    "cpu_percent": cpu,
                    "failures": failed,
                    "passed": p99 <= LATENESS_P99_TARGET_MS and cpu <= CPU_TARGET_PERCENT and failed == 0,
                }
            )
    summary = {
        "schema": 1,
        "python": sys.executable,
        "targets": args.targets,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "server": f"{server_kind} ({len(ports)} ports)",
        "stagger": args.stagger,
        "with_agent": args.with_agent,
        "cores": os.cpu_count(),
        "loadavg_before": [round(v, 2) for v in loadavg_before],
        "loadavg_after": [round(v, 2) for v in loadavg_after],
        "runs": rows,
        "medians": medians,
        "notes": notes,
        "passed": all(m["passed"] for m in medians) if medians else all(r["passed"] for r in rows),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render_table(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
