"""Hand-written service files for the parity tier: (id, YAML text).

An id starts with `ok-` when dstack 0.22.5 accepts the file and with `bad-` when it rejects it
(test_dstack_parity checks that too, so a case cannot silently test something else).
Whether dstackctl agrees is the parity test's business; where it does not, differences.py
says why.
"""

from __future__ import annotations

import textwrap

HEAD = "type: service\nport: 8000\n"


def service(body: str) -> str:
    """A service file: `type` and `port`, then `body` (dedented)."""
    return HEAD + textwrap.dedent(body).lstrip("\n")


def two_groups(first: str = "", second: str = "", above: str = "image: lmsysorg/sglang:latest\n") -> str:
    """A service with `above` at its own level and two groups, `prefill` and `decode`, with extra
    lines `first` and `second` (each line indented as a group key)."""
    return service(
        above
        + "groups:\n  - name: prefill\n    count: 1\n    commands: [serve --prefill]\n"
        + textwrap.indent(textwrap.dedent(first).lstrip("\n"), "    ")
        + "  - name: decode\n    count: 2\n    commands: [serve --decode]\n"
        + textwrap.indent(textwrap.dedent(second).lstrip("\n"), "    ")
    )


def routed(router: str = "router: {type: smg}", count: str = "count: 1", above: str = "") -> str:
    """A router group and a worker group (dstack's SGLang/SMG pattern)."""
    return service(
        above
        + "groups:\n"
        + f"  - name: router\n    {count}\n    {router}\n    image: lmsysorg/sgl-model-gateway:latest\n"
        + "  - name: workers\n    count: 2\n    image: lmsysorg/sglang:latest\n"
        + "    commands: [python -m sglang.launch_server --port 8000]\n"
    )


SCALING = "scaling:\n  metric: rps\n  target: 10\n"

