"""What a file gives its replicas of this machine (issue 15, item 9): refused when it cannot
work, warned when it hands over the host, and run as dstack runs it otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstackctl.config.exposure import MAX_REPLICAS
from dstackctl.config.issues import ConfigError
from dstackctl.config.loader import parse_service
from dstackctl.config.models import ServiceConfiguration
from dstackctl.replica_spec import ReplicaSpec, build_replica_spec

HEAD = "type: service\nimage: busybox\nport: 8000\ncommands: [httpd]\n"


def spec_of(config: ServiceConfiguration) -> ReplicaSpec:
    return build_replica_spec(
        config=config,
        run_name="svc",
        run_id="r",
        home=Path("/tmp"),
        replica_num=0,
        deployment_num=0,
        cfg_hash="h",
        env_values={},
        config_dir=Path("/srv/project"),
        container_suffix="x",
    )


def warnings_of(text: str) -> list[str]:
    return [str(issue) for issue in parse_service(HEAD + text, "svc.yml").warnings]


def test_two_volumes_of_one_host_path_are_both_mounted() -> None:
    config = parse_service(HEAD + "volumes: [/data:/a, /data:/b, ./rel:/c:ro]\n").config
    assert spec_of(config).binds == ["/data:/a:rw", "/data:/b:rw", "/srv/project/rel:/c:ro"]


def test_two_volumes_at_one_container_path_are_refused_with_the_line() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_service(HEAD + "volumes:\n  - /one:/data\n  - /two:/data/\n", "svc.yml")
    [issue] = exc.value.issues
    assert (issue.line, issue.path) == (7, "volumes[1]")
    assert "/data is already the path of volume 1" in issue.message


@pytest.mark.parametrize(
    ("volume", "words"),
    [
        ("/:/host", "mounts the root of this machine"),
        ("/var/run/docker.sock:/var/run/docker.sock", "the Docker socket"),
        ("/run/docker.sock:/d.sock", "the Docker socket"),
        ("/etc/shadow:/s", "mounts /etc/shadow"),
        ("/etc:/host-etc:ro", "mounts /etc,"),
        ("~/.ssh:/keys", "/.ssh, which holds"),
    ],
)
def test_a_mount_that_hands_over_the_host_is_warned_about(volume: str, words: str) -> None:
    [warning] = warnings_of(f"volumes: ['{volume}']\n")
    assert "svc.yml:5: volumes[0]:" in warning and words in warning, warning


def test_ordinary_mounts_and_named_volumes_are_not_warned_about() -> None:
    assert warnings_of("volumes: [/srv/data:/data, ./models:/models, cache:/root/.cache]\n") == []


def test_privileged_is_warned_about_at_the_service_and_in_a_group() -> None:
    [warning] = warnings_of("privileged: true\n")
    assert "svc.yml:5: privileged: runs the replicas privileged" in warning
    text = "type: service\nport: 8000\nreplicas:\n  - count: 1\n    image: busybox\n"
    text += "    commands: [x]\n    privileged: true\n"
    [issue] = parse_service(text, "svc.yml").warnings
    assert (issue.line, issue.path) == (7, "replicas[0].privileged")


@pytest.mark.parametrize("replicas", [f"{MAX_REPLICAS + 1}", "100000000", "0..5000"])
def test_more_replicas_than_one_machine_can_run_are_refused(replicas: str) -> None:
    scaling = "scaling: {metric: rps, target: 1}\n" if ".." in replicas else ""
    with pytest.raises(ConfigError) as exc:
        parse_service(HEAD + f"replicas: {replicas}\n{scaling}", "svc.yml")
    [issue] = exc.value.issues
    assert issue.path == "replicas" and f"at most {MAX_REPLICAS} per service" in issue.message


def test_the_most_replicas_allowed_validate() -> None:
    assert parse_service(HEAD + f"replicas: {MAX_REPLICAS}\n").config.total_replicas == MAX_REPLICAS


def test_a_relative_working_dir_is_under_workflow_as_in_dstack() -> None:
    spec = spec_of(parse_service(HEAD + "working_dir: app/src\n").config)
    assert spec.working_dir == "/workflow/app/src"
    assert spec.environment["DSTACK_WORKING_DIR"] == "/workflow/app/src"
    assert spec_of(parse_service(HEAD + "working_dir: /opt\n").config).working_dir == "/opt"


def test_dry_run_lists_the_volumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dstackctl.cli.main import run

    monkeypatch.setenv("DSTACKCTL_HOME", str(tmp_path / "home"))
    path = tmp_path / "svc.dstack.yml"
    path.write_text(HEAD + "volumes: [/data:/a, '/data:/b:ro']\n")
    assert run(["run", "--dry-run", str(path)]) == 0
    assert "  volumes:   /data -> /a, /data -> /b (read-only)" in capsys.readouterr().out
