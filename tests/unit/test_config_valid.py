"""Service files that must load, and the exact values they load to.

The seed (`/work/shared/reference/seed-service-probes.txt`, "Introducing service probes") is
copied below verbatim; every value it states is asserted.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from dstackctl.cli.main import run
from dstackctl.config.gpu import GpuSpec
from dstackctl.config.issues import ConfigError
from dstackctl.config.loader import LoadedConfig, load_service_file, parse_service
from dstackctl.config.models import ServiceConfiguration
from dstackctl.config.probe_values import resolve_probes
from dstackctl.config.units import Range

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "samples").glob("*.yml"))

SEED_LLAMA31 = """\
type: service
name: llama31

python: 3.12
env:
  - HF_TOKEN
commands:
  - uv pip install vllm
  - |
    vllm serve meta-llama/Meta-Llama-3.1-8B-Instruct \\
      --max-model-len 4096 \\
      --tensor-parallel-size $DSTACK_GPUS_NUM
port: 8000
model: meta-llama/Meta-Llama-3.1-8B-Instruct

probes:
  - type: http
    url: /health
    interval: 15s

replicas: 2

resources:
  gpu: 24GB..48GB
"""

SEED_ADVANCED = """\
env:
  - PROBES_API_KEY
probes:
  - type: http
    method: post
    url: /check-health
    headers:
      - name: X-API-Key
        value: ${{ env.PROBES_API_KEY }}
      - name: Content-Type
        value: application/json
    body: '{"level": 2}'
    timeout: 20s
