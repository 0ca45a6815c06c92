"""`ps` benchmark: wall time of ``dstackctl ps`` over a large synthetic store, next to ``docker ps``.

Builds a store of 100 services x 4 replicas in a temporary DSTACKCTL_HOME, with the documents
written through ``dstackctl.store.Store.write`` in the shapes that ``services.submit`` (spec,
secrets) and the agent's ``_publish`` (state: every replica running, its one probe ready)
produce. No agent runs, which is what a store read sees after a reboot: ``ps`` prints one
warning per service. A second copy of the store has every service's ``agent.lock`` held by
this process, so ``ps`` sees live agents and prints no warnings; the difference is the cost
of the warnings (also timed in-process, which is steadier).

Each round runs every command once, in a fresh process, interleaved so machine noise hits
all commands alike; a warm-up round is not counted (it also checks the output). Target: the
median of ``dstackctl ps`` (agents down, as measured by the issue) is at most 100 ms.

    .venv/bin/python bench/ps_store.py [--runs 15] [--services 100] [--replicas 4] [--json]

Exit status: 0 when the target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

from _report import REPO_ROOT, Command, command_table, compile_package, exit_notes, load_average, run_all

sys.path.insert(0, str(REPO_ROOT))

from dstackctl.replica_spec import config_hash
from dstackctl.store import HOME_VARIABLE, SECRETS, SPEC, STATE, Store

TARGET_MS = 100.0
TARGET_LABEL = "dstackctl ps"
BASELINE = "python -c pass"


# --- the synthetic store ----------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _service_name(i: int) -> str:
    return f"bench-svc-{i:03d}"


def build_store(home: Path, services: int, replicas: int, seed: int = 1) -> None:
    """Write spec/secrets/state for `services` services of `replicas` running, ready replicas each."""
    rng = random.Random(seed)
    store = Store(home)
    now = datetime.now(timezone.utc)
    port = 32768
    for i in range(services):
        name = _service_name(i)
        submitted = now - timedelta(minutes=3 * i + 1)
        endpoint_port = 20000 + i
        # services.stored_config: model_dump(mode="json", exclude_unset=True), env reduced to names
        config = {
            "type": "service",
            "name": name,
            "image": "dstackctl-testsrv:latest",
            "env": ["READY_AFTER_SECONDS"],
            "commands": ["httpd -f -p 8000 -h /www"],
            "port": {"container_port": 8000, "local_port": endpoint_port},
            "replicas": replicas,
            "probes": [{"type": "http", "url": "/cgi-bin/health", "interval": "2s", "ready_after": 2}],
        }
        env_values = {"READY_AFTER_SECONDS": "3"}
        run_id = f"{rng.getrandbits(48):012x}"
        cfg_hash = config_hash({k: v for k, v in config.items() if k != "replicas"}, env_values)
        # services.submit: secrets, spec, then a pending state (replaced below by the agent's)
        store.write(name, SECRETS, {"env": env_values, "registry_auth": None})
        store.write(
            name,
            SPEC,
            {
                "name": name,
                "run_id": run_id,
                "desired": "running",
                "config": config,
                "config_file": f"/work/services/{name}.dstack.yml",
                "config_dir": "/work/services",
                "config_hash": cfg_hash,
                "deployment_num": 0,
                "replicas": replicas,
                "submitted_at": _iso(submitted),
                "probe_urls": ["/cgi-bin/health"],
                "endpoint_port": endpoint_port,
                "previous": None,
                "rollout": None,
            },
        )
        # status.ReplicaRow.to_json of a running replica whose probe (status.ProbeView) is
        # ready, as agent/publishing.py writes it
        started = _iso(submitted + timedelta(seconds=1))
        rows = []
        for num in range(replicas):
            port += 1
            rows.append(
                {
                    "replica_num": num,
                    "job_num": 0,
                    "deployment_num": 0,
                    "config_hash": cfg_hash,
                    "status": "running",
                    "container_id": f"{rng.getrandbits(256):064x}",
                    "container_name": f"dstackctl-{name}-{num}-{rng.getrandbits(24):06x}",
                    "host_port": port,
                    "url": f"http://127.0.0.1:{port}",
                    "exit_code": None,
                    "message": None,
                    "log_tail": [],
                    "ready": True,
                    "probes": [
                        {
                            "url": "/cgi-bin/health",
                            "success_streak": 2,
                            "ready_after": 2,
                            "symbol": "\u2713",
                            "last_checked_at": _iso(now),
                            "last_error": None,
                            "last_status": 200,
                        }
                    ],
                    "submitted_at": started,
                }
            )
        # agent._publish
        store.write(
            name,
            STATE,
            {
                "name": name,
                "run_id": run_id,
                "status": "running",
                "engine_problem": None,
                "endpoint_error": None,
                "url": f"http://127.0.0.1:{endpoint_port}",
                "replicas": rows,
                "agent": {"pid": 4_000_000 + i, "started_at": started, "heartbeat_at": _iso(now)},
                "updated_at": _iso(now),
            },
        )
        # the files a service folder has once an agent ran: locks and its log
        folder = store.service_dir(name)
        for lock in ("lock", "agent.lock"):
            os.close(os.open(folder / lock, os.O_RDWR | os.O_CREAT, 0o600))
        when = started.replace("T", " ").rstrip("Z")
        (folder / "agent.log").write_text(f"{when},000 INFO agent for {name} started (pid {4_000_000 + i})\n")


@contextlib.contextmanager
def agents_alive(home: Path) -> Iterator[int]:
    """Hold every service's agent.lock, as live agents would; yields how many are held."""
    fds = []
    try:
        for lock in sorted((home / "services").glob("*/agent.lock")):
            fd = os.open(lock, os.O_RDWR)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield len(fds)
    finally:
        for fd in fds:
            os.close(fd)


