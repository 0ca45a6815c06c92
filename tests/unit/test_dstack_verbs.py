"""dstack's verbs and flags: `apply`, .dstack.yml by default, asking before an update, `ps -w/-n`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dstackctl.cli import ps_view
from dstackctl.cli.changes import config_changes, confirm_update
from dstackctl.cli.main import run
from dstackctl.errors import DstackctlError, ExitCode

SERVICE = "type: service\nname: web\nport: 8000\nimage: app\n"


def test_validate_and_run_read_dstack_yml_in_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(["validate"]) == ExitCode.USAGE
    assert "run this where a .dstack.yml is" in capsys.readouterr().err
    (tmp_path / ".dstack.yml").write_text(SERVICE)
    assert run(["validate"]) == ExitCode.OK
    assert capsys.readouterr().out == ".dstack.yml: valid (service web, 1 replica, 0 probes)\n"
    assert run(["run", "--dry-run"]) == ExitCode.OK
    assert "Plan for web" in capsys.readouterr().out


def test_apply_is_a_command_with_dstacks_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["apply", "--help"]) == ExitCode.OK
    text = capsys.readouterr().out
    for flag in ("-f, --file", "-y, --yes", "--force", "-d, --detach", "-n, --name"):
        assert flag in text
    assert run(["stop", "--help"]) == ExitCode.OK
    assert "-x, --abort" in capsys.readouterr().out


def test_the_changes_name_keys_and_never_show_env_values() -> None:
    old = {"image": "app:1", "env": ["TOKEN"], "port": 8000}
    new = {"image": "app:2", "env": ["TOKEN", "MODE"], "port": 8000}
    assert config_changes(old, new, {"0": 1}, {"0": 2}, env_changed=False) == [
        "env: [TOKEN] -> [TOKEN, MODE]",
        "image: app:1 -> app:2",
        "replicas: 1 -> 2",
    ]
    assert config_changes(old, old, {"0": 1}, {"0": 1}, env_changed=True) == [
        "env: values change (not shown)"
    ]


def test_an_update_without_a_terminal_and_without_yes_exits_2_saying_how(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(DstackctlError) as exc:
        confirm_update("web", ["image: a -> b"], yes=False)
    assert exc.value.exit_code == ExitCode.USAGE
    assert "pass -y to update it" in exc.value.message
    assert "  image: a -> b" in capsys.readouterr().err
    confirm_update("web", ["image: a -> b"], yes=True)  # -y: no question, no output
    assert capsys.readouterr().err == ""


def test_ps_watch_prints_a_table_per_interval_until_ctrl_c(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = []

    def show() -> int:
        shown.append(1)
        print("TABLE")
        if len(shown) == 3:
            raise KeyboardInterrupt
        return 0

    monkeypatch.setattr(ps_view.time, "sleep", lambda _: None)
    assert ps_view.watch_runs(show, interval=0) == ExitCode.OK
    assert capsys.readouterr().out == "TABLE\n\nTABLE\n\nTABLE\n"


def test_ps_last_n_shows_the_most_recent_services_stopped_ones_too(
    dstack_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dstackctl.store import Store

    store = Store(dstack_home)
    for index, name in enumerate(["old", "mid", "new"]):
        spec = {"name": name, "run_id": f"r{index}", "desired": "stopped", "deployment_num": 0}
        store.write(name, "spec", {**spec, "submitted_at": f"2026-12-0{index + 1}T00:00:00Z"})
    assert run(["ps", "-n", "2", "--json"]) == ExitCode.OK
    assert [r["name"] for r in json.loads(capsys.readouterr().out)["runs"]] == ["new", "mid"]


def test_a_service_with_a_failed_replica_is_degraded_not_running(dstack_home: Path) -> None:
    from dstackctl.runs import view
    from dstackctl.status import ObservedState, ReplicaRow
    from dstackctl.store import Store

    store = Store(dstack_home)
    store.write("web", "spec", {"name": "web", "run_id": "r1", "desired": "running", "replicas": 2})
    ok = ReplicaRow(replica_num=0, deployment_num=0, status="running", phase="ready", ready=True)
    failed = ReplicaRow(replica_num=1, deployment_num=0, status="failed", phase="failed", exit_code=3)
    state = ObservedState("web", "r1", status="running", target_replicas=2, replicas=(ok, failed))
    store.write("web", "state", state.to_json())
    shown = view(store, "web")
    assert shown is not None and shown.status == "degraded"
    starting = ReplicaRow(replica_num=1, deployment_num=0, status="running", phase="starting")
    store.write("web", "state", {**state.to_json(), "replicas": [ok.to_json(), starting.to_json()]})
    shown = view(store, "web")
    assert shown is not None and shown.status == "running"  # still starting: not degraded


def test_counts_read_as_english() -> None:
    from dstackctl.wording import count_of

    assert [count_of(n, "replica") for n in (0, 1, 2)] == ["0 replicas", "1 replica", "2 replicas"]


def test_garbage_in_a_stopped_services_state_is_a_warning_not_a_failure(
    dstack_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dstackctl.store import Store

    store = Store(dstack_home)
    store.write("gone", "spec", {"name": "gone", "run_id": "r1", "desired": "stopped"})
    (store.service_dir("gone") / "state.json").write_text("{garbage")
    assert run(["ps", "-a"]) == ExitCode.OK
    out, err = capsys.readouterr()
    assert "gone" in out and "terminated" in out
    assert err.startswith("warning: the state file ") and "gone is stopped, so ps shows it without it" in err
    store.write("live", "spec", {"name": "live", "run_id": "r2", "desired": "running"})
    (store.service_dir("live") / "state.json").write_text("{garbage")
    assert run(["ps", "-a"]) == ExitCode.FAILED  # a running service's broken state: recover it


def test_ps_help_says_when_it_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["ps", "--help"]) == ExitCode.OK
    assert "1 when NAME is no service" in " ".join(capsys.readouterr().out.split())
    assert run(["ps", "nosuch"]) == ExitCode.FAILED


def test_a_home_that_cannot_be_created_is_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dstackctl.store import Store, StoreError

    monkeypatch.setenv("DSTACKCTL_HOME", "/proc/nope")
    with pytest.raises(StoreError) as exc:
        Store().service_dir("web", create=True)
    assert exc.value.message.startswith("cannot create the folder /proc/nope")
    assert "point DSTACKCTL_HOME at a folder you can write" in exc.value.message


def test_debug_is_accepted_after_any_command(dstack_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["ps", "--debug"]) == ExitCode.OK
    assert run(["stop", "nosuch", "--debug"]) == ExitCode.FAILED  # not a usage error
    assert "no service named" in capsys.readouterr().err
    assert run(["logs", "--", "--debug"]) != ExitCode.OK  # after `--` it is an argument


def test_docker_is_found_as_the_docker_cli_finds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import json as json_module

    from dstackctl.docker import DockerEngine, DockerError
    from dstackctl.docker_address import DockerAddressError, engine_address

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.docker: the default context
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    assert engine_address() is None
    monkeypatch.setenv("DOCKER_CONTEXT", "nosuch")
    with pytest.raises(DockerAddressError, match="the Docker context 'nosuch' does not exist"):
        engine_address()
    # A context as `docker context create remote --docker host=unix:///tmp/x.sock` writes it.
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text("{}")
    meta = tmp_path / ".docker" / "contexts" / "meta" / hashlib.sha256(b"remote").hexdigest()
    meta.mkdir(parents=True)
    document = {"Name": "remote", "Metadata": {}, "Endpoints": {"docker": {"Host": "unix:///tmp/x.sock"}}}
    (meta / "meta.json").write_text(json_module.dumps(document))
    monkeypatch.setenv("DOCKER_CONTEXT", "remote")
    assert engine_address() == "unix:///tmp/x.sock"
    with pytest.raises(DockerError, match=r"cannot reach unix:///tmp/x\.sock"):
        DockerEngine.connect(timeout=2)
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/y.sock")
    with pytest.raises(DockerAddressError, match="both set"):
        engine_address()


def test_shell_completion_knows_the_commands_and_the_services(dstack_home: Path) -> None:
    import os
    import subprocess
    import sys

    from dstackctl.store import Store

    Store(dstack_home).write("webapp", "spec", {"name": "webapp", "run_id": "r1", "desired": "running"})

    def complete(words: str) -> list[str]:
        env = {
            **os.environ,
            "_DSTACKCTL_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - 1),
        }
        done = subprocess.run([sys.executable, "-m", "dstackctl"], env=env, capture_output=True, text=True)
        return done.stdout.split()

    assert set(complete("dstackctl re")) == {"redeploy", "recover"}
    assert complete("dstackctl stop we") == ["webapp"]


def test_dry_run_prints_the_plan_and_names_a_missing_variable_and_missing_gpus_with_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NEEDED_TOKEN_X", raising=False)
    monkeypatch.setattr("dstackctl.gpus.discover", lambda: [])
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    path = tmp_path / "svc.yml"
    path.write_text(SERVICE + "env:\n  - NEEDED_TOKEN_X\nresources:\n  gpu: A100:2\n")
    assert run(["run", "--dry-run", str(path)]) == ExitCode.USAGE
    out, err = capsys.readouterr()
    assert out.startswith("Plan for web (nothing was started):") and "NEEDED_TOKEN_X" in out
    assert f"error: {path}:6: env[0]: NEEDED_TOKEN_X is listed without a value" in err
    assert f"error: {path}:8: resources.gpu: needs 2 x A100 for 1 replica; found no NVIDIA GPU" in err
    monkeypatch.setenv("NEEDED_TOKEN_X", "set")
    assert run(["run", "--dry-run", str(path)]) == ExitCode.FAILED  # only the GPUs are missing


def test_ps_fits_the_terminal_unless_wide(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=(80, 24): os.terminal_size((80, 24)))
    table = "short\n" + "x" * 120
    assert ps_view._fit(table, wide=False).split("\n") == ["short", "x" * 79 + "…"]
    assert ps_view._fit(table, wide=True) == table
