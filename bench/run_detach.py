"""`run -d` benchmark: 8 replicas through dstackctl next to 8 parallel ``docker run -d``.

Each round does both, in alternating order so drift and caches hit both alike:

- dstackctl: ``dstackctl run -d FILE`` of a generated 8-replica service of the test image
  (a unique name and its own DSTACKCTL_HOME per round), timed until the command returns,
  which it does once all 8 replicas are running; then ``dstackctl stop NAME`` (not timed).
- docker: 8 ``docker run -d --init -p 127.0.0.1::8000 IMAGE httpd -f -p 8000 -h /www``
  started at once, timed until all 8 commands returned; then ``docker rm -f`` (not timed).

A warm-up round is not counted. Target: the median of dstackctl is at most 1.3x the median of
docker. For every dstackctl round the agent's log (timestamps of "agent started" and of each
"replica N started") splits the time into phases: CLI until the agent is up, the agent
creating containers, and the CLI noticing that all are running.

    .venv/bin/python bench/run_detach.py [--runs 5] [--replicas 8] [--json] [--keep-homes]

Containers are always removed, also on failure or Ctrl-C: the docker ones carry a label
unique to this invocation, the dstackctl ones a name prefix unique to it.
Exit status: 0 when the target is met, 1 otherwise (or when a round failed).
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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from _report import compile_package, load_average

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE = "dstackctl-testsrv:latest"
COMMAND = ["httpd", "-f", "-p", "8000", "-h", "/www"]
TARGET_RATIO = 1.3
BENCH_LABEL = "dstackctl-bench"
DOCKER = shutil.which("docker") or "docker"
DSTACKCTL = str(Path(sys.executable).parent / "dstackctl")
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (.*)$")


class BenchError(Exception):
    pass


@dataclass
class Round:
    index: int
    dstackctl_s: float | None = None
    docker_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([DOCKER, *args], capture_output=True, text=True, check=False)
    if check and done.returncode:
        raise BenchError(f"docker {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _ids(*filters: str, running_only: bool = False) -> list[str]:
    args = ["ps", "-q", "--no-trunc"] + ([] if running_only else ["-a"])
    for item in filters:
        args += ["--filter", item]
    return _docker(*args, check=False).stdout.split()


def _remove(ids: list[str]) -> None:
    if ids:
        _docker("rm", "-f", *ids, check=False)


# --- the dstackctl side ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_file(folder: Path, name: str, replicas: int) -> Path:
    """No probes (a replica is ready once running, like `docker run -d`); the service's
    endpoint on a free port, so that rounds and other users of the engine do not collide."""
    path = folder / f"{name}.dstack.yml"
    path.write_text(
        "type: service\n"
        f"name: {name}\n"
        f"image: {IMAGE}\n"
        "commands:\n"
        f"  - {' '.join(COMMAND)}\n"
        f'port: "{_free_port()}:8000"\n'
        f"replicas: {replicas}\n"
    )
    return path


def _agent_phases(log: Path, launched: float, returned: float, replicas: int) -> dict[str, float]:
    """Seconds from the launch of `run -d` to the agent's milestones, from agent.log."""
    started: float | None = None
    replica_times: list[float] = []
    for line in log.read_text(errors="replace").splitlines():
        match = _LOG_LINE.match(line)
        if not match:
            continue
        moment = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        message = match.group(2)
        if message.startswith("agent for ") and " started (pid " in message and started is None:
            started = moment
        elif re.match(r"replica=?\d+ (\(deployment \d+\) )?started as ", message):
            replica_times.append(moment)
    phases: dict[str, float] = {"total": returned - launched}
    if started is not None:
        phases["cli+agent start"] = started - launched
    if started is not None and replica_times:
        phases["first replica up"] = min(replica_times) - started
        phases["containers"] = max(replica_times) - started
    if replica_times:
        phases["cli notices"] = returned - max(replica_times)
    if len(replica_times) != replicas:
        phases["replicas logged"] = float(len(replica_times))
    return phases