"""


def load(text: str) -> LoadedConfig:
    """`text` as a file; one that runs nothing (dstack refuses those) gets `commands: [serve]`."""
    return parse_service(runnable(textwrap.dedent(text)), "test.yml")


def runnable(text: str) -> str:
    if any(key in text for key in ("commands:", "image:", "groups:", "replicas:\n  -")):
        return text
    return text + ("" if text.endswith("\n") else "\n") + "commands: [serve]\n"


def service(extra: str = "") -> ServiceConfiguration:
    """A minimal service with `extra` (dedented YAML) appended."""
    return load("type: service\nport: 8000\n" + textwrap.dedent(extra)).config


# --- samples and the seed --------------------------------------------------------------------


def test_there_are_samples() -> None:
    assert {path.name for path in SAMPLES} >= {
        "llama31.dstack.yml",
        "advanced-probes.dstack.yml",
        "demo.dstack.yml",
    }


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_sample_validates(path: Path) -> None:
    loaded = load_service_file(path)
    assert loaded.config.type == "service"
    assert loaded.warnings == []


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_sample_validates_through_the_cli(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HF_TOKEN", "PROBES_API_KEY"):
        monkeypatch.setenv(name, "x")
    assert run(["validate", "--check-env", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: valid (service ")
    assert err == ""


def test_the_seed_text_is_the_llama31_sample() -> None:
    assert (REPO / "samples" / "llama31.dstack.yml").read_text() == SEED_LLAMA31


def test_seed_llama31_parses_to_exactly_the_values_it_states() -> None:
    config = parse_service(SEED_LLAMA31, "llama31.dstack.yml").config
    assert config.type == "service"
    assert config.name == "llama31"
    assert config.python == "3.12"
    assert config.image is None
    assert config.env == ["HF_TOKEN"]
    assert config.environment == {"HF_TOKEN": None}
    assert config.commands == [
        "uv pip install vllm",
        "vllm serve meta-llama/Meta-Llama-3.1-8B-Instruct \\\n"
        "  --max-model-len 4096 \\\n"
        "  --tensor-parallel-size $DSTACK_GPUS_NUM\n",
    ]
    assert config.port.container_port == 8000
    assert config.port.local_port is None
    assert config.model is not None
    assert config.model.name == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert (config.model.type, config.model.format, config.model.prefix) == ("chat", "openai", "/v1")
    assert config.total_replicas == 2

    assert config.probes is not None
    [probe] = config.probes
    assert probe.type == "http"
    assert probe.url == "/health"
    assert probe.interval == 15
    # What the seed leaves out takes dstack's defaults.
    assert probe.method == "get"
    assert probe.headers == []
    assert probe.body is None
    assert probe.timeout == 10
    assert probe.ready_after == 1
    assert probe.until_ready is False
    # Explicit probes replace the model's default probe.
    assert config.effective_probes() == [probe]

    gpu = config.resources.gpu
    assert gpu == GpuSpec(memory=Range(24.0, 48.0), count=Range(1, 1))
    assert gpu is not None
    assert (gpu.vendor, gpu.names, gpu.total_memory) == (None, (), None)
    assert str(gpu) == "24GB..48GB:1"
    assert config.resources.cpu is None
    assert config.resources.memory is None


def test_seed_advanced_probe_parses_to_exactly_the_values_it_states() -> None:
    loaded = parse_service(runnable("type: service\nport: 8000\n" + SEED_ADVANCED), "advanced.yml")
    config = loaded.config
    assert config.environment == {"PROBES_API_KEY": None}
    assert config.probes is not None
    [probe] = config.probes
    assert probe.type == "http"
    assert probe.method == "post"
    assert probe.url == "/check-health"
    assert [(h.name, h.value) for h in probe.headers] == [
        ("X-API-Key", "${{ env.PROBES_API_KEY }}"),
        ("Content-Type", "application/json"),
    ]
    assert probe.body == '{"level": 2}'
    assert probe.timeout == 20
    assert (probe.interval, probe.ready_after, probe.until_ready) == (15, 1, False)

    [resolved] = resolve_probes(loaded.config, loaded.resolve_env({"PROBES_API_KEY": "k-123"}), loaded.issue)
    assert [(h.name, h.value) for h in resolved.headers] == [
        ("X-API-Key", "k-123"),
        ("Content-Type", "application/json"),
    ]
    assert (resolved.url, resolved.body) == ("/check-health", '{"level": 2}')


def test_advanced_sample_holds_the_seed_probe_block() -> None:
    sample = load_service_file(REPO / "samples" / "advanced-probes.dstack.yml").config
    seed = parse_service(runnable("type: service\nport: 8000\n" + SEED_ADVANCED)).config
    assert sample.probes == seed.probes
    assert sample.env == seed.env


# --- GPU ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("1", GpuSpec(count=Range(1, 1))),
        ('"2"', GpuSpec(count=Range(2, 2))),
        ("0", GpuSpec(count=Range(0, 0))),
        ("A100:2", GpuSpec(names=("A100",), count=Range(2, 2))),
        ("A100", GpuSpec(names=("A100",), count=Range(1, 1))),
        ("24GB..48GB", GpuSpec(memory=Range(24.0, 48.0))),
        ("24GB..", GpuSpec(memory=Range(24.0, None))),
        ("nvidia:A10G,L4:1..2", GpuSpec(vendor="nvidia", names=("A10G", "L4"), count=Range(1, 2))),
        ("A10G,L4:24GB:2", GpuSpec(names=("A10G", "L4"), memory=Range(24.0, 24.0), count=Range(2, 2))),
        ("H100:80GB:8", GpuSpec(names=("H100",), memory=Range(80.0, 80.0), count=Range(8, 8))),
        ("amd:MI300X:2", GpuSpec(vendor="amd", names=("MI300X",), count=Range(2, 2))),
        ("NVIDIA:2..", GpuSpec(vendor="nvidia", count=Range(2, None))),
        (
            "{name: [A10G, L4], count: 1..2, memory: 24GB..}",
            GpuSpec(names=("A10G", "L4"), count=Range(1, 2), memory=Range(24.0, None)),
        ),
        ("{name: A100}", GpuSpec(names=("A100",))),
        (
            "{vendor: nvidia, count: {min: 1, max: 4}, total_memory: 80GB..}",
            GpuSpec(vendor="nvidia", count=Range(1, 4), total_memory=Range(80.0, None)),
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_gpu_forms(written: str, expected: GpuSpec) -> None:
    gpu = service(f"resources:\n  gpu: {written}\n").resources.gpu
    assert gpu == expected


# --- port, env, python, durations, replicas --------------------------------------------------


@pytest.mark.parametrize(
    ("written", "container", "local"),
    [
        ("8000", 8000, None),
        ('"8000"', 8000, None),
        ('"8080:8000"', 8000, 8080),
        ("{container_port: 8000}", 8000, None),
        ("{container_port: 8000, local_port: 9000}", 8000, 9000),
        ("1", 1, None),
        ("65535", 65535, None),
    ],
)
def test_port_forms(written: str, container: int, local: int | None) -> None:
    config = load(f"type: service\nport: {written}\n").config
    assert (config.port.container_port, config.port.local_port) == (container, local)


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("[A=1, B]", {"A": "1", "B": None}),
        ('["A=x=y", "EMPTY="]', {"A": "x=y", "EMPTY": ""}),
        (
            "{A: 1, B: null, C: x=y, D: true, E: 1.5, _F: ''}",
            {"A": "1", "B": None, "C": "x=y", "D": "true", "E": "1.5", "_F": ""},
        ),
        ("{TOKEN: }", {"TOKEN": None}),
        ("[]", {}),
        ("{}", {}),
    ],
)
def test_env_forms(written: str, expected: dict[str, str | None]) -> None:
    assert service(f"env: {written}\n").environment == expected


def test_env_list_form_block_style_with_bare_names() -> None:
    config = service(
        """
        env:
          - HF_TOKEN
          - MODEL=meta-llama/Meta-Llama-3.1-8B-Instruct
          - _private_1
        """
    )
    assert config.environment == {
        "HF_TOKEN": None,
        "MODEL": "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "_private_1": None,
    }


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("3.10", "3.10"),
        ("3.12", "3.12"),
        ("3.9", "3.9"),
        ('"3.11"', "3.11"),
        ("'3.10'", "3.10"),
        ("3.13", "3.13"),
    ],
)
def test_python_versions_written_as_numbers(written: str, expected: str) -> None:
    assert service(f"python: {written}\n").python == expected


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("30", 30),
        ('"30"', 30),
        ("30s", 30),
        ("1m", 60),
        ("2h", 7200),
        ("1d", 86400),
        ("1w", 604800),
        ("15 s", 15),
    ],
)
def test_probe_interval_durations(written: str, seconds: int) -> None:
    config = service(f"probes:\n  - type: http\n    interval: {written}\n")
    assert config.probes is not None
    assert config.probes[0].interval == seconds


@pytest.mark.parametrize(
    ("written", "seconds"), [("1", 1), ('"30"', 30), ("30s", 30), ("1m", 60), ("5m", 300)]
)
def test_probe_timeout_durations(written: str, seconds: int) -> None:
    config = service(f"probes:\n  - type: http\n    timeout: {written}\n")
    assert config.probes is not None
    assert config.probes[0].timeout == seconds


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("off", "off"),
        ('"off"', "off"),
        ("false", "off"),
        ("30s", 30),
        ("2m", 120),
        ("45", 45),
        ("true", None),
    ],
)
def test_stop_duration_forms(written: str, expected: int | str | None) -> None:
    # dstack: `off` (YAML reads it as false) disables the limit; `true` means the default.
    assert service(f"stop_duration: {written}\n").stop_duration == expected


@pytest.mark.parametrize(
    ("written", "expected"),
    [("2", 2), ('"2"', 2), ('"2..2"', 2), ("2..2", 2), ("0", 0), ("{min: 3, max: 3}", 3)],
)
def test_replicas_forms(written: str, expected: int) -> None:
    assert service(f"replicas: {written}\n").total_replicas == expected


def test_replicas_default_to_one() -> None:
    assert service().replicas is None
    assert service().total_replicas == 1
    assert service().group_counts == {"0": 1}


def test_retry_forms() -> None:
    assert service().retry is None
    assert service("retry: false\n").retry is None
    every = service("retry: true\n").retry
    assert every is not None
    assert every.on_events == ["no-capacity", "interruption", "error"]
    assert every.duration is None
    some = service("retry:\n  on_events: [error]\n  duration: 1h\n").retry
    assert some is not None
    assert (some.on_events, some.duration) == (["error"], 3600)


def test_volume_forms() -> None:
    config = service(
        """
        volumes:
          - /data/models:/models
          - /cache:/root/.cache:ro
          - name: my-volume
            path: /volume_data
          - instance_path: /mnt/disk
            path: /disk
            optional: true
        """
    )
    got = [(v.source, v.path, v.read_only, v.optional, v.is_host_path) for v in config.volumes]
    assert got == [
        ("/data/models", "/models", False, False, True),
        ("/cache", "/root/.cache", True, False, True),
        ("my-volume", "/volume_data", False, False, False),
        ("/mnt/disk", "/disk", False, True, True),
    ]


def test_resources_cpu_memory_shm() -> None:
    resources = service(
        """
        resources:
          cpu: x86:4
          memory: 16GB..64GB
          shm_size: 512MB
        """
    ).resources
    assert resources.cpu == Range(4, 4)
    assert resources.memory == Range(16.0, 64.0)
    assert resources.shm_size == 0.5
    assert service("resources:\n  cpu: 2..8\n").resources.cpu == Range(2, 8)
    assert service("resources:\n  cpu: {arch: arm, count: 4}\n").resources.cpu == Range(4, 4)


def test_model_forms() -> None:
    short = service("model: Qwen/Qwen2.5-0.5B-Instruct\n").model
    long = service("model:\n  type: chat\n  name: Qwen/Qwen2.5-0.5B-Instruct\n  format: openai\n").model
    assert short == long
    assert short is not None
    assert (short.name, short.prefix) == ("Qwen/Qwen2.5-0.5B-Instruct", "/v1")


# --- probes ---------------------------------------------------------------------------------


def test_probe_defaults() -> None:
    config = service("probes:\n  - type: http\n")
    assert config.probes is not None
    [probe] = config.probes
    assert probe.type == "http"
    assert probe.url == "/"
    assert probe.method == "get"
    assert probe.headers == []
    assert probe.body is None
    assert probe.timeout == 10
    assert probe.interval == 15
    assert probe.ready_after == 1
    assert probe.until_ready is False


def test_every_probe_field_set() -> None:
    config = service(
        """
        env: [KEY=abc]
        probes:
          - type: http
            url: /v1/models?x=1
            method: put
            headers:
              - name: Authorization
                value: Bearer ${{ env.KEY }}
            body: "{}"
            timeout: 5m
            interval: 1s
            ready_after: 3
            until_ready: true
        """
    )
    assert config.probes is not None
    [probe] = config.probes
    assert (probe.url, probe.method, probe.body) == ("/v1/models?x=1", "put", "{}")
    assert (probe.timeout, probe.interval, probe.ready_after, probe.until_ready) == (300, 1, 3, True)


@pytest.mark.parametrize("method", ["get", "post", "put", "delete", "patch", "head"])
def test_every_probe_method(method: str) -> None:
    config = service(f"probes:\n  - type: http\n    method: {method}\n")
    assert config.probes is not None
    assert config.probes[0].method == method


@pytest.mark.parametrize("method", ["post", "put", "delete", "patch"])
def test_a_body_is_allowed_with_methods_that_carry_one(method: str) -> None:
    config = service(f"probes:\n  - type: http\n    method: {method}\n    body: x\n")
    assert config.probes is not None
    assert config.probes[0].body == "x"


def test_limits_are_inclusive() -> None:
    probes = "".join(f"  - type: http\n    url: /p{i}\n" for i in range(10))
    assert len(service("probes:\n" + probes).effective_probes()) == 10
    headers = "".join(f"      - name: X-H{i}\n        value: v\n" for i in range(16))
    config = service("probes:\n  - type: http\n    headers:\n" + headers)
    assert config.probes is not None
    assert len(config.probes[0].headers) == 16
    url = "/" + "u" * 2047
    config = service(f"probes:\n  - type: http\n    url: {url}\n    method: post\n    body: {'b' * 2048}\n")
    assert config.probes is not None
    assert (len(config.probes[0].url), len(config.probes[0].body or "")) == (2048, 2048)
    name = "N" * 256
    value = "v" * 2048
    config = service(f"probes:\n  - type: http\n    headers:\n      - name: {name}\n        value: {value}\n")
    assert config.probes is not None
    assert config.probes[0].headers[0].name == name


def test_probes_that_differ_only_in_timing_count_as_duplicates() -> None:
    # Identity is the request a probe sends (url, method, headers, body), not its timing.
    with pytest.raises(ConfigError) as exc:
        service("probes:\n  - type: http\n    url: /a\n  - type: http\n    url: /a\n    timeout: 5s\n")
    assert [issue.path for issue in exc.value.issues] == ["probes[1]"]
    # ...while a different method, header or body makes another probe.
    config = service(
        """
        probes:
          - type: http
            url: /a
          - type: http
            url: /a
            method: head
          - type: http
            url: /a
            headers: [{name: X-A, value: "1"}]
        """
    )
    assert len(config.effective_probes()) == 3


def test_default_model_probe_when_probes_are_omitted() -> None:
    config = service("model: meta-llama/Meta-Llama-3.1-8B-Instruct\n")
    assert config.probes is None
    [probe] = config.effective_probes()
    assert probe.type == "http"
    assert probe.method == "post"
    assert probe.url == "/v1/chat/completions"
    assert [(h.name, h.value) for h in probe.headers] == [("Content-Type", "application/json")]
    assert probe.body is not None
    assert json.loads(probe.body) == {
        "model": "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    }
    assert probe.timeout == 30
    assert (probe.interval, probe.ready_after, probe.until_ready) == (15, 1, False)


def test_default_model_probe_follows_the_model_prefix() -> None:
    config = service("model:\n  name: m\n  prefix: /api/v1/\n")
    assert [p.url for p in config.effective_probes()] == ["/api/v1/chat/completions"]


def test_empty_probes_mean_no_probes_even_with_a_model() -> None:
    config = service("model: m\nprobes: []\n")
    assert config.probes == []
    assert config.effective_probes() == []


def test_no_model_and_no_probes_means_no_probes() -> None:
    assert service().effective_probes() == []


# --- warnings ---------------------------------------------------------------------------------


def test_ignored_cloud_keys_warn_with_their_lines() -> None:
    loaded = load(
        """\
        type: service
        port: 8000
        backends: [aws, gcp]
        regions: [us-east-1]
        spot_policy: auto
        resources:
          gpu: 1
          disk: 100GB..
        max_price: 1.5
        schedule:
          cron: "0 8 * * *"
        idle_duration: off
        """
    )
    assert [(w.line, w.path) for w in loaded.warnings] == [
        (3, "backends"),
        (4, "regions"),
        (5, "spot_policy"),
        (8, "resources.disk"),
        (9, "max_price"),
        (10, "schedule"),
        (12, "idle_duration"),
    ]
    assert all("ignored on one machine" in w.message for w in loaded.warnings)


def test_setup_is_deprecated_but_accepted() -> None:
    loaded = load("type: service\nport: 8000\nsetup:\n  - pip install x\n")
    assert loaded.config.setup == ["pip install x"]
    assert [(w.line, w.path) for w in loaded.warnings] == [(3, "setup")]
    assert "deprecated" in loaded.warnings[0].message


def test_secrets_reference_warns_that_it_reads_the_environment() -> None:
    loaded = load("type: service\nport: 8000\nenv:\n  - A=1\n  - TOKEN=${{ secrets.HF_TOKEN }}\n")
    [warning] = loaded.warnings
    assert (warning.line, warning.path) == (5, "env[1]")
    assert "${{ secrets.HF_TOKEN }}" in warning.message
    assert "environment variable HF_TOKEN" in warning.message


def test_warnings_go_to_stderr_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "svc.yml"
    path.write_text("type: service\nport: 8000\nbackends: [aws]\nimage: app\n")
    assert run(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: valid (service, 1 replica, 0 probes)\n"
    assert f"warning: {path}:3: backends: is a dstack cloud setting; ignored on one machine" in err


# --- interpolation at run time ------------------------------------------------------------------


def test_resolve_env_takes_bare_names_and_secrets_from_the_environment() -> None:
    loaded = load(
        """\
        type: service
        port: 8000
        env:
          - HF_TOKEN
          - FIXED=a b c
          - FROM_SECRET=${{ secrets.TOKEN }}
          - FROM_ENV=pre-${{ env.OTHER }}-post
          - DOLLARS=$$HOME and $$${{ env.OTHER }}
          - NOT_A_REF=$${{ env.OTHER }}
        """
    )
    environ = {"HF_TOKEN": "hf-1", "TOKEN": "tok", "OTHER": "o", "UNRELATED": "u"}
    assert loaded.resolve_env(environ) == {
        "HF_TOKEN": "hf-1",
        "FIXED": "a b c",
        "FROM_SECRET": "tok",
        "FROM_ENV": "pre-o-post",
        "DOLLARS": "$HOME and $o",
        "NOT_A_REF": "${{ env.OTHER }}",
    }


def test_resolve_env_names_every_missing_variable_and_no_value() -> None:
    loaded = load(
        """\
        type: service
        port: 8000
        env:
          - HF_TOKEN
          - SET=supersecret
          - B=${{ secrets.NOPE }}
        """
    )
    with pytest.raises(ConfigError) as exc:
        loaded.resolve_env({"UNRELATED": "supersecret"})
    issues = exc.value.issues
    assert [(i.line, i.path) for i in issues] == [(4, "env[0]"), (6, "env[2]")]
    assert "HF_TOKEN" in issues[0].message
    assert "NOPE" in issues[1].message
    assert "supersecret" not in str(exc.value)


def test_resolve_probes_interpolates_url_headers_and_body() -> None:
    loaded = load(
        """\
        type: service
        port: 8000
        env: [KEY, PATH_PART=v1]
        probes:
          - type: http
            method: post
            url: /${{ env.PATH_PART }}/health?cost=$$5
            headers:
              - name: X-Key
                value: ${{env.KEY}}
            body: '{"key": "${{ env.KEY }}", "price": "$$1"}'
        """
    )
    [probe] = resolve_probes(loaded.config, loaded.resolve_env({"KEY": "k"}), loaded.issue)
    assert probe.url == "/v1/health?cost=$5"
    assert probe.headers[0].value == "k"
    assert probe.body == '{"key": "k", "price": "$1"}'
    # The configuration itself keeps the references.
    assert loaded.config.probes is not None
    assert loaded.config.probes[0].headers[0].value == "${{env.KEY}}"


def test_resolve_probes_names_a_variable_missing_from_the_values_given() -> None:
    loaded = load(
        "type: service\nport: 8000\nenv: [KEY]\nprobes:\n"
        "  - type: http\n    headers:\n      - name: X-Key\n        value: ${{ env.KEY }}\n"
    )
    with pytest.raises(ConfigError) as exc:
        resolve_probes(loaded.config, {}, loaded.issue)
    [issue] = exc.value.issues
    assert (issue.line, issue.path) == (8, "probes[0].headers[0].value")
    assert "KEY" in issue.message


# --- JSON schema ----------------------------------------------------------------------------


def schema_from_cli(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert run(["schema"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    schema = json.loads(out)
    assert isinstance(schema, dict)
    return schema


def test_schema_is_json_with_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    schema = schema_from_cli(capsys)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(ServiceConfiguration.model_fields)
    assert set(schema["required"]) == {"type", "port"}
    missing = [name for name, prop in schema["properties"].items() if not prop.get("description")]
    assert missing == []


SVC = "type: service\nport: 8000\ncommands: [serve]\n"
VALID_DOCUMENTS = {
    **{f"sample-{path.name}": path.read_text() for path in SAMPLES},
    "python-float": SVC + "python: 3.10\n",
    "port-string-env-dict": "type: service\nport: '8080:8000'\nimage: app\nenv: {A: null, B: 1, C: true}\n",
    "port-mapping": "type: service\nport: {container_port: 8000, local_port: 9000}\nimage: app\n",
    "replicas-forms": SVC + "replicas: '2..2'\n",
    "replicas-mapping": SVC + "replicas: {min: 2, max: 2}\n",
    "resources-strings": SVC + "resources: {gpu: 'nvidia:A10G,L4:1..2', cpu: 'x86:4', memory: {min: 8GB}}\n",
    "gpu-mapping": SVC + "resources: {gpu: {name: [A10G, L4], count: 1..2}, shm_size: 1GB}\n",
    "volume-forms": SVC + "volumes: ['/a:/b:ro', {name: v, path: /d}, {instance_path: /x, path: /y}]\n",
    "retry-stop-off-model": SVC + "retry: true\nstop_duration: off\nmodel: {name: m}\n",
    "probe-durations": SVC + "probes: [{type: http, timeout: 30, interval: '1m'}]\n",
    "cloud-keys": SVC + "backends: [aws]\nschedule: {cron: x}\nspot_policy: auto\n",
}


@pytest.mark.parametrize("text", VALID_DOCUMENTS.values(), ids=VALID_DOCUMENTS.keys())
def test_the_schema_accepts_what_the_loader_accepts(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    # jsonschema is a test dependency (pyproject [test]); imported here so only these tests need it.
    import jsonschema

    schema = schema_from_cli(capsys)
    jsonschema.Draft202012Validator.check_schema(schema)
    parse_service(text)  # the loader accepts it...
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(yaml.safe_load(text))]
    assert errors == []  # ...so must an editor using the schema


def test_the_schema_rejects_an_unknown_key_and_a_missing_port(capsys: pytest.CaptureFixture[str]) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema_from_cli(capsys))
    assert not validator.is_valid({"type": "service", "port": 8000, "imgae": "x"})
    assert not validator.is_valid({"type": "service"})
    assert not validator.is_valid({"type": "task", "port": 8000})
