"""Replica groups, routers and scaling rules: what loads, and every dstack error with its line."""

from __future__ import annotations

import textwrap

import pytest

from dstackctl.config.issues import ConfigError
from dstackctl.config.loader import parse_service
from dstackctl.config.units import Range

PD = """\
type: service
name: pd
port: 8000
replicas:
  - name: router
    count: 1
    router:
      type: sglang
    commands: [router --port 8000]
  - name: prefill
    replicas: 2
    image: lmsysorg/sglang
    commands: [serve --prefill]
    resources: {gpu: 1}
  - count: 1
    python: 3.12
    commands: [serve --decode]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_service(textwrap.dedent(text), "svc.yml")
    return [f"{i.line}: {i.path}: {i.message}" for i in exc.value.issues]


def test_groups_load_with_names_by_position_counts_and_their_own_fields() -> None:
    config = parse_service(PD, "pd.yml").config
    groups = config.replica_groups
    assert [g.name for g in groups] == ["router", "prefill", "2"]
    assert config.group_counts == {"router": 1, "prefill": 2, "2": 1}
    assert config.total_replicas == 4
    assert groups[0].router is not None and groups[0].router.type == "smg"  # `sglang` is the old name
    assert groups[1].image == "lmsysorg/sglang" and groups[1].commands == ["serve --prefill"]
    assert groups[1].resources.gpu is not None
    assert groups[2].python == "3.12"


def test_groups_key_is_the_same_as_replicas_as_a_list() -> None:
    written = PD.replace("replicas:\n  - name: router", "groups:\n  - name: router")
    assert parse_service(written).config.group_counts == {"router": 1, "prefill": 2, "2": 1}


def test_a_service_without_groups_is_one_group_named_0() -> None:
    config = parse_service("type: service\nport: 80\nimage: app\nreplicas: 3\ncommands: [x]\n").config
    [group] = config.replica_groups
    assert (group.name, group.size, group.commands) == ("0", Range(3, 3), ["x"])


def test_replicas_wins_over_count_as_in_dstack() -> None:
    text = "type: service\nport: 80\nreplicas:\n  - {count: 1, replicas: 3, image: a}\n"
    assert parse_service(text).config.group_counts == {"0": 3}


def test_cloud_keys_of_a_group_and_dstack_true_warn_with_their_lines() -> None:
    text = (
        "type: service\nport: 80\ndstack: true\nreplicas:\n  - count: 1\n    image: a\n    reservation: r\n"
    )
    warnings = [str(w) for w in parse_service(text, "svc.yml").warnings]
    assert warnings == [
        "svc.yml:3: dstack: has no effect here: there is no dstack server on this machine",
        "svc.yml:7: replicas[0].reservation: is a dstack cloud setting; ignored on one machine",
    ]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "replicas:\n  - count: 1\n    image: a\n    python: 3.12\n",
            "7: replicas[0].python: `image` and `python` exclude each other within a replica group",
        ),
        (
            "replicas:\n  - count: 1\n    commands: [x]\n    docker: true\n    privileged: false\n",
            "8: replicas[0].privileged: `privileged: false` does not go with `docker: true`",
        ),
        (
            "replicas:\n  - name: Big\n    count: 1\n    image: a\n",
            "5: replicas[0].name: 'Big' is not a valid group name",
        ),
        (
            "replicas:\n  - {name: a, count: 1, image: a}\n  - {name: a, count: 1, image: b}\n",
            "6: replicas[1].name: duplicates the name of group 0",
        ),
        (
            "replicas:\n  - count: 2\n    image: a\n    scaling: {metric: rps, target: 1}\n",
            "7: replicas[0].scaling: `scaling` needs `count` to be a range",
        ),
        (
            "replicas:\n  - count: 1..3\n    image: a\n",
            "5: replicas[0].count: a range of replicas (1..3) needs `scaling`",
        ),
        ("replicas:\n  - image: a\n", "5: replicas[0]: a replica group needs `count`"),
        ("replicas:\n  - count: 1\n", "5: replicas[0]: nothing to run"),
        (
            "replicas:\n  - {count: 2, image: a, router: {type: smg}}\n",
            "5: replicas[0].count: the router group must have exactly 1 replica",
        ),
        (
            "replicas:\n  - {count: 1, image: a, router: {}}\n  - {count: 1, image: a, router: {}}\n",
            "6: replicas[1].router: only one replica group may run the router",
        ),
        ("router: {type: smg}\nimage: a\n", "4: router: since dstack 0.21 the router is a replica group"),
        (
            "image: a\nreplicas:\n  - {count: 1, image: b}\n",
            "4: image: `image` is set here and in group(s) 0; set it in one place",
        ),
        (
            "python: 3.12\nreplicas:\n  - {count: 1, image: b, commands: [x]}\n",
            "4: python: `python` here conflicts with `image` in group(s) 0",
        ),
        (
            "commands: [x]\nreplicas:\n  - {count: 1, image: b}\n",
            "4: commands: with replica groups, `commands` belongs in each group",
        ),
        ("replicas: []\n", "4: replicas: a list of replica groups needs at least one group"),
        ("image: a\ndocker: true\n", "5: docker: `image` and `docker` exclude each other"),
        ("python: 3.12\n", "1: : nothing to run: set `commands`, or `image`"),
    ],
)
def test_every_group_rule_of_dstack_is_refused_with_its_line(body: str, expected: str) -> None:
    found = problems("type: service\nname: svc\nport: 8000\n" + body)
    assert any(line.startswith(expected) for line in found), found


def test_docker_true_runs_the_dind_image_privileged_with_dockerd_started_first() -> None:
    from pathlib import Path

    from dstackctl.replica_spec import build_replica_spec, image_of

    group = "{name: dind, count: 1, docker: true, commands: [docker ps]}"
    text = f"type: service\nport: 80\nreplicas:\n  - {group}\n"
    config = parse_service(text).config.for_group("dind")
    assert image_of(config, {}) == "dstackai/dind"
    assert image_of(config, {"DSTACK_DIND_IMAGE": "my/dind"}) == "my/dind"
    spec = build_replica_spec(
        config=config,
        run_name="svc",
        run_id="r",
        home=Path("/tmp"),
        group="dind",
        replica_num=0,
        deployment_num=0,
        cfg_hash="h",
        env_values={},
        config_dir=Path("/tmp"),
        container_suffix="x",
    )
    assert spec.privileged
    assert spec.entrypoint == ["/bin/bash", "-c"] and spec.command == ["start-dockerd && docker ps"]
    assert spec.labels["dstackctl.group"] == "dind" and spec.name == "dstackctl-svc-dind-0-x"


def test_a_group_takes_its_own_image_commands_resources_and_probes() -> None:
    config = parse_service(PD.replace("probes", "p"), "pd.yml").config
    prefill = config.for_group("prefill")
    assert (prefill.image, prefill.commands, prefill.groups) == ("lmsysorg/sglang", ["serve --prefill"], None)
    assert prefill.resources.gpu is not None
    decode = config.for_group("2")
    assert (decode.python, decode.image, decode.resources.gpu) == ("3.12", None, None)


def test_with_a_router_only_the_router_gets_the_default_model_probe() -> None:
    config = parse_service(PD + "model: m\n", "pd.yml").config
    assert [p.url for p in config.for_group("router").effective_probes()] == ["/v1/chat/completions"]
    assert config.for_group("prefill").effective_probes() == []