# --- timing -----------------------------------------------------------------------------------


def build_commands(down: Path, up: Path) -> tuple[list[Command], list[str]]:
    notes: list[str] = []
    dstackctl = Path(sys.executable).parent / "dstackctl"
    if not dstackctl.exists():
        notes.append(f"{dstackctl} not found: install the package into this interpreter")
    env_down = {**os.environ, HOME_VARIABLE: str(down)}
    env_up = {**os.environ, HOME_VARIABLE: str(up)}
    commands = [
        Command(BASELINE, [sys.executable, "-c", "pass"]),
        Command("dstackctl --help", [str(dstackctl), "--help"], env_down),
        Command(TARGET_LABEL, [str(dstackctl), "ps"], env_down, target=True),
        Command("dstackctl ps -v", [str(dstackctl), "ps", "-v"], env_down),
        Command("dstackctl ps --json", [str(dstackctl), "ps", "--json"], env_down),
        Command("dstackctl ps (agents up)", [str(dstackctl), "ps"], env_up),
    ]
    docker = shutil.which("docker")
    if docker:
        commands.append(Command("docker ps", [docker, "ps"]))
    else:
        notes.append("docker not found: 'docker ps' not timed")
    return commands, notes


def check_outputs(commands: list[Command], services: int, replicas: int) -> tuple[list[str], list[str]]:
    """Run each dstackctl command once with its output captured; describe what looks wrong.

    Also returns the warnings that the target command printed (without "warning: ")."""
    notes = []
    warned: list[str] = []
    for command in commands:
        if not command.label.startswith("dstackctl ps"):
            continue
        done = subprocess.run(command.argv, env=command.env, capture_output=True, check=False)
        out, err = done.stdout.decode(), done.stderr.decode()
        warning_lines = [line for line in err.splitlines() if line.startswith("warning: ")]
        warnings = len(warning_lines)
        if command.target:
            warned = [line.removeprefix("warning: ") for line in warning_lines]
        if command.label.endswith("--json"):
            runs = json.loads(out)["runs"] if done.returncode == 0 else []
            shape = (len(runs), sum(len(r["replicas"]) for r in runs))
            expected: tuple[int, int] = (services, services * replicas)
        else:
            lines = len(out.splitlines())
            per_service = 1 + replicas if "-v" in command.argv else 1
            shape = (lines, 0)
            expected = (1 + services * per_service, 0)
        if done.returncode or shape != expected:
            notes.append(f"{command.label!r}: exit {done.returncode}, output {shape}, expected {expected}")
        notes.append(
            f"{command.label!r}: {len(out)} bytes out, "
            f"{warnings} warning line(s) ({len(err)} bytes) on stderr"
        )
    return notes, warned


def warnings_in_process_ms(messages: list[str]) -> float | None:
    """The warnings `ps` printed, printed again with its `warn` in this process (stderr to
    /dev/null): a steadier figure than the difference of two noisy process timings."""
    try:
        from dstackctl.cli.output import warn
    except ImportError:
        return None
    saved = sys.stderr
    try:
        with open(os.devnull, "w") as sink:
            sys.stderr = sink
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for message in messages:
                    warn(message)
                best = min(best, time.perf_counter() - start)
    finally:
        sys.stderr = saved
    return best * 1000


