"""Proxy benchmark: latency and throughput the service endpoint adds, and 1,000 held streams.

The same wrk load goes to every target, in interleaved rounds, so machine noise hits all alike:

- ``direct``      wrk -> upstream (the "replica")
- ``nginx-w1``    wrk -> Debian's nginx as a plain reverse proxy, ``worker_processes 1``
- ``nginx-auto``  the same nginx with ``worker_processes auto`` (for information only)
- ``dstackctl``   wrk -> ``dstackctl.proxy.Endpoint`` in its own process (one uvloop loop)
- ``whatif:X``    Endpoint from the file X.py given with --whatif (not in the verdict)

nginx with one worker is the like-for-like baseline and the one the throughput ratio uses: the
endpoint is one process with one event loop, so it can use one core at most.

The upstream is a second nginx (``worker_processes 1``) serving a 78-byte static file on
127.0.0.1. Every process started here has its own generated config, pid file, logs and temp
dirs under one temporary folder. The nginx proxy has an ``upstream`` block with ``keepalive
64``, ``proxy_http_version 1.1`` and ``proxy_set_header Connection ""``; ``keepalive_requests``
is raised on every nginx so none closes a connection after 1,000 requests (aiohttp never does).

Load (wrk ``-t1``: the machine has 2 cores shared by wrk, proxy and upstream):

- ``moderate``:   ``-c4`` with a wrk Lua ``delay()`` of 0..2*--pace-ms (random, mean 4 ms) per
  connection between a response and the next request, about 900 requests/s; wrk times a
  request from sending it, so the pause is not counted.
- ``throughput``: ``-c50``, no pause.

Besides latency and req/s, the CPU time of the proxy's processes per request (``us/req``) is
reported: on a shared machine it moves far less than req/s does.

Streams: a small aiohttp server process (``/stream`` sends one SSE-style chunk every
--stream-interval seconds, --stream-chunks in all) behind a fresh endpoint process; an aiohttp
client in this process opens --streams connections at once and reads every stream to the end.
Checked: every stream completes with all chunks and no error, and the upstream saw all streams
open at the same time. Reported: time to first chunk p50/p99 (also straight to the stream
server, as a baseline for the client's own cost), the proxy's RSS and peak open fds.

Targets (the issue): dstackctl added p50 <= 1 ms at moderate load; dstackctl throughput >= 1/4
of nginx's (worker_processes 1); 1,000 concurrent streams through the proxy without errors.

    .venv/bin/python bench/proxy_bench.py [--rounds 3] [--duration 10] [--streams 1000]
        [--whatif FILE.py] [--proxy-nofile max|inherit|N]
        [--profile-out prof.svg|prof.txt] [--skip-load] [--skip-streams] [--json]

Exit status: 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
BODY = b"hello from the upstream replica; a small static body for the proxy benchmark.\n"

TARGET_ADDED_P50_MS = 1.0
TARGET_THROUGHPUT_RATIO = 0.25
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile(limit: int | None = None) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE (to the hard limit, or `limit`); return the old."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if limit is None else limit
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return soft, hard


def wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    response.read()
                    return
        except Exception as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s: {last}")


def proc_cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of a process (all threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return total - idle, total


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class Service:
    """A server process we started; `pids` are the ones whose CPU is counted for it."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    pid_file: Path | None = None

    @property
    def pids(self) -> list[int]:
        if self.pid_file is not None:  # nginx: the master and its workers
            return [self.proc.pid, *proc_children(self.proc.pid)]
        return [self.proc.pid]

    def cpu(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid in self.pids)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if self.pid_file is None else signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


NGINX_MAIN = """\
# generated by bench/proxy_bench.py ({name})
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 16384;
pid {prefix}/{name}.pid;
error_log {prefix}/{name}.error.log warn;
{user}
events {{
    worker_connections 8192;
    multi_accept off;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/{name}/client_body;
    proxy_temp_path {prefix}/tmp/{name}/proxy;
    fastcgi_temp_path {prefix}/tmp/{name}/fastcgi;
    uwsgi_temp_path {prefix}/tmp/{name}/uwsgi;
    scgi_temp_path {prefix}/tmp/{name}/scgi;
    default_type text/plain;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
{http}
}}
"""

NGINX_UPSTREAM_HTTP = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            root {prefix}/www;
            index index.txt;
        }}
    }}
