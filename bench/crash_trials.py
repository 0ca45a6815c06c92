"""Agent-crash trials: `kill -9` of a service's agent at a random moment of a rolling redeploy.

Each trial, in a store of its own (``DSTACKCTL_HOME`` in a temporary folder):

1. ``dstackctl run -d`` of a service of N replicas of the test image (/cgi-bin/health probed
   every second, ``DEPLOYMENT_TAG=v1``), then ``dstackctl redeploy NAME -f v2 --no-wait``
   (``DEPLOYMENT_TAG=v2``);
2. the agent and its supervisor are killed with SIGKILL after a random delay, drawn from 0 to
   90% of the rollout's duration as measured by a warm-up trial (``--max-delay`` overrides it);
3. the next command: ``dstackctl redeploy NAME`` (which must restart the agent and exit 1,
   saying it carries on) and ``dstackctl run -d v2.yml`` (exit 0), taking turns;
   every ``--bad-every``-th trial (default 3) rolls out a v2 whose replicas exit after a
   second, so the restarted agent has to roll back (its kill comes in the first half of the
   window, as such a rollout ends sooner);
4. then, while the restarted agent finishes (or rolls back) the rollout, the endpoint is
   requested and the containers listed every 50 ms, until the rollout has ended and ``ps``
   shows N ready replicas (or ``--timeout`` passes);
5. checks: exactly N containers, all of the rollout's final deployment, each replica number
   once; no container of the store that ``ps`` does not show (orphans); ``ps --json`` ids equal
   to Docker's; the endpoint answers 200 from the final deployment; once back, it failed no
   request; at least N replicas kept running during the recovery.

    .venv/bin/python bench/crash_trials.py [--trials 10] [--replicas 3] [--bad-every 3]
        [--max-delay S] [--seed N] [--json]

Needs dockerd and ``dstackctl-testsrv:latest`` (``scripts/build-test-image.sh``). Containers of a
trial are removed by its store's label, also on failure or Ctrl-C. Exit status 0 when every
trial finished or rolled back cleanly, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import docker
import requests
from tabulate import tabulate

from dstackctl.labels import home_label
from dstackctl.store import Store

IMAGE = "dstackctl-testsrv:latest"
NAME = "crashtrial"
DSTACKCTL = str(Path(sys.executable).parent / "dstackctl")
ENDED = ("done", "rolled_back", "rollback_failed")


@dataclass
class Trial:
    index: int
    next_command: str
    bad_config: bool = False
    kill_delay: float = 0.0
    at_kill: str = ""  # containers of the old and new deployment when the agent died
    rollout_at_kill: str = ""
    exit_code: int | None = None
    outcome: str = "failed"  # finished, rolled back, failed
    recover_s: float | None = None
    orphans: int = 0
    duplicates: int = 0
    endpoint_errors: int = 0
    fewest_running: int | None = None
    problems: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_files(folder: Path, replicas: int, bad: bool) -> tuple[Path, Path]:
    """v1 and v2 of the service; a bad v2's replicas exit 1 before they are ready."""
    text = (
        "type: service\n"
        f"name: {NAME}\n"
        f"image: {IMAGE}\n"
        f'port: "{free_port()}:8000"\n'
        f"replicas: {replicas}\n"
        "commands: @COMMANDS@\n"
        'env: ["DEPLOYMENT_TAG=@TAG@"]\n'
        "probes:\n  - type: http\n    url: /cgi-bin/health\n    interval: 1s\n"
    )
    paths = []
    for tag in ("v1", "v2"):
        (folder / tag).mkdir()
        path = folder / tag / f"{NAME}.dstack.yml"
        commands = ["sleep 1", "exit 1"] if bad and tag == "v2" else ["httpd -f -p 8000 -h /www"]
        path.write_text(text.replace("@TAG@", tag).replace("@COMMANDS@", json.dumps(commands)))
        paths.append(path)
    return paths[0], paths[1]