def run_dstackctl(root: Path, name: str, replicas: int, round_: Round, cli: list[str] | None = None) -> None:
    """Time `run -d` (through `cli`, default the dstackctl script); always stop it after."""
    home = root / name
    home.mkdir()
    path = service_file(root, name, replicas)
    env = {**os.environ, "DSTACKCTL_HOME": str(home)}
    launched = time.time()
    start = time.perf_counter()
    done = subprocess.run(
        [*(cli or [DSTACKCTL]), "run", "-d", str(path)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    returned = time.time()
    try:
        if done.returncode:
            raise BenchError(
                f"dstackctl run -d {name} exited {done.returncode}: {done.stderr.strip()[-500:]}"
            )
        running = _ids(f"name=dstackctl-{name}-", "status=running", running_only=True)
        if len(running) != replicas:
            raise BenchError(f"dstackctl run -d {name} returned with {len(running)} of {replicas} running")
        round_.dstackctl_s = elapsed
        log = home / "services" / name / "agent.log"
        if log.exists():
            round_.phases = _agent_phases(log, launched, returned, replicas)
    finally:
        stop_dstackctl(home, name)


def stop_dstackctl(home: Path, name: str) -> None:
    """`dstackctl stop`; then make sure no agent of this home and no container is left."""
    env = {**os.environ, "DSTACKCTL_HOME": str(home)}
    subprocess.run([DSTACKCTL, "stop", name], env=env, capture_output=True, check=False, timeout=120)
    pid = _agent_of(home, name)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # an agent this benchmark started that outlived `stop`
    _remove(_ids(f"name=dstackctl-{name}-"))


def _agent_of(home: Path, name: str) -> int | None:
    """The pid of the live agent of `name` in `home` (checked against its command line)."""
    state = home / "services" / name / "state.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        pid = int(json.loads(state.read_text())["agent"]["pid"])
        # The agent's title (agent/process.py): `dstackctl-agent NAME --home HOME`.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if f"dstackctl-agent {name} --home {home}".encode() in cmdline:
            return pid
    return None


# --- the docker side ------------------------------------------------------------------------


def run_docker(label: str, replicas: int, round_: Round) -> None:
    argv = [
        DOCKER, "run", "-d", "--init", "-p", "127.0.0.1::8000",
        "--label", f"{BENCH_LABEL}={label}", IMAGE, *COMMAND,
    ]  # fmt: skip
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(replicas)
    ]
    results = [process.communicate() for process in processes]
    elapsed = time.perf_counter() - start
    try:
        failed = [
            err.strip() for process, (_, err) in zip(processes, results, strict=True) if process.returncode
        ]
        if failed:
            raise BenchError(f"{len(failed)} docker run -d failed: {failed[0]}")
        running = _ids(f"label={BENCH_LABEL}={label}", "status=running", running_only=True)
        if len(running) != replicas:
            raise BenchError(f"docker run -d: {len(running)} of {replicas} running")
        round_.docker_s = elapsed
    finally:
        _remove(_ids(f"label={BENCH_LABEL}={label}"))


# --- rounds ---------------------------------------------------------------------------------


@contextlib.contextmanager
def cleanup_on_exit(token: str, root: Path) -> Iterator[None]:
    """Remove every container of this invocation, whatever happens (also on SIGTERM)."""

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        for home in sorted(root.glob(f"benchrd-{token}-*")):
            if home.is_dir() and (_agent_of(home, home.name) or _ids(f"name=dstackctl-{home.name}-")):
                stop_dstackctl(home, home.name)
        _remove(_ids(f"label={BENCH_LABEL}={token}"))
        _remove(_ids(f"name=dstackctl-benchrd-{token}-"))


def preflight() -> list[str]:
    problems = []
    if not shutil.which("docker"):
        problems.append("docker CLI not found")
    elif _docker("image", "inspect", IMAGE, check=False).returncode:
        problems.append(f"image {IMAGE} not found; build it with scripts/build-test-image.sh")
    if not Path(DSTACKCTL).exists():
        problems.append(f"{DSTACKCTL} not found: install the package into this interpreter")
    return problems


def run_rounds(runs: int, warmup: int, replicas: int, root: Path, token: str) -> list[Round]:
    rounds = []
    for index in range(-warmup, runs):
        round_ = Round(index)
        name = f"benchrd-{token}-{index + warmup}"
        steps = ["dstackctl", "docker"] if index % 2 == 0 else ["docker", "dstackctl"]
        for step in steps:
            try:
                if step == "dstackctl":
                    run_dstackctl(root, name, replicas, round_)
                else:
                    run_docker(token, replicas, round_)
            except (BenchError, subprocess.TimeoutExpired) as exc:
                round_.errors.append(str(exc))
        if index >= 0:
            rounds.append(round_)
        print(
            f"round {index + 1 if index >= 0 else 'warm-up'}: dstackctl "
            f"{_fmt(round_.dstackctl_s)} s, docker {_fmt(round_.docker_s)} s"
            + (f", errors: {round_.errors}" if round_.errors else ""),
            file=sys.stderr,
        )
    return rounds


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# --- report ---------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median_s": None, "p90_s": None, "min_s": None, "max_s": None}
    p90 = statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]
    return {
        "median_s": round(statistics.median(values), 3),
        "p90_s": round(p90, 3),
        "min_s": round(min(values), 3),
        "max_s": round(max(values), 3),
    }


