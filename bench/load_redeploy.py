"""Load through the service endpoint across a rolling redeploy (issue: hardening, item 6).

Starts a 2-replica service of the test image, then drives the endpoint with wrk for
--seconds (default 60) with --connections concurrent connections; --redeploy-at seconds in,
`dstackctl redeploy -f` rolls it to a changed config. Reports requests/s, latency p50/p99,
wrk's socket errors and non-2xx responses, and whether the redeploy succeeded. Target: zero
failed requests.

    .venv/bin/python bench/load_redeploy.py [--seconds 60] [--connections 64] [--json]

Needs dockerd, wrk (Debian's `wrk`) and dstackctl-testsrv:latest; uses its own DSTACKCTL_HOME.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DSTACKCTL = str(Path(sys.executable).parent / "dstackctl")
SERVICE = """type: service
name: loadsvc
image: dstackctl-testsrv:latest
env:
  - DEPLOYMENT_TAG={tag}
commands:
  - httpd -f -p 8000 -h /www
port: "{port}:8000"
replicas: 2
probes:
  - {{type: http, url: /cgi-bin/health, interval: 1s}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse_wrk(text: str) -> dict[str, float]:
    def latency_ms(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    requests = re.search(r"(\d+) requests in", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "requests": float(requests.group(1)) if requests else 0.0,
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_ms": latency_ms("50"),
        "p99_ms": latency_ms("99"),
        "socket_errors": float(sum(int(x) for x in errors.groups())) if errors else 0.0,
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--redeploy-at", type=float, default=15.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("load_redeploy: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    home = Path(tempfile.mkdtemp(prefix="dstackctl-load-"))
    env = {**os.environ, "DSTACKCTL_HOME": str(home)}
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="dstackctl-load-cfg-"))
    v1, v2 = work / "v1.dstack.yml", work / "v2.dstack.yml"
    v1.write_text(SERVICE.format(tag="v1", port=port))
    v2.write_text(SERVICE.format(tag="v2", port=port))
    redeploy: dict[str, object] = {}
    try:
        subprocess.run([DSTACKCTL, "run", "-d", "--timeout", "2m", str(v1)], env=env, check=True)

        def roll() -> None:
            time.sleep(args.redeploy_at)
            started = time.monotonic()
            result = subprocess.run(
                [DSTACKCTL, "redeploy", "loadsvc", "-f", str(v2), "--timeout", "2m"],
                env=env,
                capture_output=True,
                text=True,
            )
            redeploy.update(
                exit_code=result.returncode,
                seconds=round(time.monotonic() - started, 2),
                stderr_tail=result.stderr.strip().splitlines()[-1:] or [""],
            )

        roller = threading.Thread(target=roll)
        roller.start()
        wrk = subprocess.run(
            [
                "wrk",
                "-t2",
                f"-c{args.connections}",
                f"-d{args.seconds}s",
                "--timeout",
                "10s",
                "--latency",
                f"http://127.0.0.1:{port}/cgi-bin/whoami",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        roller.join()
        after = subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{port}/cgi-bin/whoami"], capture_output=True, text=True
        ).stdout.strip()
    finally:
        subprocess.run([DSTACKCTL, "stop", "--all"], env=env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    stats = parse_wrk(wrk.stdout)
    failed = int(stats["socket_errors"] + stats["non_2xx"])
    passed = failed == 0 and redeploy.get("exit_code") == 0 and after.endswith("v2")
    report = {
        "seconds": args.seconds,
        "connections": args.connections,
        **stats,
        "failed": failed,
        "redeploy": redeploy,
        "after_redeploy_answer": after,
        "load_average": os.getloadavg(),
        "result": "PASS" if passed else "FAIL",
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"load through the endpoint for {args.seconds}s, {args.connections} connections, wrk -t2")
        print(f"  requests {int(stats['requests'])}, {stats['rps']:.0f}/s")
        print(f"  latency p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms")
        errors, non_2xx = int(stats["socket_errors"]), int(stats["non_2xx"])
        print(f"  failed: {failed} (socket errors {errors}, non-2xx {non_2xx})")
        exit_code, took = redeploy.get("exit_code"), redeploy.get("seconds")
        print(f"  redeploy at {args.redeploy_at:g}s: exit {exit_code} in {took}s")
        print(f"  answer after: {after!r}; load average {os.getloadavg()[0]:.2f}")
        print(report["result"])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