def dstackctl(home: Path, *args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DSTACKCTL_HOME": str(home)}
    return subprocess.run(
        [DSTACKCTL, *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def ps_json(home: Path) -> dict[str, Any] | None:
    done = dstackctl(home, "ps", "--json", NAME)
    if done.returncode != 0:
        return None
    runs = json.loads(done.stdout)["runs"]
    return dict(runs[0]) if runs else None


def containers(client: Any, home: Path) -> list[dict[str, Any]]:
    return list(client.api.containers(all=True, filters={"label": f"dstackctl.home={home_label(home)}"}))


def answer(url: str) -> tuple[int, str] | None:
    try:
        response = requests.get(url, timeout=5)
    except requests.RequestException:
        return None
    return response.status_code, response.text


class Watch:
    """Requests the endpoint and lists the containers every 50 ms, from a thread."""

    def __init__(self, client: Any, home: Path, url: str) -> None:
        self.answers: list[tuple[int, str] | None] = []
        self.running: list[int] = []
        self._client, self._home, self._url = client, home, url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.answers.append(answer(f"{self._url}/cgi-bin/whoami"))
            self.running.append(
                sum(1 for c in containers(self._client, self._home) if c["State"] == "running")
            )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def errors_after_back(self) -> int:
        first = next((i for i, got in enumerate(self.answers) if got and got[0] == 200), None)
        if first is None:
            return len(self.answers)
        return sum(1 for got in self.answers[first:] if not (got and got[0] == 200))


def cleanup(client: Any, home: Path) -> None:
    if Store(home).exists(NAME):
        dstackctl(home, "stop", NAME, timeout=60)
    for container in containers(client, home):
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container(container["Id"], force=True)


def rollout_state(store: Store) -> str:
    """The rollout's state as the agent observes it (state.json: the agent is its only writer)."""
    return str(((store.read(NAME, "state") or {}).get("rollout") or {}).get("state"))


def one_trial(
    client: Any, trial: Trial, replicas: int, kill_delay: float | None, timeout: float, keep: bool
) -> float:
    """Runs one trial (kill_delay None: a warm-up without a kill); returns the rollout's duration."""
    root = Path(tempfile.mkdtemp(prefix="dstackctl-crash-"))
    home = root / "home"
    store = Store(home)
    try:
        v1, v2 = service_files(root, replicas, trial.bad_config)
        started = dstackctl(home, "run", "-d", "--timeout", "60s", v1)
        if started.returncode != 0:
            raise RuntimeError(f"run -d failed: {started.stderr.strip()}")
        url = (ps_json(home) or {})["url"]
        pid = store.agent_holder(NAME)
        begun = time.monotonic()
        redeploy = dstackctl(home, "redeploy", NAME, "-f", v2, "--no-wait")
        if redeploy.returncode != 0:
            raise RuntimeError(f"redeploy failed: {redeploy.stderr.strip()}")
        if kill_delay is None:  # the warm-up: how long an undisturbed rollout takes
            while rollout_state(store) == "in_progress" and time.monotonic() - begun < timeout:
                time.sleep(0.05)
            return time.monotonic() - begun
        time.sleep(kill_delay)  # the random moment: a fault injected, not a wait for a condition
        trial.kill_delay = kill_delay
        trial.rollout_at_kill = rollout_state(store)
        found = containers(client, home)
        old = sum(1 for c in found if c["Labels"]["dstackctl.deployment"] == "0")
        trial.at_kill = f"{old} old, {len(found) - old} new"
        assert pid is not None
        # The supervisor first, then the agent: a user's command has to bring the agent back (a
        # supervisor alone restarts a killed agent: bench/agent_crash_load.py measures that).
        for process in reversed(store.agent_processes(NAME)):
            os.kill(process, signal.SIGKILL)
        killed = time.monotonic()
        while store.agent_alive(NAME):
            time.sleep(0.01)

        watch = Watch(docker.from_env(timeout=30), home, url)
        try:
            if trial.next_command == "redeploy":
                done = dstackctl(home, "redeploy", NAME)
                expected, words = 1, "carries on with that rollout"
            else:
                done = dstackctl(home, "run", "-d", "--timeout", "60s", v2)
                expected, words = 0, "was not running; restarted it"
            trial.exit_code = done.returncode
            if trial.bad_config and trial.next_command != "redeploy":
                expected = done.returncode  # run -d exits 1 (a replica failed) or 0 (rolled back)
            if trial.rollout_at_kill in ("in_progress", "rolling_back") and (
                done.returncode != expected or words not in done.stderr
            ):
                trial.problems.append(
                    f"{trial.next_command} exited {done.returncode}: {done.stderr.strip()[:200]}"
                )
            shown: dict[str, Any] | None = None
            while time.monotonic() - killed < timeout:
                shown = ps_json(home)
                state = rollout_state(store)
                rows = (shown or {}).get("replicas") or []
                if (
                    state in ("done", "rolled_back")
                    and len(rows) == replicas
                    and all(r["ready"] for r in rows)
                ):
                    break
                time.sleep(0.1)
            else:
                trial.problems.append(f"not recovered within {timeout:g}s (rollout {rollout_state(store)})")
            trial.recover_s = time.monotonic() - killed
            bodies = {answer(f"{url}/cgi-bin/whoami") for _ in range(3 * replicas)}
        finally:
            watch.close()
        trial.endpoint_errors = watch.errors_after_back()
        trial.fewest_running = min(watch.running) if watch.running else None

        state = rollout_state(store)
        trial.outcome = {"done": "finished", "rolled_back": "rolled back"}.get(state, "failed")
        final = int((store.read(NAME, "state") or {}).get("deployment_num", -1))
        # The tag the final config runs with: a rolled-back rollout leaves the previous one's.
        secrets = store.read(NAME, "secrets") or {}
        env = secrets.get("previous_env") if state == "rolled_back" else None
        tag = (env or secrets.get("env") or {}).get("DEPLOYMENT_TAG")
        found = containers(client, home)
        shown_ids = {r["container_id"] for r in (shown or {}).get("replicas") or []}
        trial.orphans = sum(1 for c in found if c["Id"] not in shown_ids)
        numbers = [int(c["Labels"]["dstackctl.replica"]) for c in found]
        trial.duplicates = len(numbers) - len(set(numbers))
        deployments = {int(c["Labels"]["dstackctl.deployment"]) for c in found}
        if sorted(numbers) != list(range(replicas)) or deployments != {final}:
            trial.problems.append(
                f"containers: replicas {sorted(numbers)}, deployments {sorted(deployments)}"
            )
        if {c["State"] for c in found} != {"running"}:
            trial.problems.append(f"container states {sorted(c['State'] for c in found)}")
        if shown is None or not shown.get("agent_alive") or shown_ids != {c["Id"] for c in found}:
            trial.problems.append("ps does not match docker ps")
        if bodies != {(200, f"{NAME} {num} {tag}\n") for num in range(replicas)}:
            trial.problems.append(f"endpoint answers {sorted(map(str, bodies))}")
        if trial.endpoint_errors:
            trial.problems.append(f"{trial.endpoint_errors} failed requests after the endpoint was back")
        if trial.fewest_running is not None and trial.fewest_running < replicas:
            trial.problems.append(f"only {trial.fewest_running} replicas running at one point")
        if trial.problems and trial.outcome != "failed":
            trial.outcome += " (with problems)"
        return trial.recover_s
    finally:
        cleanup(client, home)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=10, help="trials with a kill (default 10)")
    parser.add_argument("--replicas", type=int, default=3, help="replicas of the service (default 3)")
    parser.add_argument(
        "--bad-every", type=int, default=3, help="every Nth trial rolls out a failing config (0: none)"
    )
    parser.add_argument("--max-delay", type=float, help="latest kill, seconds after the redeploy began")
    parser.add_argument("--timeout", type=float, default=90, help="seconds a recovery may take (default 90)")
    parser.add_argument("--seed", type=int, help="seed of the random kill moments")
    parser.add_argument("--json", action="store_true", help="print the trials as JSON")
    parser.add_argument("--keep-homes", action="store_true", help="keep each trial's store folder")
    args = parser.parse_args(argv)

    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    rng = random.Random(seed)
    client = docker.from_env(timeout=30)
    max_delay = args.max_delay
    if max_delay is None:
        warm = one_trial(client, Trial(0, "none"), args.replicas, None, args.timeout, args.keep_homes)
        max_delay = 0.9 * warm
        print(
            f"warm-up: an undisturbed rollout of {args.replicas} replicas took {warm:.1f}s", file=sys.stderr
        )
    trials = []
    try:
        for index in range(1, args.trials + 1):
            bad = bool(args.bad_every) and index % args.bad_every == 0
            trial = Trial(index, "redeploy" if index % 2 else "run -d", bad_config=bad)
            try:
                one_trial(
                    client,
                    trial,
                    args.replicas,
                    rng.uniform(0, max_delay / 2 if bad else max_delay),
                    args.timeout,
                    args.keep_homes,
                )
            except Exception as exc:  # a trial that broke still counts, as failed
                trial.problems.append(f"{type(exc).__name__}: {exc}")
            trials.append(trial)
            print(
                f"trial {index} ({'bad' if bad else 'good'} v2): killed at {trial.kill_delay:.2f}s "
                f"({trial.at_kill}), {trial.outcome}"
                + (f"; {'; '.join(trial.problems)}" if trial.problems else ""),
                file=sys.stderr,
            )
    except KeyboardInterrupt:
        print("interrupted; the finished trials follow", file=sys.stderr)

    if args.json:
        print(
            json.dumps(
                {"seed": seed, "max_delay": max_delay, "trials": [asdict(t) for t in trials]}, indent=2
            )
        )
    else:
        print(
            tabulate(
                [
                    [
                        t.index,
                        f"{t.kill_delay:.2f}",
                        t.at_kill,
                        t.rollout_at_kill,
                        "bad" if t.bad_config else "good",
                        t.next_command,
                        t.exit_code,
                        t.outcome,
                        f"{t.recover_s:.1f}" if t.recover_s is not None else "-",
                        t.orphans,
                        t.duplicates,
                        t.endpoint_errors,
                        t.fewest_running,
                    ]
                    for t in trials
                ],
                headers=[
                    "trial",
                    "kill at s",
                    "containers at kill",
                    "rollout",
                    "v2",
                    "next command",
                    "exit",
                    "outcome",
                    "recovered s",
                    "orphans",
                    "dups",
                    "endpoint errors",
                    "min running",
                ],
            )
        )
        times = [t.recover_s for t in trials if t.recover_s is not None]
        outcomes = [t.outcome for t in trials]
        print()
        print(
            tabulate(
                [
                    ["trials", len(trials)],
                    ["finished", outcomes.count("finished")],
                    ["rolled back", outcomes.count("rolled back")],
                    [
                        "kills after the rollout had ended",
                        sum(1 for t in trials if t.rollout_at_kill in ENDED),
                    ],
                    [
                        "failed or with problems",
                        len(trials) - outcomes.count("finished") - outcomes.count("rolled back"),
                    ],
                    ["orphans found", sum(t.orphans for t in trials)],
                    ["duplicates found", sum(t.duplicates for t in trials)],
                    ["failed requests once back", sum(t.endpoint_errors for t in trials)],
                    ["time to recover, median", f"{statistics.median(times):.1f}s" if times else "-"],
                    ["time to recover, p90", f"{percentile(times, 0.9):.1f}s" if times else "-"],
                    ["seed / latest kill", f"{seed} / {max_delay:.1f}s after the redeploy began"],
                ],
                tablefmt="plain",
            )
        )
    clean = trials and all(t.outcome in ("finished", "rolled back") for t in trials)
    return 0 if clean and len(trials) == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
