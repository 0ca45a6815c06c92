"""The JSON state store: one folder per service under $DSTACKCTL_HOME.

- `spec.json`: what the user asked for (written by the CLI); env values are not in it.
- `secrets.json`: resolved env values and registry credentials, read by the agent only.
- `state.json`: what the agent observed (written by the agent, read by `ps`).
Writes go to a temporary file in the same folder, are fsynced and renamed over the old one,
so readers see the old or the new document, never half of one. Read-modify-write cycles
hold an exclusive flock on the service's lock file. Folders are 0700, files 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dstackctl.errors import DstackctlError, NoSuchService

SCHEMA_VERSION = 1
HOME_VARIABLE = "DSTACKCTL_HOME"
SPEC, STATE, SECRETS = "spec", "state", "secrets"
AGENT_LOG = "agent.log"
Document = dict[str, Any]


class StoreError(DstackctlError):
    pass


def default_home() -> Path:
    return Path(os.environ.get(HOME_VARIABLE) or "~/.dstackctl").expanduser()


def _private_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError as exc:
        raise StoreError(
            f"cannot create the folder {path} ({exc.strerror.lower() if exc.strerror else exc}); "
            f"point {HOME_VARIABLE} at a folder you can write, or unset it (default ~/.dstackctl)"
        ) from None
    return path


def _process_start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (field 22 of /proc/PID/stat);
    None for a process that is gone, also one that died and was not reaped yet (a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


_IDENTITY_WIDTH = 80


def _write_identity(fd: int, pids: list[int]) -> None:
    """Who holds the agent lock, for `stop`: each pid with its start time, which a reused pid
    lacks. One fixed-width write, so that a reader never sees the file empty or half written."""
    text = " ".join(f"{pid} {_process_start_ticks(pid)}" for pid in pids)
    os.pwrite(fd, text.ljust(_IDENTITY_WIDTH).encode()[:_IDENTITY_WIDTH] + b"\n", 0)


class Store:
    def __init__(self, home: Path | None = None) -> None:
        self.home = (home or default_home()).absolute()
        self.services = self.home / "services"
        self._services = str(self.services)  # plain strings for the paths `ps` reads per service

    def service_dir(self, name: str, create: bool = False) -> Path:
        path = Path(self._file(name, ""))
        if create:
            _private_dir(self.home)
            _private_dir(self.services)
            _private_dir(path)
        return path

    def _file(self, name: str, filename: str) -> str:
        """The path of a file of the service's folder (the folder itself for "")."""
        if name in ("", ".", "..") or "/" in name or "\0" in name:  # a NAME argument like ../x
            raise NoSuchService(repr(name))
        return os.path.join(self._services, name, filename)

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self._services)
        except FileNotFoundError:
            return []
        return sorted(name for name in entries if os.path.exists(self._file(name, f"{SPEC}.json")))

    def exists(self, name: str) -> bool:
        return (self.service_dir(name) / f"{SPEC}.json").exists()

    def discard_if_unused(self, name: str) -> None:
        """Remove the folder of a service that was never recorded (only its lock file in it),
        so that a `run` that failed before writing anything leaves nothing behind."""
        folder = self.service_dir(name)
        with contextlib.suppress(OSError):
            if {p.name for p in folder.iterdir()} <= {"lock"}:
                (folder / "lock").unlink(missing_ok=True)
                folder.rmdir()

    def log_path(self, name: str) -> Path:
        return self.service_dir(name) / AGENT_LOG

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        folder = self.service_dir(name, create=True)
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextlib.contextmanager
    def agent_lock(self, name: str) -> Iterator[bool]:
        """Held by a service's agent for its whole life; yields False when another holds it."""
        folder = self.service_dir(name, create=True)
        fd = os.open(folder / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # A checker (`agent_alive`) holds the lock for microseconds: retry briefly before
            # concluding that another agent owns the service.
            for _attempt in range(40):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.05)
            else:
                yield False
                return
            _write_identity(fd, [os.getpid()])
            yield True
        finally:
            os.close(fd)

    def note_agent(self, name: str, agent_pid: int) -> None:
        """Record the agent a supervisor (the caller, holding the agent lock) has just started."""
        fd = os.open(self.service_dir(name) / "agent.lock", os.O_WRONLY)
        try:
            _write_identity(fd, [agent_pid, os.getpid()])
        finally:
            os.close(fd)

    def agent_processes(self, name: str) -> list[int]:
        """The live processes of the service's agent: the agent, then its supervisor."""
        if not self.agent_alive(name):
            return []
        try:
            words = (self.service_dir(name) / "agent.lock").read_text().split()
            pairs = [(int(words[i]), words[i + 1]) for i in range(0, len(words) - 1, 2)]
        except (OSError, ValueError):
            return []  # an agent that has just taken the lock and not yet written its pid
        return [pid for pid, ticks in pairs if str(_process_start_ticks(pid)) == ticks]

    def agent_holder(self, name: str) -> int | None:
        """The pid of the service's agent (its supervisor while none runs); None when neither does."""
        return next(iter(self.agent_processes(name)), None)

    def agent_alive(self, name: str) -> bool:
        """True while some process holds the service's agent lock (immune to pid reuse)."""
        try:
            fd = os.open(self._file(name, "agent.lock"), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def read(self, name: str, kind: str) -> Document | None:
        path = self._file(name, f"{kind}.json")
        try:
            with open(path, "rb") as file:
                raw = file.read()
        except FileNotFoundError:
            return None
        try:
            document = json.loads(raw)
        except ValueError:  # also UnicodeDecodeError: binary garbage is corrupt too
            raise StoreError(
                f"the state file {path} is corrupt (not JSON); rebuild the service's record from its "
                f"containers with `dstackctl recover {name}`, or stop them with `dstackctl stop {name}`"
            ) from None
        if not isinstance(document, dict) or document.get("version") != SCHEMA_VERSION:
            version = document.get("version") if isinstance(document, dict) else None
            raise StoreError(
                f"the state file {path} has schema version {version!r}, this dstackctl reads "
                f"version {SCHEMA_VERSION}; use the dstackctl that wrote it, or rebuild the record "
                f"from the containers with `dstackctl recover {name}`"
            )
        return document

    def write(self, name: str, kind: str, document: Document) -> None:
        folder = self.service_dir(name, create=True)
        # Compact: indentation turns off the C encoder (5x the CPU for a large state).
        payload = json.dumps({**document, "version": SCHEMA_VERSION}, separators=(",", ":"), sort_keys=True)
        import tempfile  # here: `ps` reads the store and never needs it (nor random, which it loads)

        fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{kind}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:  # mkstemp creates it 0600
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, folder / f"{kind}.json")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise

    def remove_leftover_temp_files(self, name: str) -> int:
        """Delete temporary files of writes that were killed before their rename (they may hold
        secrets). Under the service's lock, so no write in progress loses its file."""
        removed = 0
        with self.lock(name):
            for path in self.service_dir(name).glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    def update(self, name: str, kind: str, change: Callable[[Document], Document | None]) -> Document:
        """Read, change and write under the service's lock; `change` may edit in place."""
        with self.lock(name):
            document = self.read(name, kind) or {}
            result = change(document)
            document = document if result is None else result
            self.write(name, kind, document)
            return document