def summarise(rounds: list[Round], replicas: int, notes: list[str]) -> dict[str, object]:
    ours = [r.dstackctl_s for r in rounds if r.dstackctl_s is not None]
    theirs = [r.docker_s for r in rounds if r.docker_s is not None]
    errors = [f"round {r.index + 1}: {e}" for r in rounds for e in r.errors]
    ratio = statistics.median(ours) / statistics.median(theirs) if ours and theirs else None
    phase_names: list[str] = []
    for r in rounds:
        phase_names += [p for p in r.phases if p not in phase_names]
    phases = {
        p: round(statistics.median([r.phases[p] for r in rounds if p in r.phases]), 3) for p in phase_names
    }
    return {
        "schema": 1,
        "python": sys.executable,
        "runs": len(rounds),
        "replicas": replicas,
        "image": IMAGE,
        "target_ratio": TARGET_RATIO,
        "results": [
            {"command": f"dstackctl run -d ({replicas} replicas)", **_stats(ours)},
            {"command": f"{replicas} x docker run -d, in parallel", **_stats(theirs)},
        ],
        "ratio": None if ratio is None else round(ratio, 3),
        "rounds": [
            {"round": r.index + 1, "dstackctl_s": r.dstackctl_s, "docker_s": r.docker_s, "phases": r.phases}
            for r in rounds
        ],
        "dstackctl_phases_median_s": phases,
        "errors": errors,
        "notes": notes,
        "passed": ratio is not None and ratio <= TARGET_RATIO and not errors,
    }


def render_table(summary: dict[str, object]) -> str:
    header = ("command", "median s", "p90 s", "min s", "max s")
    lines: list[tuple[str, ...]] = [header]
    results = summary["results"]
    assert isinstance(results, list)
    for row in results:
        lines.append(
            (
                row["command"],
                *(
                    "-" if row[key] is None else f"{row[key]:.3f}"
                    for key in ("median_s", "p90_s", "min_s", "max_s")
                ),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    ratio = summary["ratio"]
    out.append(
        f"ratio dstackctl/docker (medians): {'-' if ratio is None else f'{ratio:.2f}'}x; "
        f"target: at most {TARGET_RATIO}x; {summary['runs']} rounds, interleaved"
    )
    phases = summary["dstackctl_phases_median_s"]
    assert isinstance(phases, dict)
    if phases:
        out.append(
            "dstackctl phases (median s, from agent.log): "
            + ", ".join(f"{name} {value:.3f}" for name, value in phases.items())
        )
    rounds = summary["rounds"]
    assert isinstance(rounds, list)
    out.append(
        "rounds (dstackctl/docker s): "
        + ", ".join(f"{_fmt(r['dstackctl_s'])}/{_fmt(r['docker_s'])}" for r in rounds)
    )
    for key in ("errors", "notes"):
        items = summary[key]
        assert isinstance(items, list)
        out.extend(f"{key[:-1]}: {item}" for item in items)
    out.append("PASS" if summary["passed"] else "FAIL")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (>= 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--replicas", type=int, default=8, help="replicas (containers) per side")
    parser.add_argument("--keep-homes", action="store_true", help="keep the DSTACKCTL_HOMEs (path on stderr)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    compile_package()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    problems = preflight()
    if problems:
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        return 2

    token = secrets.token_hex(3)
    root = Path(tempfile.mkdtemp(prefix="dstackctl-bench-run-"))
    notes = []
    others = len(_ids(running_only=True))
    if others:
        notes.append(f"{others} other container(s) were running on the engine when the benchmark started")
    notes.append(f"load average before: {load_average()}")
    try:
        with cleanup_on_exit(token, root):
            rounds = run_rounds(args.runs, args.warmup, args.replicas, root, token)
        notes.append(f"load average after: {load_average()}")
    finally:
        if args.keep_homes:
            print(f"homes kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    summary = summarise(rounds, args.replicas, notes)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render_table(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