def docker_container_count() -> int | None:
    docker = shutil.which("docker")
    if not docker:
        return None
    done = subprocess.run([docker, "ps", "-q"], capture_output=True, check=False)
    return len(done.stdout.split()) if done.returncode == 0 else None


# --- report -----------------------------------------------------------------------------------


def summarise(
    commands: list[Command], runs: int, services: int, replicas: int, notes: list[str], warned: list[str]
) -> dict[str, object]:
    by_label = {c.label: c for c in commands}
    baseline = by_label[BASELINE].median_ms
    rows = []
    for command in commands:
        rows.append(
            {
                "command": command.label,
                "median_ms": round(command.median_ms, 1),
                "p90_ms": round(command.p90_ms, 1),
                "over_python_ms": None
                if command.label == BASELINE
                else round(command.median_ms - baseline, 1),
                "exit_codes": sorted(command.exit_codes),
                "passed": (command.median_ms <= TARGET_MS) if command.target else None,
            }
        )
    down, up = by_label.get(TARGET_LABEL), by_label.get("dstackctl ps (agents up)")
    if down and up:
        notes.append(
            f"agents-down warnings: 'dstackctl ps' minus 'dstackctl ps (agents up)' is "
            f"{down.median_ms - up.median_ms:+.1f} ms (medians; within noise unless large)"
        )
    spent = warnings_in_process_ms(warned)
    if warned and spent is not None:
        notes.append(f"agents-down warnings: its {len(warned)} warn() calls take {spent:.2f} ms in-process")
    help_ = by_label.get("dstackctl --help")
    if down and help_:
        notes.append(
            f"'dstackctl ps' takes {down.median_ms - help_.median_ms:+.1f} ms over 'dstackctl --help' "
            f"(which itself is {help_.median_ms - baseline:+.1f} ms over bare Python)"
        )
    return {
        "schema": 1,
        "python": sys.executable,
        "runs": runs,
        "store": {"services": services, "replicas_per_service": replicas},
        "docker_containers_running": docker_container_count(),
        "target_ms": TARGET_MS,
        "target_command": TARGET_LABEL,
        "results": rows,
        "notes": notes,
        "passed": all(row["passed"] is not False for row in rows),
    }


def render_table(summary: dict[str, object]) -> str:
    rows = summary["results"]
    assert isinstance(rows, list)
    out = command_table(rows)
    store = summary["store"]
    assert isinstance(store, dict)
    out.append(
        f"store: {store['services']} services x {store['replicas_per_service']} replicas, no agent running; "
        f"docker ps saw {summary['docker_containers_running']} running container(s)"
    )
    out.append(
        f"target: median of '{summary['target_command']}' at most {TARGET_MS:.0f} ms; "
        f"{summary['runs']} runs each, interleaved"
    )
    notes = summary["notes"]
    assert isinstance(notes, list)
    out.extend(f"note: {note}" for note in notes)
    out.append("PASS" if summary["passed"] else "FAIL")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=15, help="timed runs per command (>= 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--services", type=int, default=100, help="services in the synthetic store")
    parser.add_argument("--replicas", type=int, default=4, help="replicas per service")
    parser.add_argument("--keep", action="store_true", help="keep the temporary stores (path on stderr)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    compile_package()
    if args.runs < 2:
        parser.error("--runs must be at least 2")

    root = Path(tempfile.mkdtemp(prefix="dstackctl-bench-ps-"))
    try:
        down, up = root / "agents-down", root / "agents-up"
        build_store(down, args.services, args.replicas)
        build_store(up, args.services, args.replicas)
        with agents_alive(up) as held:
            commands, notes = build_commands(down, up)
            if held != args.services:
                notes.append(f"only {held} agent locks held in the agents-up store")
            checked, warned = check_outputs(commands, args.services, args.replicas)
            notes.extend(checked)
            notes.append(f"load average before: {load_average()}")
            run_all(commands, args.runs, args.warmup)
            notes.append(f"load average after: {load_average()}")
        notes.extend(exit_notes(commands))
        summary = summarise(commands, args.runs, args.services, args.replicas, notes, warned)
    finally:
        if args.keep:
            print(f"stores kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render_table(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
