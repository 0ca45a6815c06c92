"""The console script's collector policy (dstackctl/cli/gc_policy.py), run in a subprocess:
it changes process-wide state that pytest's own process must keep."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def test_a_wait_after_a_paused_start_freezes_the_start_up_heap_and_collects_again() -> None:
    out = _run(
        """
        import gc
        from dstackctl.cli import gc_policy
        gc_policy.pause()
        import dstackctl.config.loader
        paused = gc.isenabled()
        gc_policy.resume_for_a_long_run()
        print(paused, gc.isenabled(), gc.get_freeze_count() > 10_000)
        """
    )
    assert out == "False True True"


def test_a_wait_in_a_process_that_never_paused_changes_nothing() -> None:
    out = _run(
        """
        import gc
        from dstackctl.cli import gc_policy
        gc_policy.resume_for_a_long_run()
        print(gc.isenabled(), gc.get_freeze_count())
        """
    )
    assert out == "True 0"


def test_the_console_script_exits_with_the_start_up_heap_frozen() -> None:
    out = _run(
        """
        import gc, sys
        from dstackctl.cli import entry
        sys.argv = ["dstackctl", "validate", "/nonexistent.yml"]
        try:
            entry.main()
        except SystemExit as exit:
            print(exit.code, gc.isenabled(), gc.get_freeze_count() > 10_000)
        """
    )
    assert out.splitlines()[-1] == "2 False True"
