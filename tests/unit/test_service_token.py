"""The bearer token of a service with `auth: true` (issue 15 item 5): made once, kept 0600 in the
store, read by the agent, printed by `dstackctl token NAME`; and `auth` as a real setting."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from helpers import cli

from dstackctl.agent.desired import DesiredReader
from dstackctl.config.loader import load_service_file
from dstackctl.config.models import IGNORED_FIELDS
from dstackctl.service_token import TOKEN, ensure_token, keep_token, read_token
from dstackctl.spec_document import DeploymentRecord, SpecDocument
from dstackctl.store import HOME_VARIABLE, SPEC, Store


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    home = tmp_path / "home"
    monkeypatch.setenv(HOME_VARIABLE, str(home))
    return Store(home)


def record_service(store: Store, name: str, config: dict[str, object], desired: str = "stopped") -> None:
    """A service as `run` records it (stopped: nothing needs Docker)."""
    current = DeploymentRecord(0, "hash", 1, {"type": "service", "port": 8000, **config})
    store.write(name, SPEC, SpecDocument(name=name, run_id="r1", current=current, desired=desired).to_json())


def test_the_token_is_made_once_and_kept_in_a_private_file(store: Store) -> None:
    first = ensure_token(store, "svc")

    assert len(first) >= 40
    assert ensure_token(store, "svc") == first
    assert read_token(store, "svc") == first
    path = store.service_dir("svc") / f"{TOKEN}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_an_unreadable_token_file_is_no_token_and_gets_a_new_one(store: Store) -> None:
    old = ensure_token(store, "svc")
    (store.service_dir("svc") / f"{TOKEN}.json").write_text("{broken")

    assert read_token(store, "svc") is None
    new = ensure_token(store, "svc")
    assert new != old and read_token(store, "svc") == new


def test_keep_token_makes_one_only_for_a_config_with_auth(store: Store) -> None:
    keep_token(store, "open", {"auth": False})
    keep_token(store, "closed", {"auth": True})
    assert read_token(store, "open") is None
    assert read_token(store, "closed") is not None


def test_token_command_prints_the_token_of_a_service_with_auth(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    record_service(store, "guarded", {"auth": True})

    shown = cli(capsys, "token", "guarded")

    assert shown.code == 0
    assert shown.out == f"{read_token(store, 'guarded')}\n"
    assert cli(capsys, "token", "guarded").out == shown.out


def test_token_command_refuses_an_unknown_service_as_ps_does(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    ps = cli(capsys, "ps", "nosuch")
    token = cli(capsys, "token", "nosuch")
    assert (token.code, token.out, token.err) == (ps.code, "", ps.err) == (1, "", ps.err)
    assert cli(capsys, "token", "../x").code == 1


def test_token_command_says_when_auth_is_off(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    record_service(store, "open", {})

    result = cli(capsys, "token", "open")

    assert result.code == 1 and result.out == ""
    assert result.err.startswith("error: open has auth off") and result.err.count("\n") == 1
    assert read_token(store, "open") is None


def test_the_agent_reads_the_token_only_when_auth_is_on(store: Store) -> None:
    record_service(store, "guarded", {"auth": True}, desired="running")
    token = ensure_token(store, "guarded")
    record_service(store, "open", {}, desired="running")
    ensure_token(store, "open")  # left from an earlier `auth: true`: not used now

    guarded = DesiredReader(store, "guarded").read()
    opened = DesiredReader(store, "open").read()

    assert guarded is not None and guarded.auth and guarded.auth_token == token
    assert token not in repr(guarded)
    assert opened is not None and not opened.auth and opened.auth_token is None


def test_auth_is_a_setting_not_an_ignored_cloud_field(tmp_path: Path) -> None:
    path = tmp_path / "svc.yml"
    path.write_text("type: service\nport: 8000\nimage: app\nauth: true\n")
    loaded = load_service_file(path)

    assert loaded.config.auth is True
    assert loaded.warnings == []
    assert "auth" not in IGNORED_FIELDS
    path.write_text("type: service\nport: 8000\nimage: app\n")
    assert load_service_file(path).config.auth is False  # dstack's default is true: a difference


def test_validate_and_the_dry_run_say_auth_is_on_and_how_to_get_the_token(
    tmp_path: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "svc.yml"
    path.write_text("type: service\nname: web\nport: 8000\nimage: app\nauth: true\n")

    validated = cli(capsys, "validate", str(path))
    planned = cli(capsys, "run", "--dry-run", str(path))

    assert validated.code == 0 and "auth on: `dstackctl token web`" in validated.out
    assert planned.code == 0 and "  auth:      bearer token" in planned.out
    assert "`dstackctl token web`" in planned.out
    path.write_text("type: service\nname: web\nport: 8000\nimage: app\n")
    assert "  auth:      off" in cli(capsys, "run", "--dry-run", str(path)).out
