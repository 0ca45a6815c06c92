"""The agent as a process: started detached by the CLI (forked or spawned), stopped by
`stop`, and its entry point (`python -m dstackctl.agent NAME --home HOME`), which is the
agent's supervisor: it forks the agent and restarts it when it dies or hangs.

Importing this module is cheap: the agent's own modules load only in the agent process.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dstackctl.store import Store

if TYPE_CHECKING:
    from dstackctl.agent.endpoint_host import EndpointHost
    from dstackctl.agent.supervisor import SupervisorLink

AGENT_MODULE = "dstackctl.agent"
log = logging.getLogger("dstackctl.agent")


# The console script forks the agent from the CLI, which has already imported pydantic, the
# config models and docker-py: that saves a new interpreter and ~0.3 s of imports on every
# `run`. Library callers (tests, programs that embed dstackctl) keep the default, a fresh
# interpreter: forking a process that may hold other threads' locks is not safe.
_fork_agents = False


def fork_agents() -> None:
    """Let `start_agent` fork instead of spawning; only for a single-threaded CLI process."""
    global _fork_agents
    _fork_agents = True


def start_agent(store: Store, name: str) -> None:
    """Start the service's agent detached (own session); its output goes to agent.log."""
    from dstackctl.agent import warm_start

    if warm_start.hand_over(os.path.abspath(store.home), name):
        return
    if _fork_agents and threading.active_count() == 1:
        _fork_agent(store, name)
    else:
        _spawn_agent(store, name)


def _spawn_agent(store: Store, name: str) -> None:
    import subprocess  # here, not at the top: `ps` imports this module and must start fast

    fd = _open_log(store, name)
    try:
        subprocess.Popen(
            [sys.executable, "-m", AGENT_MODULE, name, "--home", str(store.home)],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
    finally:
        os.close(fd)


def _fork_agent(store: Store, name: str) -> None:
    """Double fork: the agent is reparented to init at once, so it never lingers as a zombie
    of a CLI that stays attached."""
    fd = _open_log(store, name)
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        os.close(fd)
        os.waitpid(child, 0)
        return
    code = 1
    try:
        os.setsid()
        code = 0 if os.fork() else _become_agent(store, name, fd)
    except BaseException:  # nothing may return into the CLI's code from here
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def become_supervisor(home: str, name: str) -> int:
    """A warm supervisor (agent/warm_start.py) taking on `name`: the rest of a forked start."""
    store = Store(Path(home))
    return _become_agent(store, name, _open_log(store, name), warm=True)


def preload() -> None:
    """Import what the supervisor and its agents run: a restarted agent then starts without
    importing anything (~0.37 s from nothing, as the warm supervisor does it; less in a
    supervisor forked from a CLI that loaded pydantic and the config models)."""
    from dstackctl.agent import service_agent  # noqa: F401
    from dstackctl.agent.supervisor import Supervisor  # noqa: F401


def _become_agent(store: Store, name: str, log_fd: int, warm: bool = False) -> int:
    import gc

    # The CLI pauses the collector (cli/gc_policy.py); the agent runs for days and needs it.
    # What the CLI left in memory is frozen: never scanned, and its pages stay shared.
    gc.freeze()
    gc.enable()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.closerange(3, _max_fd())  # the CLI's Docker connection and lock files are not ours
    return main([name, "--home", str(store.home)], warm=warm)


def _max_fd() -> int:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 65536 if soft == resource.RLIM_INFINITY else int(soft)


def _open_log(store: Store, name: str) -> int:
    return os.open(store.log_path(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def stop_agent(store: Store, name: str, timeout: float = 5.0) -> None:
    """SIGTERM the agent's supervisor (which stops the agent), or the agent where it runs
    unsupervised; SIGKILL both when they have not exited within `timeout`."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        pids = store.agent_processes(name)
        if not pids:
            return
        for pid in pids if sig == signal.SIGKILL else pids[-1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not store.agent_alive(name):
                return
            time.sleep(0.05)


def _raise_open_file_limit() -> None:
    """Each proxied request holds two descriptors: 1,000 open streams need more than the
    common soft limit of 1,024, and running out looked like "no replica could be reached"."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)


def set_title(title: str) -> None:
    """How `ps aux` shows the agent: a forked one would otherwise keep the command line of the
    `dstackctl run -d ...` that started it for its whole life, like a hung command."""
    try:
        import setproctitle
    except ImportError:  # a build without the C extension: cosmetic only
        return
    setproctitle.setproctitle(title)


def main(argv: list[str] | None = None, warm: bool = False) -> int:
    """The supervisor: holds the agent lock and keeps an agent running (agent/supervisor.py).
    `warm`: forked by `run` before it was needed (agent/warm_start.py); its log says so."""
    parser = argparse.ArgumentParser(prog=AGENT_MODULE)
    parser.add_argument("name")
    parser.add_argument("--home", required=True)
    args = parser.parse_args(argv)
    set_title(f"dstackctl-agent {args.name} --home {args.home} (supervisor)")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if warm:
        log.info("supervisor of %s started while the CLI checked the file (pid %d)", args.name, os.getpid())
    _raise_open_file_limit()
    preload()
    from dstackctl.agent.supervisor import Supervisor

    store = Store(Path(args.home))
    with store.agent_lock(args.name) as held:
        if not held:
            log.info("another agent already runs %s; this one exits", args.name)
            return 0
        supervisor = Supervisor(lambda link: _run_agent(store, args.name, link), _import_endpoint)
        return supervisor.run(on_agent=lambda pid: store.note_agent(args.name, pid))


def _import_endpoint() -> None:
    from dstackctl.aiohttp_loading import load_aiohttp

    load_aiohttp()
    import dstackctl.proxy  # noqa: F401


def _run_agent(store: Store, name: str, link: SupervisorLink) -> int:
    """The agent, in the supervisor's forked child."""
    set_title(f"dstackctl-agent {name} --home {store.home}")
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from dstackctl.agent.service_agent import ServiceAgent

    agent = ServiceAgent(store, name, stop, link=link)
    threading.Thread(target=_beat, args=(link, agent.endpoint), name="heartbeat", daemon=True).start()
    try:
        return agent.run(lock_held=True)
    except Exception:
        log.exception("agent crashed")
        return 1


def _beat(link: SupervisorLink, endpoint: EndpointHost) -> None:
    """Tell the supervisor this agent lives, for as long as its endpoint's loop does."""
    from dstackctl.agent.supervisor import HEARTBEAT_SECONDS

    while not link.lost:
        if endpoint.responsive():
            link.beat()
        time.sleep(HEARTBEAT_SECONDS)
