"""Fixtures of the parity tier: a virtualenv with dstack, and dstack's verdict on every case.

The virtualenv lives in .cache/dstack-<version>/ at the repository root and is made once
(`python -m venv`, `pip install dstack==<version>`); later sessions reuse it. Set
DSTACK_PARITY_PYTHON to the python of another virtualenv with the same dstack to use that
instead. When dstack cannot be installed (no network, no registry) the tier is skipped, with
pip's own words as the reason; it never fails for that.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from corpus import DSTACK_VERSION, PARITY_SCRIPT, REPO_ROOT, Verdict, all_cases

VENV = REPO_ROOT / ".cache" / f"dstack-{DSTACK_VERSION}"
INSTALLED_MARK = VENV / ".installed"  # written last: a venv without it is half made
PIP_TIMEOUT_S = 900
PARSE_TIMEOUT_S = 300


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _dstack_version(python: str | Path) -> str | None:
    try:
        run = subprocess.run(
            [str(python), "-c", "import dstack.version as v; print(v.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except OSError:
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _make_cache_folder() -> None:
    """.cache/ with a .gitignore of its own (as .pytest_cache has), so the venv is never committed
    even where the repository's .gitignore does not name .cache/."""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    ignore = VENV.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# Made by tests/parity/conftest.py: everything here is a cache.\n*\n")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One pytest process at a time builds the venv; the others wait, then reuse it."""
    _make_cache_folder()
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _install() -> None:
    """Make VENV with dstack==DSTACK_VERSION; pytest.skip when that cannot be done."""
    shutil.rmtree(VENV, ignore_errors=True)
    where = VENV.relative_to(REPO_ROOT)
    steps = {
        f"python -m venv {where}": [sys.executable, "-m", "venv", str(VENV)],
        f"pip install dstack=={DSTACK_VERSION}": [
            str(_venv_python(VENV)),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            f"dstack=={DSTACK_VERSION}",
        ],
    }
    for label, step in steps.items():
        try:
            run = subprocess.run(step, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            shutil.rmtree(VENV, ignore_errors=True)
            pytest.skip(f"`{label}` took more than {PIP_TIMEOUT_S}s; is the registry reachable?")
        if run.returncode != 0:
            shutil.rmtree(VENV, ignore_errors=True)
            pytest.skip(
                f"could not install dstack=={DSTACK_VERSION} into {where} "
                f"(`{label}` exited {run.returncode}; no network or no registry?):\n"
                + _tail(run.stdout + run.stderr)
            )
    INSTALLED_MARK.write_text(DSTACK_VERSION + "\n")


@pytest.fixture(scope="session")
def dstack_python() -> str:
    """The python of a virtualenv with dstack DSTACK_VERSION."""
    override = os.environ.get("DSTACK_PARITY_PYTHON")
    if override:
        found = _dstack_version(override)
        if found != DSTACK_VERSION:
            pytest.fail(
                f"DSTACK_PARITY_PYTHON={override} has dstack {found or '(none)'}, "
                f"not {DSTACK_VERSION}; unset it to let the tier make its own venv",
                pytrace=False,
            )
        return override
    python = _venv_python(VENV)
    with _locked(VENV.with_name(VENV.name + ".lock")):
        if not (INSTALLED_MARK.exists() and _dstack_version(python) == DSTACK_VERSION):
            _install()
    return str(python)


@pytest.fixture(scope="session")
def dstack_verdicts(dstack_python: str) -> dict[str, Verdict]:
    """dstack's verdict on every case of the tier, from one run of scripts/dstack_parity.py."""
    batch = json.dumps([{"id": case.id, "text": case.text} for case in all_cases()])
    run = subprocess.run(
        [dstack_python, str(PARITY_SCRIPT)],
        input=batch,
        capture_output=True,
        text=True,
        timeout=PARSE_TIMEOUT_S,
        check=False,
    )
    if run.returncode != 0:
        pytest.fail(
            f"scripts/dstack_parity.py exited {run.returncode}:\n{_tail(run.stderr, 30)}", pytrace=False
        )
    return {item["id"]: Verdict(item["accepted"], item["error"]) for item in json.loads(run.stdout)}


@pytest.fixture(scope="session")
def case_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the cases are written for dstackctl to load them."""
    return tmp_path_factory.mktemp("parity")