CASES: list[tuple[str, str]] = [
    # --- replica groups: `replicas:` as a list, and `groups:` --------------------------------
    (
        "ok-replicas-as-list",
        service("""
            image: lmsysorg/sglang:latest
            replicas:
              - count: 1
                commands: [serve --prefill]
              - count: 2
                commands: [serve --decode]
            """),
    ),
    (
        "ok-groups",
        service("""
            image: lmsysorg/sglang:latest
            groups:
              - count: 1
                commands: [serve --prefill]
              - count: 2
                commands: [serve --decode]
            """),
    ),
    (
        "ok-group-replicas-key",
        service("""
            image: x
            groups:
              - replicas: 2
                commands: [a]
            """),
    ),
    (
        "ok-group-count-alias",
        service("""
            image: x
            groups:
              - count: 2
                commands: [a]
            """),
    ),
    (
        "ok-group-count-and-replicas",  # dstack drops `count` when `replicas` is given, unread
        service("""
            image: x
            groups:
              - count: not-a-number
                replicas: 2
            """),
    ),
    (
        "bad-group-without-count",
        service("""
            image: x
            groups:
              - commands: [a]
            """),
    ),
    ("bad-groups-empty", service("image: x\ngroups: []\n")),
    ("bad-replicas-empty-list", service("image: x\nreplicas: []\n")),
    (
        "bad-replicas-and-groups",
        service("""
            image: x
            replicas: 2
            groups:
              - count: 1
            """),
    ),
    (
        "bad-replicas-list-and-groups",
        service("""
            image: x
            replicas:
              - count: 1
            groups:
              - count: 1
            """),
    ),
    ("bad-service-level-count", service("image: x\ncount: 2\n")),
    (
        "ok-groups-image-above-no-commands",
        service("""
            image: x
            groups:
              - count: 1
              - count: 2
            """),
    ),
    (
        "bad-group-nothing-to-run",
        service("""
            groups:
              - count: 1
                commands: [a]
              - count: 1
            """),
    ),
    (
        "ok-group-resources",
        service("""
            image: x
            resources: {gpu: 24GB}
            groups:
              - count: 1
                resources: {gpu: 80GB}
            """),
    ),
    (
        "ok-group-spot-policy",
        service("""
            image: x
            groups:
              - count: 1
                spot_policy: on-demand
            """),
    ),
    (
        "bad-group-unknown-key",
        service("""
            image: x
            groups:
              - count: 1
                ports: [8000]
            """),
    ),
    # --- group names ---------------------------------------------------------------------------
    ("ok-group-name", two_groups()),
    (
        "ok-group-name-digits-and-dash",
        service("image: x\ngroups:\n  - name: 0-prefill-2\n    count: 1\n"),
    ),
    ("ok-group-name-40-chars", service(f"image: x\ngroups:\n  - name: {'a' * 40}\n    count: 1\n")),
    ("bad-group-name-41-chars", service(f"image: x\ngroups:\n  - name: {'a' * 41}\n    count: 1\n")),
    ("bad-group-name-upper-case", service("image: x\ngroups:\n  - name: Prefill\n    count: 1\n")),
    ("bad-group-name-underscore", service("image: x\ngroups:\n  - name: pre_fill\n    count: 1\n")),
    ("bad-group-name-leading-dash", service("image: x\ngroups:\n  - name: -prefill\n    count: 1\n")),
    ("bad-group-name-empty", service("image: x\ngroups:\n  - name: ''\n    count: 1\n")),
    (
        "ok-group-name-number",  # dstack turns YAML numbers into strings (coerce_numbers_to_str)
        service("image: x\ngroups:\n  - name: 7\n    count: 1\n"),
    ),
    (
        "bad-group-name-duplicate",
        service("image: x\ngroups:\n  - name: worker\n    count: 1\n  - name: worker\n    count: 1\n"),
    ),
    (
        "bad-group-name-duplicates-a-position",  # the first group is named "0" by its position
        service("image: x\ngroups:\n  - count: 1\n  - name: '0'\n    count: 1\n"),
    ),
    # --- image / python / docker / nvcc at the service level ----------------------------------
    ("ok-service-image", service("image: x\n")),
    ("ok-service-python", service("python: '3.12'\ncommands: [a]\n")),
    ("ok-service-python-float", service("python: 3.10\ncommands: [a]\n")),
    ("bad-service-python-3-8", service("python: '3.8'\ncommands: [a]\n")),
    ("ok-service-python-nvcc", service("python: '3.12'\nnvcc: true\ncommands: [a]\n")),
    ("ok-service-nvcc", service("nvcc: true\ncommands: [a]\n")),
    ("ok-service-docker", service("docker: true\ncommands: [docker compose up]\n")),
    ("ok-service-image-docker-false", service("image: x\ndocker: false\n")),
    ("ok-service-image-nvcc", service("image: x\nnvcc: true\n")),  # the docs say exclusive; not checked
    ("bad-service-image-python", service("image: x\npython: '3.12'\n")),
    ("bad-service-image-docker", service("image: x\ndocker: true\n")),
    ("bad-service-python-docker", service("python: '3.12'\ndocker: true\ncommands: [a]\n")),
    ("bad-service-nvcc-docker", service("nvcc: true\ndocker: true\ncommands: [a]\n")),
    ("ok-service-docker-privileged-false", service("docker: true\nprivileged: false\ncommands: [a]\n")),
    # --- ... at the group level -------------------------------------------------------------
    ("ok-group-image", two_groups("image: y\n", "image: z\n", above="")),
    ("ok-group-python", two_groups("python: '3.12'\n", "python: '3.11'\n", above="")),
    ("ok-group-docker", two_groups("docker: true\n", "docker: true\n", above="")),
    ("ok-group-nvcc", two_groups("nvcc: true\n", "", above="")),
    ("ok-group-python-nvcc", two_groups("python: '3.12'\nnvcc: true\n", "", above="")),
    ("ok-group-image-nvcc", two_groups("image: y\nnvcc: true\n", "", above="")),
    ("ok-groups-different-sources", two_groups("image: y\n", "docker: true\n", above="")),
    ("bad-group-image-python", two_groups("image: y\npython: '3.12'\n", "", above="")),
    ("bad-group-image-docker", two_groups("image: y\ndocker: true\n", "", above="")),
    ("bad-group-python-docker", two_groups("python: '3.12'\ndocker: true\n", "", above="")),
    ("bad-group-nvcc-docker", two_groups("nvcc: true\ndocker: true\n", "", above="")),
    ("bad-group-docker-privileged-false", two_groups("docker: true\nprivileged: false\n", "", above="")),
    (
        "bad-group-privileged-false-then-docker",  # the order of the keys does not matter
        two_groups("privileged: false\ndocker: true\n", "", above=""),
    ),
    ("ok-group-docker-privileged-true", two_groups("docker: true\nprivileged: true\n", "", above="")),
    ("ok-group-privileged-false", two_groups("privileged: false\n", "", above="")),
    # --- ... at both levels -------------------------------------------------------------------
    ("bad-image-service-and-group", two_groups("image: y\n")),
    ("bad-image-service-python-group", two_groups("python: '3.12'\n")),
    ("bad-image-service-docker-group", two_groups("docker: true\n")),
    ("bad-image-service-docker-false-group", two_groups("docker: false\n")),  # any value counts
    ("bad-image-service-nvcc-group", two_groups("nvcc: true\n")),
    ("bad-python-service-image-group", two_groups("image: y\n", above="python: '3.12'\n")),
    ("bad-python-service-python-group", two_groups("python: '3.11'\n", above="python: '3.12'\n")),
    ("bad-python-service-docker-group", two_groups("docker: true\n", above="python: '3.12'\n")),
    ("ok-python-service-nvcc-group", two_groups("nvcc: true\n", above="python: '3.12'\n")),
    ("bad-docker-service-python-group", two_groups("python: '3.12'\n", above="docker: true\n")),
    ("bad-docker-service-nvcc-group", two_groups("nvcc: true\n", above="docker: true\n")),
    ("ok-docker-false-service-docker-group", two_groups("docker: true\n", above="docker: false\n")),
    ("bad-nvcc-service-image-group", two_groups("image: y\n", above="nvcc: true\n")),
    ("bad-nvcc-service-docker-group", two_groups("docker: true\n", above="nvcc: true\n")),
    ("ok-nvcc-service-python-group", two_groups("python: '3.12'\n", above="nvcc: true\n")),
    (
        "bad-privileged-service-and-group",
        two_groups("privileged: true\n", above="image: x\nprivileged: true\n"),
    ),
    (
        "ok-privileged-false-service-group-set",
        two_groups("privileged: true\n", above="image: x\nprivileged: false\n"),
    ),
    (
        "bad-spot-policy-service-and-group",
        two_groups("spot_policy: spot\n", above="image: x\nspot_policy: auto\n"),
    ),
    # --- routers -------------------------------------------------------------------------------
    ("ok-router-smg", routed()),
    ("ok-router-sglang", routed("router: {type: sglang}")),  # the name of smg before 0.22.4
    ("ok-router-dynamo", routed("router: {type: dynamo}")),
    ("ok-router-default-type", routed("router: {}")),
    ("bad-router-unknown-type", routed("router: {type: vllm}")),
    ("bad-router-extra-key", routed("router: {type: sglang, pd_disaggregation: true}")),
    ("bad-router-group-2-replicas", routed(count="count: 2")),
    ("bad-router-group-range", routed(count="count: 1..2\n    scaling: {metric: rps, target: 10}")),
    ("ok-router-group-range-1-1", routed(count="count: 1..1")),
    (
        "bad-two-router-groups",
        service("""
            image: x
            groups:
              - name: router-a
                count: 1
                router: {type: smg}
              - name: router-b
                count: 1
                router: {type: dynamo}
              - name: workers
                count: 2
            """),
    ),
    ("bad-service-level-router", service("image: x\nrouter: {type: sglang}\n")),
    ("bad-service-level-router-smg", service("image: x\nrouter: {type: smg}\n")),
    ("bad-service-and-group-router", routed(above="router: {type: smg}\n")),
    # --- replicas and scaling ------------------------------------------------------------------
    ("ok-replicas-fixed", service("image: x\nreplicas: 2\n")),
    ("ok-replicas-zero", service("image: x\nreplicas: 0\n")),
    ("bad-replicas-negative", service("image: x\nreplicas: -1\n")),
    ("bad-scaling-with-fixed-replicas", service("image: x\nreplicas: 2\n" + SCALING)),
    ("bad-scaling-with-range-1-1", service("image: x\nreplicas: 1..1\n" + SCALING)),
    ("ok-scaling-without-replicas", service("image: x\n" + SCALING)),  # not checked by dstack
    ("bad-range-without-scaling", service("image: x\nreplicas: 1..4\n")),
    ("ok-range-with-scaling", service("image: x\nreplicas: 1..4\n" + SCALING)),
    ("ok-range-from-zero", service("image: x\nreplicas: 0..2\n" + SCALING)),
    ("ok-range-without-minimum", service("image: x\nreplicas: ..3\n" + SCALING)),
    ("bad-range-without-maximum", service("image: x\nreplicas: 1..\n" + SCALING)),
    ("bad-scaling-target-0", service("image: x\nreplicas: 1..4\nscaling: {metric: rps, target: 0}\n")),
    ("bad-scaling-metric", service("image: x\nreplicas: 1..4\nscaling: {metric: cpu, target: 10}\n")),
    (
        "bad-scaling-window-45s",
        service("image: x\nreplicas: 1..4\nscaling: {metric: rps, target: 1, window: 45s}\n"),
    ),
    (
        "ok-scaling-window-30s",
        service("image: x\nreplicas: 1..4\nscaling: {metric: rps, target: 1, window: 30s}\n"),
    ),
    (
        "ok-scaling-window-5m",
        service("image: x\nreplicas: 1..4\nscaling: {metric: rps, target: 1, window: 5m}\n"),
    ),
    (
        "ok-scaling-delays",
        service(
            "image: x\nreplicas: 1..4\n"
            "scaling: {metric: rps, target: 1, scale_up_delay: 1m, scale_down_delay: 20m}\n"
        ),
    ),
    ("bad-group-range-without-scaling", two_groups("", "count: 1..4\n")),
    (
        "ok-group-range-with-scaling",
        service("image: x\ngroups:\n  - count: 1..4\n    scaling: {metric: rps, target: 5}\n"),
    ),
    ("bad-group-scaling-with-fixed-count", two_groups("scaling: {metric: rps, target: 5}\n")),
    ("bad-scaling-above-groups", two_groups(above="image: x\n" + SCALING)),
    # --- what to run ---------------------------------------------------------------------------
    ("bad-neither-commands-nor-image", service("")),
    ("bad-python-without-commands", service("python: '3.12'\n")),
    ("ok-commands-without-image", service("commands: [python -m http.server 8000]\n")),
    ("bad-commands-above-groups", two_groups(above="image: x\ncommands: [a]\n")),
    ("ok-empty-commands-above-groups", two_groups(above="image: x\ncommands: []\n")),
    # --- dstack: true --------------------------------------------------------------------------
    ("ok-dstack-true", service("image: x\ndstack: true\n")),
    ("ok-dstack-false", service("image: x\ndstack: false\n")),
    ("bad-dstack-in-group", service("image: x\ngroups:\n  - count: 1\n    dstack: true\n")),
    # --- where dstackctl and dstack part (see differences.py) ---------------------------------
    ("ok-duplicate-key", service("image: x\nimage: y\n")),
    ("ok-run-name-upper-case", service("name: My_Service\nimage: x\n")),
    (
        "ok-eleven-probes",
        service("image: x\nprobes:\n" + "".join(f"  - type: http\n    url: /p{i}\n" for i in range(11))),
    ),
    ("ok-user-number", service("image: x\nuser: 1000\n")),  # a YAML number, made a string by dstack
    ("ok-commands-number", service("image: x\ncommands: [42]\n")),
    ("bad-port-star", service("image: x\n").replace("port: 8000", "port: '*:8000'")),
]