"""

# The plain reverse proxy the issue asks for: upstream block, keepalive 64, HTTP/1.1.
NGINX_PROXY_HTTP = """\
    upstream replica {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://replica;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def start_nginx(prefix: Path, name: str, workers: str, http: str, port: int) -> Service:
    (prefix / "tmp" / name).mkdir(parents=True, exist_ok=True)
    user = "user root root;" if os.geteuid() == 0 else ""  # the temp folder is private to us
    conf = prefix / f"{name}.conf"
    conf.write_text(NGINX_MAIN.format(name=name, workers=workers, prefix=prefix, user=user, http=http))
    proc = subprocess.Popen(
        [NGINX, "-c", str(conf), "-p", str(prefix), "-e", str(prefix / f"{name}.error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(prefix / f"{name}.stderr", "wb"),  # noqa: SIM115
        preexec_fn=raise_nofile,
    )
    service = Service(name, f"http://127.0.0.1:{port}/", proc, pid_file=prefix / f"{name}.pid")
    try:
        wait_http(service.url)
    except RuntimeError:
        service.stop()
        raise RuntimeError(
            f"nginx {name} did not start: " + (prefix / f"{name}.stderr").read_text()[-2000:]
        ) from None
    return service


PROXY_PROCESS = """\
import importlib.util, resource, signal, sys, time
name, port, upstream_port, nofile, module = sys.argv[1:6]
port, upstream_port = int(port), int(upstream_port)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if nofile == "max":
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
elif nofile != "inherit":
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(nofile), hard))
if module.endswith(".py"):
    spec = importlib.util.spec_from_file_location("proxy_under_test", module)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["proxy_under_test"] = mod
    spec.loader.exec_module(mod)
else:
    mod = importlib.import_module(module)
endpoint = mod.Endpoint(name, port)
endpoint.start()
endpoint.set_upstreams({"u": upstream_port})
print("nofile", soft, hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    time.sleep(3600)
"""


def start_dstackctl(
    prefix: Path, name: str, upstream_port: int, nofile: str, module: str, path: str = "/"
) -> tuple[Service, dict[str, int]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", PROXY_PROCESS, name, str(port), str(upstream_port), nofile, module],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=open(prefix / f"{name}.stderr", "wb"),  # noqa: SIM115
        preexec_fn=raise_nofile,  # the child then sets its own limit per `nofile`
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().split()
    if not line or line[0] != "nofile":
        proc.kill()
        raise RuntimeError(f"{name} did not start: " + (prefix / f"{name}.stderr").read_text()[-2000:])
    limits = {"inherited_soft": int(line[1]), "hard": int(line[2]), "soft": int(line[3])}
    service = Service(name, f"http://127.0.0.1:{port}/", proc)
    wait_http(f"http://127.0.0.1:{port}{path}")
    return service, limits


STREAM_SERVER = """\
import asyncio, resource, sys
import uvloop
from aiohttp import web
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port = int(sys.argv[1])
stats = {"open": 0, "peak_open": 0, "completed": 0, "started": 0}

async def stream(request):
    chunks = int(request.query.get("chunks", "5"))
    interval = float(request.query.get("interval", "1"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    stats["started"] += 1
    stats["open"] += 1
    stats["peak_open"] = max(stats["peak_open"], stats["open"])
    try:
        for i in range(chunks):
            await response.write(b"data: %d\\n\\n" % i)
            if i + 1 < chunks:
                await asyncio.sleep(interval)
        await response.write_eof()
        stats["completed"] += 1
    finally:
        stats["open"] -= 1
    return response

async def get_stats(request):
    return web.json_response(stats)

async def reset(request):
    stats.update(open=stats["open"], peak_open=stats["open"], completed=0, started=0)
    return web.json_response(stats)

async def main():
    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/stats", get_stats)
    app.router.add_get("/reset", reset)
    app.router.add_get("/", lambda r: web.Response(text="ok"))
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("ready", soft, hard, flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
"""


def start_stream_server(prefix: Path) -> tuple[Service, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", STREAM_SERVER, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=open(prefix / "stream-upstream.stderr", "wb"),  # noqa: SIM115
    )
    assert proc.stdout is not None
    if not proc.stdout.readline().startswith(b"ready"):
        proc.kill()
        raise RuntimeError(
            "stream upstream did not start: " + (prefix / "stream-upstream.stderr").read_text()
        )
    service = Service("stream-upstream", f"http://127.0.0.1:{port}/", proc)
    wait_http(service.url)
    return service, port


# --------------------------------------------------------------------------------------
# wrk

# Pauses are drawn uniformly from 0..2*pace ms (mean = pace) so the connections do not fall
# into lock-step and arrive as a burst every tick; wrk's timers have 1 ms resolution.
PACE_LUA = """\
-- generated by bench/proxy_bench.py: pause between a response and the next request
local pace = tonumber(os.getenv("PROXY_BENCH_PACE_MS") or "0")
function delay()
    return math.random(0, math.floor(2 * pace + 0.5))
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"cannot parse wrk time {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pct in ("50", "75", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)\s*$", out, re.M)
        if match:
            result[f"p{pct}_ms"] = _ms(match.group(1))
    match = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    result["rps"] = float(match.group(1)) if match else 0.0
    match = re.search(r"(\d+) requests in ", out)
    result["requests"] = int(match.group(1)) if match else 0
    errors = 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if match:
        errors += sum(int(x) for x in match.groups())
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if match:
        errors += int(match.group(1))
    result["errors"] = errors
    return result


@dataclass
class Profile:
    name: str
    connections: int
    pace_ms: float


@dataclass
class Sample:
    target: str
    profile: str
    round: int
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int
    target_cpu: float  # share of one core used by the proxy (all its processes)
    target_us_per_req: float  # the proxy's CPU time per request
    upstream_cpu: float
    wrk_cpu: float
    machine_busy: float  # share of the whole machine (all cores) busy, any process


def run_wrk(
    url: str, profile: Profile, duration: float, lua: Path, watch: list[Service], upstream: Service
) -> tuple[dict[str, Any], dict[str, float]]:
    argv = [WRK, "-t1", f"-c{profile.connections}", f"-d{duration:g}s", "--latency", "--timeout", "5s"]
    env = dict(os.environ)
    if profile.pace_ms > 0:
        argv += ["-s", str(lua)]
        env["PROXY_BENCH_PACE_MS"] = f"{profile.pace_ms:g}"
    argv.append(url)
    cpu0 = sum(s.cpu() for s in watch)
    up0 = upstream.cpu()
    busy0, total0 = machine_busy()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    busy1, total1 = machine_busy()
    target_cpu = sum(s.cpu() for s in watch) - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out}")
    parsed = parse_wrk(out)
    parsed["raw"] = out
    cpu = {
        "target_cpu": target_cpu / wall,
        "target_us_per_req": target_cpu / max(1, parsed["requests"]) * 1e6,
        "upstream_cpu": (upstream.cpu() - up0) / wall,
        "wrk_cpu": (usage.ru_utime + usage.ru_stime) / wall,
        "machine_busy": (busy1 - busy0) / max(1, total1 - total0),
    }
    return parsed, cpu


# --------------------------------------------------------------------------------------
# streams


async def _stream_client(url: str, count: int, chunks: int, interval: float) -> dict[str, Any]:
    import aiohttp

    expected = b"".join(b"data: %d\n\n" % i for i in range(chunks))
    first_chunk: list[float] = []
    durations: list[float] = []
    errors: dict[str, int] = {}
    incomplete = 0
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=chunks * interval + 60, sock_connect=30)
    gate = asyncio.Event()

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal incomplete
        await gate.wait()
        start = time.perf_counter()
        first: float | None = None
        body = b""
        try:
            async with session.get(url) as response:
                if response.status != 200:
                    key = f"HTTP {response.status}"
                    errors[key] = errors.get(key, 0) + 1
                    await response.read()
                    return
                async for data in response.content.iter_any():
                    if first is None and data:
                        first = time.perf_counter() - start
                    body += data
        except Exception as exc:
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            return
        if body != expected:
            incomplete += 1
            return
        assert first is not None
        first_chunk.append(first * 1000)
        durations.append(time.perf_counter() - start)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.ensure_future(one(session)) for _ in range(count)]
        await asyncio.sleep(0.1)
        gate.set()  # all at once: the harshest case for accept backlogs and the first chunk
        await asyncio.gather(*tasks)
    return {
        "ok": len(first_chunk),
        "incomplete": incomplete,
        "errors": errors,
        "first_chunk_ms": first_chunk,
        "durations_s": durations,
    }


def run_streams(prefix: Path, args: argparse.Namespace, label: str, module: str | None) -> dict[str, Any]:
    """Streams through Endpoint from `module`, or straight to the stream server when it is None."""
    upstream, upstream_port = start_stream_server(prefix)
    proxy = None
    try:
        if module is None:  # the baseline: what the client and the stream server alone take
            served, limits = upstream, None
        else:
            proxy, limits = start_dstackctl(
                prefix, f"{label}-streams", upstream_port, args.proxy_nofile, module
            )
            served = proxy
        pid = served.proc.pid
        base = served.url.rstrip("/")
        url = f"{base}/stream?chunks={args.stream_chunks}&interval={args.stream_interval:g}"
        # warm the path once, then reset the upstream's counters
        urllib.request.urlopen(f"{base}/stream?chunks=1", timeout=10).read()
        urllib.request.urlopen(upstream.url + "reset", timeout=10).read()
        rss_idle = proc_status_kb(pid, "VmRSS")
        fds_idle = proc_fd_count(pid)
        peak = {"rss": rss_idle or 0, "fds": fds_idle or 0}
        cpu0 = served.cpu()
        stop = False

        async def sampler() -> None:
            while not stop:
                rss = proc_status_kb(pid, "VmRSS")
                fds = proc_fd_count(pid)
                if rss:
                    peak["rss"] = max(peak["rss"], rss)
                if fds:
                    peak["fds"] = max(peak["fds"], fds)
                await asyncio.sleep(0.1)

        async def main() -> dict[str, Any]:
            nonlocal stop
            task = asyncio.ensure_future(sampler())
            try:
                return await _stream_client(url, args.streams, args.stream_chunks, args.stream_interval)
            finally:
                stop = True
                await task

        start = time.perf_counter()
        try:
            import uvloop

            result = uvloop.run(main())
        except ImportError:  # pragma: no cover
            result = asyncio.run(main())
        wall = time.perf_counter() - start
        cpu = served.cpu() - cpu0
        with urllib.request.urlopen(upstream.url + "stats", timeout=10) as response:
            upstream_stats = json.loads(response.read())
        first = result.pop("first_chunk_ms")
        durations = result.pop("durations_s")
        proxy_alive = served.proc.poll() is None
        hwm = proc_status_kb(pid, "VmHWM")
        stderr_file = prefix / ("stream-upstream.stderr" if proxy is None else f"{label}-streams.stderr")
        stderr_tail = stderr_file.read_text(errors="replace")[-1500:]
        summary = {
            "target": label,
            **result,
            "streams": args.streams,
            "chunks": args.stream_chunks,
            "interval_s": args.stream_interval,
            "first_chunk_p50_ms": round(_pct(first, 50), 1) if first else None,
            "first_chunk_p99_ms": round(_pct(first, 99), 1) if first else None,
            "first_chunk_max_ms": round(max(first), 1) if first else None,
            "duration_p50_s": round(_pct(durations, 50), 2) if durations else None,
            "duration_max_s": round(max(durations), 2) if durations else None,
            "upstream_peak_open": upstream_stats["peak_open"],
            "upstream_completed": upstream_stats["completed"],
            "proxy_rss_idle_mb": round((rss_idle or 0) / 1024, 1),
            "proxy_rss_peak_mb": round(max(peak["rss"], hwm or 0) / 1024, 1),
            "proxy_fds_idle": fds_idle,
            "proxy_fds_peak": peak["fds"],
            "proxy_cpu_share": round(cpu / wall, 3),
            "proxy_nofile": limits,
            "proxy_alive": proxy_alive,
            "proxy_stderr_tail": stderr_tail,
            "wall_s": round(wall, 2),
        }
        summary["passed"] = (
            summary["ok"] == args.streams
            and not summary["errors"]
            and summary["incomplete"] == 0
            and summary["upstream_peak_open"] >= args.streams
            and proxy_alive
        )
        return summary
    finally:
        if proxy is not None:
            proxy.stop()
        upstream.stop()


# --------------------------------------------------------------------------------------
# summary


def _pct(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _median(values: Any) -> float:
    return float(statistics.median(list(values)))


def summarise_load(
    samples: list[Sample], targets: list[str], profiles: list[Profile]
) -> list[dict[str, Any]]:
    rows = []
    for profile in profiles:
        direct = {s.round: s for s in samples if s.target == "direct" and s.profile == profile.name}
        nginx = {s.round: s for s in samples if s.target == "nginx-w1" and s.profile == profile.name}
        for target in targets:
            mine = [s for s in samples if s.target == target and s.profile == profile.name]
            if not mine:
                continue
            row: dict[str, Any] = {
                "profile": profile.name,
                "target": target,
                "p50_ms": round(_median(s.p50_ms for s in mine), 3),
                "p99_ms": round(_median(s.p99_ms for s in mine), 3),
                "rps": round(_median(s.rps for s in mine)),
                "rps_min": round(min(s.rps for s in mine)),
                "rps_max": round(max(s.rps for s in mine)),
                "errors": sum(s.errors for s in mine),
                "target_cpu": round(_median(s.target_cpu for s in mine), 2),
                "target_us_per_req": round(_median(s.target_us_per_req for s in mine), 1),
                "upstream_cpu": round(_median(s.upstream_cpu for s in mine), 2),
                "wrk_cpu": round(_median(s.wrk_cpu for s in mine), 2),
                "machine_busy": round(_median(s.machine_busy for s in mine), 2),
            }
            paired = [s for s in mine if s.round in direct]
            if target != "direct" and paired:
                # paired per round: the same round's direct run is the reference
                row["added_p50_ms"] = round(_median(s.p50_ms - direct[s.round].p50_ms for s in paired), 3)
                row["added_p99_ms"] = round(_median(s.p99_ms - direct[s.round].p99_ms for s in paired), 3)
            paired = [s for s in mine if s.round in nginx and nginx[s.round].rps]
            if target not in ("direct", "nginx-w1") and paired:
                row["rps_vs_nginx_w1"] = round(_median(s.rps / nginx[s.round].rps for s in paired), 3)
            rows.append(row)
    return rows


def verdicts(rows: list[dict[str, Any]], streams: list[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    by = {(r["profile"], r["target"]): r for r in rows}
    moderate = by.get(("moderate", target))
    if moderate is not None and "added_p50_ms" in moderate:
        out.append(
            {
                "target": f"{target} added p50 at moderate load <= {TARGET_ADDED_P50_MS:g} ms",
                "value": f"{moderate['added_p50_ms']:+.3f} ms (p50 {moderate['p50_ms']:.3f} ms vs direct "
                f"{by[('moderate', 'direct')]['p50_ms']:.3f} ms; "
                f"added p99 {moderate['added_p99_ms']:+.3f} ms)",
                "passed": moderate["added_p50_ms"] <= TARGET_ADDED_P50_MS and moderate["errors"] == 0,
            }
        )
    mine, nginx = by.get(("throughput", target)), by.get(("throughput", "nginx-w1"))
    if mine is not None and nginx is not None and nginx["rps"]:
        ratio = mine["rps"] / nginx["rps"]
        cpu_ratio = nginx["target_us_per_req"] / mine["target_us_per_req"] if mine["target_us_per_req"] else 0
        out.append(
            {
                "target": f"{target} throughput >= {TARGET_THROUGHPUT_RATIO:g} x nginx (1 worker)",
                "value": f"{ratio:.2f} ({mine['rps']} vs {nginx['rps']} req/s, medians; per-round ratios "
                f"median {mine.get('rps_vs_nginx_w1', 0):.2f}); "
                f"CPU per request {mine['target_us_per_req']:.0f}"
                f" vs {nginx['target_us_per_req']:.0f} us = {cpu_ratio:.2f} of nginx's capacity per core",
                "passed": ratio >= TARGET_THROUGHPUT_RATIO and mine["errors"] == 0,
            }
        )
    for st in streams:
        if st["target"] != target:
            continue
        out.append(
            {
                "target": f"{st['streams']} concurrent streams through {target}, 0 errors",
                "value": f"{st['ok']}/{st['streams']} complete with all {st['chunks']} chunks, errors "
                f"{st['errors'] or 0}, incomplete {st['incomplete']}, upstream peak open "
                f"{st['upstream_peak_open']}",
                "passed": st["passed"],
            }
        )
    return out


def _table(header: tuple[str, ...], lines: list[tuple[str, ...]], left: int = 2) -> list[str]:
    lines = [header, *lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]


def render(summary: dict[str, Any]) -> str:
    out: list[str] = []
    rows = summary["load"]
    cfg = summary["config"]
    if rows:
        header = (
            "profile",
            "target",
            "p50 ms",
            "p99 ms",
            "+p50 ms",
            "+p99 ms",
            "req/s",
            "req/s range",
            "vs ngx-w1",
            "err",
            "proxy cpu",
            "us/req",
            "upstr cpu",
            "wrk cpu",
            "machine",
        )
        lines: list[tuple[str, ...]] = []
        for r in rows:
            proxy = r["target"] != "direct"
            lines.append(
                (
                    r["profile"],
                    r["target"],
                    f"{r['p50_ms']:.3f}",
                    f"{r['p99_ms']:.3f}",
                    f"{r['added_p50_ms']:+.3f}" if proxy else "",
                    f"{r['added_p99_ms']:+.3f}" if proxy else "",
                    f"{r['rps']}",
                    f"{r['rps_min']}-{r['rps_max']}",
                    f"{r['rps_vs_nginx_w1']:.2f}" if "rps_vs_nginx_w1" in r else "",
                    str(r["errors"]),
                    f"{r['target_cpu']:.0%}" if proxy else "",
                    f"{r['target_us_per_req']:.0f}" if proxy else "",
                    f"{r['upstream_cpu']:.0%}",
                    f"{r['wrk_cpu']:.0%}",
                    f"{r['machine_busy']:.0%}",
                )
            )
        out.extend(_table(header, lines))
        out.append(
            f"medians of {cfg['rounds']} interleaved rounds of {cfg['duration_s']:g}s; +p50/+p99 = median "
            f"over rounds of (target - direct, same round); vs ngx-w1 = median of per-round req/s ratios; "
            f"wrk -t1; moderate = -c{cfg['moderate_connections']}, random pause 0-{2 * cfg['pace_ms']:g} ms "
            f"per connection between requests; throughput = -c{cfg['throughput_connections']}; "
            f"proxy cpu = share of one core (all the proxy's processes), us/req = proxy CPU time per "
            f"request; machine = share of all {os.cpu_count()} cores busy (any process)"
        )
    for st in summary["streams"]:
        out.append("")
        out.append(
            f"streams via {st['target']}: {st['ok']}/{st['streams']} complete ({st['chunks']} chunks, "
            f"{st['interval_s']:g}s apart), errors {st['errors'] or 0}, incomplete {st['incomplete']}, "
            f"upstream peak open {st['upstream_peak_open']}"
        )
        out.append(
            f"  time to first chunk p50 {st['first_chunk_p50_ms']} ms, p99 {st['first_chunk_p99_ms']} ms, "
            f"max {st['first_chunk_max_ms']} ms; stream duration p50 {st['duration_p50_s']} s, "
            f"max {st['duration_max_s']} s"
        )
        lim = st["proxy_nofile"]
        who = "stream server (no proxy)" if lim is None else "proxy"
        out.append(
            f"  {who} RSS idle {st['proxy_rss_idle_mb']} MB, peak {st['proxy_rss_peak_mb']} MB; "
            f"open fds idle {st['proxy_fds_idle']}, peak {st['proxy_fds_peak']}; "
            + (
                ""
                if lim is None
                else f"RLIMIT_NOFILE soft {lim['soft']} (inherited {lim['inherited_soft']}, "
                f"hard {lim['hard']}); "
            )
            + f"cpu {st['proxy_cpu_share']:.0%} of one core{'' if st['proxy_alive'] else '; DIED'}"
        )
        if not st["passed"] and st["proxy_stderr_tail"].strip():
            out.append("  proxy stderr: " + st["proxy_stderr_tail"].strip().splitlines()[-1][:300])
    out.append("")
    for v in summary["verdicts"]:
        out.append(f"{'PASS' if v['passed'] else 'FAIL'}  {v['target']}: {v['value']}")
    for v in summary["whatif_verdicts"]:
        out.append(f"{'pass' if v['passed'] else 'fail'}  (what-if, not counted) {v['target']}: {v['value']}")
    env = summary["environment"]
    out.append("")
    out.append(
        f"machine: {env['cpus']} cpus; load average {env['loadavg_start']} at start, {env['loadavg_end']} "
        f"at end; {env['nginx']}, {env['wrk']}, python {env['python']}; this process's RLIMIT_NOFILE "
        f"(soft, hard) was {tuple(env['nofile_before'])}, raised to {tuple(env['nofile_after'])}"
    )
    out.extend(f"note: {n}" for n in summary["notes"])
    return "\n".join(out)


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed wrk seconds per target first")
    parser.add_argument("--moderate-connections", type=int, default=4)
    parser.add_argument("--pace-ms", type=float, default=4.0, help="mean pause per connection (moderate)")
    parser.add_argument("--throughput-connections", type=int, default=50)
    parser.add_argument("--no-nginx-auto", action="store_true", help="skip nginx worker_processes auto")
    parser.add_argument(
        "--proxy-module",
        default="dstackctl.proxy",
        help="module or .py file providing Endpoint for the 'dstackctl' target",
    )
    parser.add_argument(
        "--whatif",
        action="append",
        default=[],
        metavar="FILE.py",
        help="also measure Endpoint from this file in the "
        "same interleaved rounds, as target 'whatif:<stem>'; not counted in the verdict",
    )
    parser.add_argument(
        "--proxy-nofile",
        default="max",
        help="the proxy processes' soft RLIMIT_NOFILE: max (= hard limit), inherit, or N",
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--stream-chunks", type=int, default=6)
    parser.add_argument("--stream-interval", type=float, default=1.0)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-streams", action="store_true")
    parser.add_argument(
        "--profile-out",
        metavar="FILE",
        help="py-spy record the dstackctl proxy during one extra throughput run "
        "(.svg flame graph, or .txt collapsed stacks); needs py-spy in the venv",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    for tool in (NGINX, WRK):
        if not Path(tool).exists():
            print(f"{tool} not found (apt-get install nginx wrk)", file=sys.stderr)
            return 2
    modules = {"dstackctl": args.proxy_module}
    for path in args.whatif:
        modules[f"whatif:{Path(path).stem}"] = path
    modules = {k: str(Path(v).resolve()) if v.endswith(".py") else v for k, v in modules.items()}
    nofile_before = resource.getrlimit(resource.RLIMIT_NOFILE)
    raise_nofile()
    notes: list[str] = []
    if modules["dstackctl"] != "dstackctl.proxy":
        notes.append(f"target 'dstackctl' is Endpoint from {modules['dstackctl']}")
    env = {
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
        "nofile_before": list(nofile_before),
        "nofile_after": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "nginx": subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip(),
        "wrk": subprocess.run([WRK, "--version"], capture_output=True, text=True)
        .stdout.split(" [")[0]
        .strip(),
        "python": sys.version.split()[0],
    }
    prefix = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    os.chmod(prefix, 0o755)  # nginx workers may run as another user
    (prefix / "www").mkdir()
    (prefix / "www" / "index.txt").write_bytes(BODY)
    lua = prefix / "pace.lua"
    lua.write_text(PACE_LUA)
    services: list[Service] = []
    profiles = [
        Profile("moderate", args.moderate_connections, args.pace_ms),
        Profile("throughput", args.throughput_connections, 0.0),
    ]
    samples: list[Sample] = []
    streams: list[dict[str, Any]] = []
    targets: list[str] = []
    try:
        if not args.skip_load:
            up_port = free_port()
            upstream = start_nginx(
                prefix, "upstream", "1", NGINX_UPSTREAM_HTTP.format(port=up_port, prefix=prefix), up_port
            )
            services.append(upstream)
            endpoints: dict[str, Service] = {"direct": upstream}
            for name, workers in (("nginx-w1", "1"), ("nginx-auto", "auto")):
                if name == "nginx-auto" and args.no_nginx_auto:
                    continue
                port = free_port()
                endpoints[name] = start_nginx(
                    prefix, name, workers, NGINX_PROXY_HTTP.format(port=port, upstream_port=up_port), port
                )
                services.append(endpoints[name])
            for label, module in modules.items():
                proxy, _ = start_dstackctl(
                    prefix, label.replace(":", "-"), up_port, args.proxy_nofile, module
                )
                services.append(proxy)
                endpoints[label] = proxy
                with urllib.request.urlopen(proxy.url, timeout=5) as response:
                    if response.read() != BODY:
                        raise RuntimeError(f"{label} returned a different body")
            targets = list(endpoints)
            for service in endpoints.values():
                for profile in profiles:
                    run_wrk(service.url, profile, args.warmup, lua, [service], upstream)
            for rnd in range(args.rounds):
                for profile in profiles:
                    for name, service in endpoints.items():
                        watch = [] if name == "direct" else [service]
                        parsed, cpu = run_wrk(service.url, profile, args.duration, lua, watch, upstream)
                        sample = Sample(
                            name,
                            profile.name,
                            rnd,
                            parsed.get("p50_ms", float("nan")),
                            parsed.get("p99_ms", float("nan")),
                            parsed["rps"],
                            parsed["errors"],
                            **cpu,
                        )
                        samples.append(sample)
                        print(
                            f"round {rnd + 1}/{args.rounds} {profile.name:10} {name:22} "
                            f"p50 {sample.p50_ms:7.3f} ms  p99 {sample.p99_ms:7.3f} ms  "
                            f"{sample.rps:7.0f} req/s  err {sample.errors}  "
                            f"cpu {sample.target_cpu:4.0%} {sample.target_us_per_req:5.0f} us/req  machine "
                            f"{sample.machine_busy:4.0%}  load {loadavg()}",
                            file=sys.stderr,
                            flush=True,
                        )
            if args.profile_out:
                notes.append(profile_proxy(endpoints["dstackctl"], profiles[1], args, lua, upstream))
            for service in reversed(services):
                service.stop()
            services.clear()
        if not args.skip_streams:
            stream_targets: dict[str, str | None] = {"direct": None, **modules}
            for label, module in stream_targets.items():
                streams.append(run_streams(prefix, args, label.replace(":", "-"), module))
                streams[-1]["target"] = label
                print(
                    f"streams via {label}: {streams[-1]['ok']}/{args.streams} ok, errors "
                    f"{streams[-1]['errors']}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for service in reversed(services):
            service.stop()
        if args.keep:
            notes.append(f"kept {prefix}")
        else:
            shutil.rmtree(prefix, ignore_errors=True)

    env["loadavg_end"] = loadavg()
    notes.append(
        "the machine is shared: 'machine' is the share of all cores busy during each run (/proc/stat); "
        "what proxy + upstream + wrk do not account for is other load. us/req (CPU time per request) is "
        "the figure least sensitive to that load"
    )
    rows = summarise_load(samples, targets, profiles)
    summary: dict[str, Any] = {
        "schema": 1,
        "config": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "moderate_connections": args.moderate_connections,
            "pace_ms": args.pace_ms,
            "throughput_connections": args.throughput_connections,
            "modules": modules,
            "proxy_nofile": args.proxy_nofile,
            "nginx_proxy_workers": {"nginx-w1": 1, "nginx-auto": "auto"},
            "upstream": f"nginx worker_processes 1, static file of {len(BODY)} bytes",
            "streams": args.streams,
        },
        "environment": env,
        "load": rows,
        "streams": streams,
        "notes": notes,
    }
    summary["verdicts"] = verdicts(rows, streams, "dstackctl")
    summary["whatif_verdicts"] = [
        v for label in modules if label != "dstackctl" for v in verdicts(rows, streams, label)
    ]
    summary["passed"] = bool(summary["verdicts"]) and all(v["passed"] for v in summary["verdicts"])
    if args.json:
        summary["samples"] = [s.__dict__ for s in samples]
        print(json.dumps(summary, indent=2))
    else:
        print(render(summary))
    return 0 if summary["passed"] else 1


def profile_proxy(
    proxy: Service, profile: Profile, args: argparse.Namespace, lua: Path, upstream: Service
) -> str:
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        return "py-spy not found in the venv: no profile"
    out = Path(args.profile_out).resolve()
    spy = subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(proxy.proc.pid),
            "--duration",
            f"{int(args.duration)}",
            "--rate",
            "250",
            "--nonblocking",
            "--output",
            str(out),
            *(["--format", "raw"] if out.suffix == ".txt" else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    parsed, _ = run_wrk(proxy.url, profile, args.duration, lua, [proxy], upstream)
    spy.wait(args.duration + 30)
    return f"py-spy profile of 'dstackctl' under {profile.name} load ({parsed['rps']:.0f} req/s) -> {out}"


if __name__ == "__main__":
    sys.exit(main())
