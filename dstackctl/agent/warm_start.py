"""A supervisor forked before it is needed, so that `run` does not wait for its imports.

`run` and `apply` fork it first thing, while the CLI has loaded nothing. It imports the
agent's modules (docker-py, the config models, the agent) on the machine's other core while
the CLI imports typer and pydantic, validates the file and checks Docker. When the CLI has
written the spec it hands the service over through a pipe and the warm process becomes the
service's supervisor at once. When the CLI needs no new agent (the service runs, the file is
invalid, the CLI failed or was killed), the pipe closes and the warm process exits.

Only the console script uses this (cli/entry.py): forking is safe in a process that has
started no thread and opened nothing; library callers keep `agent/process.py`'s default.
"""

from __future__ import annotations

import os
import select

# The write end of the pipe, in the CLI; None when there is no warm supervisor (any more).
_handoff: int | None = None
# A warm supervisor that was never handed a service exits after this long (a CLI that holds
# it longer, e.g. at a confirmation prompt, starts its agent the usual way).
IDLE_EXIT_SECONDS = 120.0


def prepare() -> None:
    """Fork the warm supervisor (double fork: it is reparented to init, never a zombie of
    the CLI). Call once, from a single-threaded process, before it opens anything."""
    global _handoff
    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(read_end)
        os.waitpid(child, 0)
        _handoff = write_end
        return
    code = 1
    try:
        os.close(write_end)
        os.setsid()  # a Ctrl-C at the CLI's terminal is not for it
        code = 0 if os.fork() else _wait_for_service(read_end)
    except BaseException:  # nothing may return into the CLI's code from here
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def hand_over(home: str, name: str) -> bool:
    """Have the warm supervisor run `name`'s agent in `home` (an absolute path); False when
    there is none (not prepared, already used, or it exited), and the caller starts one."""
    global _handoff
    if _handoff is None:
        return False
    fd, _handoff = _handoff, None
    try:
        os.write(fd, f"{home}\0{name}\n".encode())
        return True
    except OSError:  # it exited: no reader is left on the pipe
        return False
    finally:
        os.close(fd)


def release() -> None:
    """The CLI will start no agent: the warm supervisor, if any, exits."""
    global _handoff
    if _handoff is not None:
        fd, _handoff = _handoff, None
        os.close(fd)


def _wait_for_service(read_end: int) -> int:
    """In the warm process: detach from the CLI's terminal and folders, import, then wait."""
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # a CLI run with its output in a pipe must see EOF when it exits
        os.dup2(null, fd)
    os.close(null)
    from dstackctl.agent.process import preload, set_title

    set_title("dstackctl-agent (warming up)")
    preload()
    ready, _, _ = select.select([read_end], [], [], IDLE_EXIT_SECONDS)
    message = _read_message(read_end) if ready else b""
    os.close(read_end)
    home, _, name = message.decode(errors="replace").rstrip("\n").partition("\0")
    if not message.endswith(b"\n") or not home or not name:
        return 0  # released, timed out, or the CLI died mid-write: nothing to run
    from dstackctl.agent.process import become_supervisor

    return become_supervisor(home, name)


def _read_message(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"".join(chunks)
