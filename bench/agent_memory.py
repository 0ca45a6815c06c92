"""Agent memory: what one running service costs in memory, next to nginx proxying the same replicas.

For each --replicas count, starts one service (the test image's httpd, an http probe every 1 s)
with `dstackctl run -d` in its own DSTACKCTL_HOME, sends --requests GETs through its endpoint
(so the endpoint's request path has run), and reads from /proc/PID/smaps_rollup, for the agent
and its supervisor: RSS, PSS (shared pages split among the processes that map them) and USS
(pages private to the process). The peer, measured in the same round: Debian's nginx, one
worker, proxying to the same replica ports (master + worker summed).

Target (issue 17): the agent's RSS at most 40 MiB. The per-service cost is the PSS of agent
plus supervisor: their shared pages (the supervisor forks the agent) count once.

    .venv/bin/python bench/agent_memory.py [--replicas 2,8] [--requests 200] [--json]

Needs dockerd and dstackctl-testsrv:latest. Exit status: 0 when the target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _report import compile_package, load_average
from autoscale import IMAGE, free_port, progress
from proxy_bench import NGINX
from soak import BenchError, Service, removed_on_exit

from dstackctl.store import STATE

TARGET_RSS_MIB = 40.0
SERVICE = """type: service
name: {name}
image: {image}
port: "{port}:8000"
replicas: {replicas}
commands: ["exec httpd -f -p 8000 -h /www"]
probes: [{{type: http, url: /cgi-bin/health, interval: 1s}}]
"""
NGINX_CONF = """daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream replicas {{ {servers} keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://replicas; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
}}
"""


def memory_of(pid: int) -> dict[str, float]:
    """RSS, PSS and USS of a live process, in MiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    kib = {"rss": fields["Rss"], "pss": fields["Pss"], "uss": uss}
    return {key: round(value / 1024, 1) for key, value in kib.items()}


def children_of(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in found.read_text().split()] if found.exists() else []


def get_many(port: int, count: int) -> int:
    """GET / `count` times through 127.0.0.1:port; the number that failed."""
    failed = 0
    for _ in range(count):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                response.read()
        except OSError:
            failed += 1
    return failed


def replica_ports(service: Service) -> list[int]:
    state = service.store.read(service.name, STATE) or {}
    return [int(row["host_port"]) for row in state.get("replicas", []) if row.get("host_port")]


def nginx_memory(ports: list[int], requests: int) -> dict[str, float]:
    """Start nginx (one worker) proxying to `ports`, send it `requests`, sum master + worker."""
    prefix = Path(tempfile.mkdtemp(prefix="agent-memory-nginx-"))
    port = free_port()
    servers = " ".join(f"server 127.0.0.1:{p};" for p in ports)
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, user=user, servers=servers, port=port))
    process = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(prefix)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while get_many(port, 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        failed = get_many(port, requests)
        if failed:
            raise BenchError(f"nginx failed {failed} of {requests} requests")
        pids = [process.pid, *children_of(process.pid)]
        shares = [memory_of(pid) for pid in pids]
        return {key: round(sum(s[key] for s in shares), 1) for key in ("rss", "pss", "uss")}
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(prefix, ignore_errors=True)


def measure(replicas: int, requests: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="agent-memory-"))
    service = Service(home, f"mem{replicas}")
    text = SERVICE.format(name=service.name, image=IMAGE, port=service.port, replicas=replicas)
    service.file.write_text(text)
    try:
        with removed_on_exit(service):
            progress(f"{replicas} replicas: run -d")
            agent = service.start()
            supervisor = service.supervisor(agent)
            failed = get_many(service.port, requests)
            if failed:
                raise BenchError(f"the endpoint failed {failed} of {requests} requests")
            time.sleep(3)  # a few probe rounds and state writes after the requests
            result: dict[str, Any] = {"replicas": replicas, "agent": memory_of(agent)}
            if supervisor is not None:
                result["supervisor"] = memory_of(supervisor)
                result["service_pss"] = round(result["agent"]["pss"] + result["supervisor"]["pss"], 1)
            progress(f"{replicas} replicas: nginx on the same replicas")
            result["nginx"] = nginx_memory(replica_ports(service), requests)
            return result
    finally:
        service.remove()
        shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--replicas", default="2,8", help="comma-separated replica counts")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    compile_package()
    before = load_average()
    rows = [measure(int(n), args.requests) for n in args.replicas.split(",")]
    passed = all(row["agent"]["rss"] <= TARGET_RSS_MIB for row in rows)
    if args.json:
        after = load_average()
        print(json.dumps({"load_before": before, "load_after": after, "rows": rows, "passed": passed}))
        return 0 if passed else 1
    print("replicas  agent RSS/PSS/USS MiB  supervisor RSS/PSS/USS  service PSS  nginx RSS/PSS/USS")
    for row in rows:
        a, s, n = row["agent"], row.get("supervisor", {}), row["nginx"]
        trio = "{rss}/{pss}/{uss}".format
        print(
            f"{row['replicas']:>8}  {trio(**a):>21}  {trio(**s) if s else '-':>22}  "
            f"{row.get('service_pss', '-'):>11}  {trio(**n):>17}"
        )
    print(f"target: agent RSS <= {TARGET_RSS_MIB:g} MiB -> {'PASS' if passed else 'FAIL'}")
    print(f"load average before: {before}, after: {load_average()}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
