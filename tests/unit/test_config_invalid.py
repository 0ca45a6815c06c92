"""Invalid service files: each gets exit code 2 and a sentence with its file, line and path.

Every case goes through the CLI in-process (`dstackctl.cli.main.run`) as a user would see it.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from dstackctl.cli.main import run
from dstackctl.config.issues import ConfigError
from dstackctl.config.loader import parse_service

FILE = "svc.dstack.yml"
HEAD = "type: service\nport: 8000\n"  # lines 1 and 2 of most cases
RUNS = "commands: [serve]\n"  # appended: a file must run something (dstack's rule)


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    line: int | None
    path: str
    fragment: str


def case(id: str, body: str, line: int | None, path: str, fragment: str, *, head: bool = True) -> Case:
    text = textwrap.dedent(body)
    if head and "commands:" not in text and "image:" not in text:
        text += RUNS
    return Case(id, (HEAD + text) if head else text, line, path, fragment)


def probes(count: int) -> str:
    return "probes:\n" + "".join(f"  - type: http\n    url: /p{i}\n" for i in range(count))


def headers(count: int) -> str:
    items = "".join(f"      - name: X-H{i}\n        value: v\n" for i in range(count))
    return "probes:\n  - type: http\n    headers:\n" + items


CASES = [
    # --- the file as a whole ---
    case(
        "yaml-tab-indent",
        "type: service\nresources:\n\tgpu: 1\n",
        3,
        "",
        "invalid YAML: a tab; YAML indents with spaces only",
        head=False,
    ),
    case("yaml-unclosed-quote", 'type: service\nname: "abc\nport: 8000\n', 4, "", "invalid YAML", head=False),
    case(
        "yaml-unclosed-bracket",
        "type: service\ncommands: [a, b\nport: 8000\n",
        3,
        "",
        "expected ',' or ']'",
        head=False,
    ),
    case(
        "yaml-bad-indent", "type: service\n  port: 8000\n", 2, "", "check this line's indentation", head=False
    ),
    case(
        "yaml-list-out-of-line",
        "type: service\nport: 8000\nimage: x\nprobes:\n  - type: http\n   url: /h\n",
        6,
        "",
        "line up the items of one list, or the keys of one mapping, at the same column",
        head=False,
    ),
    case("empty-file", "", None, "", "the file is empty", head=False),
    case("only-comments", "# a service\n\n# nothing else\n", None, "", "the file is empty", head=False),
    case("list-document", "- type: service\n- port: 8000\n", 1, "", "the file holds a list", head=False),
    case("scalar-document", "type service\n", 1, "", "the file holds a string", head=False),
    case("number-document", "8000\n", 1, "", "the file holds a number", head=False),
    case(
        "two-documents", "type: service\nport: 8000\n---\ntype: service\n", 3, "", "invalid YAML", head=False
    ),
    case("binary-file", "type: service\x00\n", None, "", "binary", head=False),
    # --- type and required keys ---
    case("type-task", "type: task\nport: 8000\n", 1, "type", "dstackctl runs services only", head=False),
    case("type-fleet", "name: f\ntype: fleet\n", 2, "type", "is 'fleet'", head=False),
    case(
        "type-garbage",
        "port: 8000\ntype: servic\n",
        2,
        "type",
        "expected 'service', got 'servic'",
        head=False,
    ),
    case("type-missing", "name: abc\nport: 8000\n", 1, "type", "`type` is required", head=False),
    case("port-missing", "type: service\nname: abc\n", 1, "port", "is required", head=False),
    # --- port ---
    case(
        "port-too-large",
        "type: service\nport: 70000\n",
        2,
        "port",
        "must be at most 65535, got 70000",
        head=False,
    ),
    case("port-zero", "type: service\nport: 0\n", 2, "port", "must be at least 1", head=False),
    case(
        "port-garbage", "type: service\nport: http\n", 2, "port", "expected a port such as 8000", head=False
    ),
    case("port-bad-container", 'type: service\nport: "8080:abc"\n', 2, "port", "got '8080:abc'", head=False),
    case(
        "port-float", "type: service\nport: 8000.5\n", 2, "port", "expected a port such as 8000", head=False
    ),
    case("port-star", "type: service\nport: '*:8000'\nimage: a\n", 2, "port", "got '*:8000'", head=False),
    case("port-bool", "type: service\nport: true\n", 2, "port", "got true", head=False),
    case(
        "port-local-too-large",
        "type: service\nport:\n  container_port: 8000\n  local_port: 99999\n",
        4,
        "port.local_port",
        "must be at most 65535",
        head=False,
    ),
    # --- unknown keys ---
    case("unknown-top-level-key", "imgae: python:3.12\n", 3, "imgae", "did you mean 'image'?"),
    case("unknown-key-no-match", "zzzzzz: 1\n", 3, "zzzzzz", "unknown key 'zzzzzz'"),
    case(
        "unknown-probe-key",
        "probes:\n  - type: http\n    timeuot: 5s\n",
        5,
        "probes[0].timeuot",
        "did you mean 'timeout'?",
    ),
    case("unknown-resources-key", "resources:\n  gppu: 1\n", 4, "resources.gppu", "did you mean 'gpu'?"),
    case(
        "unknown-header-key",
        "probes:\n  - type: http\n    headers:\n      - name: A\n        vaule: b\n",
        7,
        "probes[0].headers[0].vaule",
        "did you mean 'value'?",
    ),
    # --- probes ---
    case("probe-type-tcp", "probes:\n  - type: tcp\n", 4, "probes[0].type", "expected 'http', got 'tcp'"),
    case("probe-type-missing", "probes:\n  - url: /x\n", 4, "probes[0].type", "is required"),
    case(
        "probe-timeout-zero",
        "probes:\n  - type: http\n    timeout: 0s\n",
        5,
        "probes[0].timeout",
        "between 1s and 5m, got 0s",
    ),
    case(
        "probe-timeout-301s",
        "probes:\n  - type: http\n    timeout: 301s\n",
        5,
        "probes[0].timeout",
        "got 301s",
    ),
    case(
        "probe-timeout-1h",
        "probes:\n  - type: http\n    timeout: 1h\n",
        5,
        "probes[0].timeout",
        "between 1s and 5m, got 1h",
    ),
    case(
        "probe-interval-zero",
        "probes:\n  - type: http\n    interval: 0\n",
        5,
        "probes[0].interval",
        "at least 1s",
    ),
    case(
        "probe-ready-after-zero",
        "probes:\n  - type: http\n    ready_after: 0\n",
        5,
        "probes[0].ready_after",
        "must be at least 1",
    ),
    case(
        "probe-ready-after-string",
        "probes:\n  - type: http\n    ready_after: two\n",
        5,
        "probes[0].ready_after",
        "expected an integer",
    ),
    case("too-many-probes", probes(11), 3, "probes", "has 11 items; at most 10"),
    case("too-many-headers", headers(17), 5, "probes[0].headers", "has 17 items; at most 16"),
    case(
        "probe-url-relative",
        "probes:\n  - type: http\n    url: health\n",
        5,
        "probes[0].url",
        "must start with '/'",
    ),
    case(
        "probe-url-too-long",
        "probes:\n  - type: http\n    url: /" + "a" * 2048 + "\n",
        5,
        "probes[0].url",
        "longer than 2048",
    ),
    case(
        "probe-url-control-char",
        'probes:\n  - type: http\n    url: "/a\\tb"\n',
        5,
        "probes[0].url",
        "printable",
    ),
    case(
        "probe-body-too-long",
        "probes:\n  - type: http\n    method: post\n    body: " + "b" * 2049 + "\n",
        6,
        "probes[0].body",
        "longer than 2048",
    ),
    case(
        "probe-body-empty",
        "probes:\n  - type: http\n    method: post\n    body: ''\n",
        6,
        "probes[0].body",
        "must not be empty",
    ),
    case(
        "probe-body-with-get",
        "probes:\n  - type: http\n    method: get\n    body: x\n",
        6,
        "probes[0].body",
        "not allowed with method get",
    ),
    case(
        "probe-body-with-head",
        "probes:\n  - type: http\n    method: head\n    body: x\n",
        6,
        "probes[0].body",
        "not allowed with method head",
    ),
    case(
        "probe-body-method-omitted",
        "probes:\n  - type: http\n    url: /x\n    body: x\n",
        6,
        "probes[0].body",
        "needs a method such as `method: post`",
    ),
    case(
        "probe-method-upper-case",
        "probes:\n  - type: http\n    method: POST\n",
        5,
        "probes[0].method",
        "got 'POST'",
    ),
    case(
        "probe-method-unknown",
        "probes:\n  - type: http\n    method: options\n",
        5,
        "probes[0].method",
        "expected 'get'",
    ),
    case(
        "header-name-invalid",
        "probes:\n  - type: http\n    headers:\n      - name: X Key\n        value: v\n",
        6,
        "probes[0].headers[0].name",
        "'X Key' is not a valid HTTP header name",
    ),
    case(
        "header-name-too-long",
        "probes:\n  - type: http\n    headers:\n      - name: " + "N" * 257 + "\n        value: v\n",
        6,
        "probes[0].headers[0].name",
        "longer than 256",
    ),
    case(
        "header-value-empty",
        "probes:\n  - type: http\n    headers:\n      - name: X-Key\n        value: ''\n",
        7,
        "probes[0].headers[0].value",
        "must not be empty",
    ),
    case(
        "header-name-missing",
        "probes:\n  - type: http\n    headers:\n      - value: v\n",
        6,
        "probes[0].headers[0].name",
        "is required",
    ),
    case(
        "duplicate-probes",
        "probes:\n  - type: http\n    url: /a\n  - type: http\n    url: /b\n  - type: http\n    url: /a\n",
        8,
        "probes[2]",
        "duplicates probes[0]",
    ),
    case(
        "probe-until-ready-string",
        "probes:\n  - type: http\n    until_ready: sure\n",
        5,
        "probes[0].until_ready",
        "expected true or false",
    ),
    case("probes-mapping", "probes: {}\n", 3, "probes", "expected a list, got a mapping"),
    case("probes-item-string", "probes:\n  - /health\n", 4, "probes[0]", "expected a mapping, got '/health'"),
    # --- durations ---
    case(
        "duration-compound",
        "probes:\n  - type: http\n    timeout: 1m30s\n",
        5,
        "probes[0].timeout",
        "got '1m30s'",
    ),
    case(
        "duration-negative",
        "probes:\n  - type: http\n    interval: -5\n",
        5,
        "probes[0].interval",
        "cannot be negative",
    ),
    case(
        "duration-unit",
        "probes:\n  - type: http\n    interval: 5 minutes\n",
        5,
        "probes[0].interval",
        "one number and one unit",
    ),
    case(
        "duration-float",
        "probes:\n  - type: http\n    interval: 1.5\n",
        5,
        "probes[0].interval",
        "expected a duration",
    ),
    case("retry-duration-compound", "retry:\n  duration: 1h30m\n", 4, "retry.duration", "got '1h30m'"),
    case(
        "stop-duration-garbage",
        "stop_duration: soon\n",
        3,
        "stop_duration",
        "expected a duration such as 30s or 5m, or off",
    ),
    # --- replicas ---
    case("replicas-negative", "replicas: -1\n", 3, "replicas", "cannot be negative"),
    case("replicas-range", "replicas: 1..4\n", 3, "replicas", "a range of replicas (1..4) needs `scaling`"),
    case(
        "replicas-range-negative-minimum",
        "replicas: -1..4\nscaling: {metric: rps, target: 10}\n",
        3,
        "replicas",
        "cannot be negative",
    ),
    case(
        "replicas-range-minimum-above-maximum",
        "replicas: 4..1\nscaling: {metric: rps, target: 10}\n",
        3,
        "replicas",
        "minimum above its maximum",
    ),
    case(
        "scaling-target-negative",
        "replicas: 0..2\nscaling: {metric: rps, target: -3}\n",
        4,
        "scaling.target",
        "greater than 0",
    ),
    case(
        "scaling-metric",
        "replicas: 0..2\nscaling: {metric: latency, target: 1}\n",
        4,
        "scaling.metric",
        "'rps'",
    ),
    case(
        "group-range-without-scaling",
        "replicas:\n  - count: 1..3\n    commands: [x]\n",
        4,
        "replicas[0].count",
        "a range of replicas (1..3) needs `scaling`",
    ),
    case(
        "group-scaling-fixed",
        "replicas:\n  - count: 2\n    commands: [x]\n    scaling: {metric: rps, target: 1}\n",
        6,
        "replicas[0].scaling",
        "`scaling` needs `count` to be a range",
    ),
    case("replicas-open-range", "replicas: 2..\n", 3, "replicas", "a replica range needs a maximum"),
    case(
        "scaling-fixed",
        "scaling: {metric: rps, target: 10}\n",
        3,
        "scaling",
        "`scaling` needs `replicas` to be a range",
    ),
    case(
        "scaling-target-zero",
        "replicas: 0..2\nscaling: {metric: rps, target: 0}\n",
        4,
        "scaling.target",
        "greater than 0",
    ),
    case(
        "scaling-window",
        "replicas: 0..2\nscaling: {metric: rps, target: 1, window: 45s}\n",
        4,
        "scaling.window",
        "one of 30s, 1m, 5m",
    ),
    case(
        "replicas-range-mapping",
        "replicas: {min: 1, max: 3}\n",
        3,
        "replicas",
        "a range of replicas (1..3) needs `scaling`",
    ),
    case("replicas-garbage", "replicas: many\n", 3, "replicas", "expected a replica count"),
    case("replicas-float", "replicas: 1.5\n", 3, "replicas", "expected a replica count"),
    # --- image, python ---
    case(
        "image-and-python",
        "image: python:3.12\npython: 3.12\n",
        4,
        "python",
        "`image` and `python` exclude each other",
    ),
    case("python-2", "python: 2.7\n", 3, "python", "expected '3.9', '3.10'"),
    case("python-garbage", "python: latest\n", 3, "python", "got 'latest'"),
    case("image-empty", "image: ''\n", 3, "image", "must not be empty"),
    # --- resources ---
    case("gpu-two-names", "resources:\n  gpu: A100:H100\n", 4, "resources.gpu", "two name tokens"),
    case("gpu-two-counts", "resources:\n  gpu: A100:2:4\n", 4, "resources.gpu", "two count tokens"),
    case("gpu-garbage", "resources:\n  gpu: '!!'\n", 4, "resources.gpu", "invalid GPU name list"),
    case("gpu-empty-token", "resources:\n  gpu: A100::2\n", 4, "resources.gpu", "empty token"),
    case("gpu-count-reversed", "resources:\n  gpu: 4..2\n", 4, "resources.gpu", "minimum above its maximum"),
    case(
        "gpu-memory-reversed",
        "resources:\n  gpu: 48GB..24GB\n",
        4,
        "resources.gpu",
        "minimum above its maximum",
    ),
    case(
        "gpu-mapping-unknown-key",
        "resources:\n  gpu: {name: A100, cnt: 2}\n",
        4,
        "resources.gpu",
        "unknown GPU spec key 'cnt'",
    ),
    case(
        "gpu-mapping-vendor",
        "resources:\n  gpu: {vendor: acme}\n",
        4,
        "resources.gpu",
        "unknown GPU vendor 'acme'",
    ),
    case("gpu-bool", "resources:\n  gpu: true\n", 4, "resources.gpu", "expected a GPU spec"),
    case(
        "memory-garbage",
        "resources:\n  memory: lots\n",
        4,
        "resources.memory",
        "expected a memory size such as 24GB",
    ),
    case("memory-negative", "resources:\n  memory: -5\n", 4, "resources.memory", "cannot be negative"),
    case("cpu-arch", "resources:\n  cpu: mips:4\n", 4, "resources.cpu", "expected a CPU count"),
    case("resources-scalar", "resources: 5\n", 3, "resources", "expected a mapping, got 5"),
    # --- env ---
    case("env-bad-name", "env:\n  - 1BAD=x\n", 4, "env[0]", "'1BAD' is not a valid variable name"),
    case(
        "env-bad-name-dash", "env:\n  - MY-VAR\n", 4, "env[0]", "not a valid variable name (not repeated here"
    ),
    case("env-duplicate", "env:\n  - A=1\n  - B=2\n  - A=3\n", 3, "env", "'A' is set twice"),
    case(
        "env-dict-nested",
        "env:\n  A: 1\n  B:\n    c: d\n",
        3,
        "env",
        "the value of 'B' must be a string or a number",
    ),
    case("env-item-mapping", "env:\n  - A: 1\n", 4, "env[0]", "expected a string"),
    case("env-scalar", "env: A=1\n", 3, "env", "expected a list"),
    case(
        "env-ref-missing-in-header",
        "probes:\n  - type: http\n    headers:\n      - name: X-Key\n        value: ${{ env.MISSING }}\n",
        7,
        "probes[0].headers[0].value",
        "${{ env.MISSING }} refers to 'MISSING', which `env` does not define",
    ),
    case(
        "env-ref-missing-in-url",
        "env: [OTHER]\nprobes:\n  - type: http\n    url: /${{ env.MISSING }}\n",
        6,
        "probes[0].url",
        "add `- MISSING` to env",
    ),
    case(
        "env-ref-missing-in-body",
        "probes:\n  - type: http\n    method: post\n    body: ${{ env.B }}\n",
        6,
        "probes[0].body",
        "refers to 'B'",
    ),
    case(
        "interpolation-unknown-namespace",
        "env: [X]\nprobes:\n  - type: http\n    url: /${{ foo.X }}\n",
        6,
        "probes[0].url",
        "unknown namespace 'foo'",
    ),
    case(
        "interpolation-secrets-in-probe",
        "env: [X]\nprobes:\n  - type: http\n    url: /${{ secrets.X }}\n",
        6,
        "probes[0].url",
        "unknown namespace 'secrets'",
    ),
    case(
        "interpolation-unterminated",
        "env: [X]\nprobes:\n  - type: http\n    url: /${{ env.X\n",
        6,
        "probes[0].url",
        "unterminated '${{'",
    ),
    case(
        "interpolation-unreadable",
        "env: [X]\nprobes:\n  - type: http\n    url: /${{ env }}\n",
        6,
        "probes[0].url",
        "cannot read '${{ env }}'",
    ),
    case(
        "interpolation-in-env-unknown-namespace",
        "env:\n  - A=${{ vars.X }}\n",
        4,
        "env[0]",
        "unknown namespace 'vars'",
    ),
    # --- name, duplicates ---
    case("name-upper-case", "name: Llama31\n", 3, "name", "'Llama31' is not a valid run name"),
    case("name-too-short", "name: a\n", 3, "name", "2 to 41 characters"),
    case("name-number", "name: 42\n", 3, "name", "expected a string, got 42"),
    case(
        "duplicate-yaml-key",
        "name: one\nreplicas: 1\nname: two\n",
        5,
        "name",
        "is given twice (first at line 3)",
    ),
    case(
        "duplicate-nested-key",
        "resources:\n  gpu: 1\n  gpu: 2\n",
        5,
        "resources.gpu",
        "is given twice (first at line 4)",
    ),
    # --- volumes ---
    case(
        "volume-no-colon",
        "volumes:\n  - /data\n",
        4,
        "volumes[0]",
        "expected a volume such as /host/path:/container/path",
    ),
    case(
        "volume-relative-target",
        "volumes:\n  - /data:data\n",
        4,
        "volumes[0]",
        "the container path must be absolute, got 'data'",
    ),
    case(
        "volume-mapping-relative",
        "volumes:\n  - name: v\n    path: data\n",
        5,
        "volumes[0].path",
        "the container path must be absolute",
    ),
    case("volume-number", "volumes:\n  - 5\n", 4, "volumes[0]", "expected a mapping, got 5"),
    # --- other service and run keys ---
    case(
        "groups-and-replicas",
        "replicas: 2\ngroups:\n  - count: 1\n    commands: [a]\n",
        1,
        "",
        "`replicas` and `groups` exclude each other",
    ),
    case(
        "registry-auth-no-password",
        "registry_auth:\n  username: me\n",
        3,
        "registry_auth.password",
        "is required",
    ),
    case(
        "retry-bad-event", "retry:\n  on_events: [no-capacity, boom]\n", 4, "retry.on_events[1]", "got 'boom'"
    ),
    case("retry-string", "retry: always\n", 3, "retry", "expected a mapping"),
    case(
        "strip-prefix-sentence",
        'strip_prefix: "yes please"\n',
        3,
        "strip_prefix",
        "expected true or false, got 'yes please'",
    ),
    case("spot-policy", "spot_policy: cheap\n", 3, "spot_policy", "expected 'spot', 'on-demand' or 'auto'"),
    case("commands-string", "commands: echo hi\n", 3, "commands", "expected a list, got 'echo hi'"),
    case("commands-number", "commands:\n  - echo\n  - 5\n", 5, "commands[1]", "expected a string, got 5"),
    case("model-empty", "model: ''\n", 3, "model", "must not be empty"),
    case(
        "model-format", "model:\n  name: m\n  format: vllm\n", 5, "model.format", "expected 'openai' or 'tgi'"
    ),
    case("privileged-number", "privileged: 1\n", 3, "privileged", "expected true or false, got 1"),
]


def expected_prefix(path: Path, line: int | None, dotted: str) -> str:
    where = str(path) if line is None else f"{path}:{line}"
    return f"{where}: {dotted}: " if dotted else f"{where}: "


def test_there_are_at_least_forty_cases_with_unique_ids() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) >= 40
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_invalid_file(c: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / FILE
    path.write_bytes(c.text.encode())
    code = run(["validate", str(path)])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert out.startswith(f"{path}: invalid (")
    prefix = expected_prefix(path, c.line, c.path)
    matching = [line.strip() for line in err.splitlines() if line.strip().startswith(prefix)]
    assert matching, f"no line starts with {prefix!r} in:\n{err}"
    assert any(c.fragment in line for line in matching), f"{c.fragment!r} not in {matching}"


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_invalid_file_issue_objects(c: Case) -> None:
    """The same through the loader: the issue has the line and path, and a real sentence."""
    with pytest.raises(ConfigError) as exc:
        parse_service(c.text, FILE)
    issues = exc.value.issues
    assert any((i.line, i.path) == (c.line, c.path) and c.fragment in i.message for i in issues), [
        str(i) for i in issues
    ]
    for issue in issues:
        assert issue.file == FILE
        assert len(issue.message) > 8
        assert "Input should" not in issue.message  # pydantic's wording, not translated
        assert "validation error" not in issue.message
    assert [i.line or 0 for i in issues] == sorted(i.line or 0 for i in issues)


def test_every_problem_of_a_file_at_once_in_line_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "many.yml"
    path.write_text(
        textwrap.dedent(
            """\
            type: service
            name: Bad_Name
            image: python:3.12
            python: 3.12
            port: 70000
            replicas: -2
            imgae: x
            probes:
              - type: http
                timeout: 0s
              - type: http
                method: get
                body: x
              - type: http
                url: /${{ env.NOPE }}
              - type: http
                method: get
                body: x
            resources:
              gpu: A100:H100
            env:
              - 1BAD=s3cr3t-value
            """
        )
    )
    assert run(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == f"{path}: invalid (12 problems)\n"
    lines = [line.strip() for line in err.splitlines()]
    assert [line.split(": ")[0:2] for line in lines] == [
        [f"{path}:2", "name"],
        [f"{path}:4", "python"],
        [f"{path}:5", "port"],
        [f"{path}:6", "replicas"],
        [f"{path}:7", "imgae"],
        [f"{path}:10", "probes[0].timeout"],
        [f"{path}:13", "probes[1].body"],
        [f"{path}:15", "probes[2].url"],
        [f"{path}:16", "probes[3]"],
        [f"{path}:18", "probes[3].body"],
        [f"{path}:20", "resources.gpu"],
        [f"{path}:22", "env[0]"],
    ]
    assert "duplicates probes[1]" in lines[8]
    assert "s3cr3t-value" not in out + err


def test_several_files_each_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yml"
    good.write_text(HEAD + RUNS)
    bad = tmp_path / "bad.yml"
    bad.write_text(HEAD + "replicas: x\n")
    missing = tmp_path / "missing.yml"
    assert run(["validate", str(good), str(bad), str(missing), str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{good}: valid (service, 1 replica, 0 probes)",
        f"{bad}: invalid (1 problem)",
        f"{missing}: invalid (1 problem)",
        f"{tmp_path}: invalid (1 problem)",
    ]
    assert f"{bad}:3: replicas: " in err
    assert f"{missing}: no such file" in err
    assert f"{tmp_path}: is a folder, not a service file" in err
    assert "Traceback" not in err


def test_check_env_makes_a_missing_bare_variable_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DSTACKCTL_TEST_UNSET", raising=False)
    path = tmp_path / "svc.yml"
    path.write_text(
        HEAD + RUNS + "env:\n  - DSTACKCTL_TEST_UNSET\n  - B=${{ secrets.DSTACKCTL_TEST_UNSET }}\n"
    )
    # Without --check-env: valid, with a warning that `run` will need it.
    assert run(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path}:5: env[0]: DSTACKCTL_TEST_UNSET is listed without a value" in err
    assert "(needed by `run`)" in err
    # With it: exit 2, one sentence per variable, no traceback.
    assert run(["validate", "--check-env", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == f"{path}: invalid (2 problems)\n"
    assert f"{path}:5: env[0]: DSTACKCTL_TEST_UNSET is listed without a value and is not set" in err
    assert (
        f"{path}:6: env[1]: B uses ${{{{ secrets.DSTACKCTL_TEST_UNSET }}}}, but DSTACKCTL_TEST_UNSET" in err
    )
    assert "Traceback" not in err
    monkeypatch.setenv("DSTACKCTL_TEST_UNSET", "value")
    assert run(["validate", "--check-env", str(path)]) == 0


# --- values that may be secret never appear in an error -------------------------------------

SECRET = "supersecret"

LEAKY = [
    ("env-bad-name", "env:\n  - 1BAD=supersecret\n"),
    ("env-colon-instead-of-equals", "env:\n  - HF_TOKEN:supersecret\n"),
    ("env-space-instead-of-equals", "env:\n  - HF_TOKEN supersecret\n"),
    ("env-item-mapping", "env:\n  - HF_TOKEN: supersecret\n"),
    ("env-duplicate", "env:\n  - A=supersecret\n  - A=supersecret\n"),
    ("env-dict-nested", "env:\n  A: [supersecret]\n"),
    ("env-dict-duplicate", "env:\n  A: supersecret\n  A: supersecret\n"),
    ("env-unknown-namespace", "env:\n  - A=supersecret${{ foo.X }}\n"),
    ("env-unterminated", "env:\n  - A=supersecret${{ env.X\n"),
    ("env-list-number", "env:\n  - 5\n  - supersecret=x\n  - B=supersecret\n"),
    ("registry-auth-wrong-type", "registry_auth:\n  username: [supersecret]\n  password: {a: supersecret}\n"),
    (
        "registry-auth-unknown-key",
        "registry_auth:\n  username: u\n  password: supersecret\n  token: supersecret\n",
    ),
    ("registry-auth-missing", "registry_auth:\n  password: supersecret\n"),
    ("registry-auth-scalar", "registry_auth: supersecret\n"),
    ("env-scalar", "env: supersecret\n"),
]


@pytest.mark.parametrize(("id", "body"), LEAKY, ids=[i for i, _ in LEAKY])
def test_secret_values_never_appear_in_errors(
    id: str, body: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "svc.yml"
    path.write_text(HEAD + body)
    assert run(["validate", "--check-env", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.strip(), "expected an error sentence"
    assert SECRET not in out + err
