"""Property-based tests: whatever bytes the loader is given, it answers with a valid model or
with clean errors (a sentence each) — never another exception, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from dstackctl.cli.main import run
from dstackctl.config import fields, models, probe_model
from dstackctl.config.issues import ConfigError
from dstackctl.config.loader import LoadedConfig, parse_service
from dstackctl.config.probe_values import resolve_probes

REPO = Path(__file__).resolve().parents[2]
SAMPLES = {path.name: path.read_text() for path in sorted((REPO / "samples").glob("*.yml"))}

LOADER = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLI = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every field name of every model, so random documents reach deep into validation.
FIELD_NAMES = sorted(
    {
        name
        for module in (models, fields, probe_model)
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == module.__name__
        for name in obj.model_fields
    }
)

INTERESTING_SCALARS = [
    "",
    "0",
    "-1",
    "65536",
    "1..4",
    "2..2",
    "..",
    "24GB..48GB",
    "A100:H100",
    "nvidia:A10G,L4:1..2",
    "1m30s",
    "15s",
    "off",
    "3.10",
    "http",
    "/health",
    "post",
    "${{ env.X }}",
    "${{ secrets.X }}",
    "${{",
    "$$",
    "8080:8000",
    "/a:/b:ro",
    "~",
    "null",
    "true",
    "service",
    "task",
]


def check_loaded(loaded: LoadedConfig) -> None:
    """A valid result must be usable by the rest of the program."""
    config = loaded.config
    assert config.type == "service"
    probes = config.effective_probes()
    assert len(probes) <= fields.MAX_PROBES
    json.loads(config.model_dump_json())
    config.model_dump()
    if config.resources.gpu is not None:
        str(config.resources.gpu)
    for warning in loaded.warnings:
        assert warning.message
    environ = {name: "v" for name in config.environment}
    environ.update({"X": "x"})
    try:
        env = loaded.resolve_env(environ)
    except ConfigError as exc:  # a ${{ secrets.NAME }} of a name not in environ
        check_error(exc)
        return
    resolve_probes(loaded.config, env, loaded.issue)


def check_error(exc: ConfigError) -> None:
    assert exc.issues, "a ConfigError without issues"
    for issue in exc.issues:
        assert issue.message.strip(), f"empty message in {issue!r}"
        assert issue.line is None or issue.line >= 1
        assert "Traceback" not in issue.message
        assert "validation error for" not in issue.message  # raw pydantic text


def load(raw: bytes | str) -> None:
    try:
        loaded = parse_service(raw, "fuzz.yml")
    except ConfigError as exc:
        check_error(exc)
        return
    check_loaded(loaded)


# --- (a) random documents --------------------------------------------------------------------

keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(INTERESTING_SCALARS)
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=5),
    max_leaves=12,
)
documents = st.dictionaries(keys, values, max_size=8) | values
# Services with random extras, so validation gets past the `type` and `port` checks.
services = st.builds(
    lambda extra, port: {**extra, "type": "service", "port": port},
    st.dictionaries(keys, values, max_size=5),
    st.sampled_from([8000, "8000", "8080:8000", {"container_port": 8000}]) | scalars,
)

# Mostly well-formed services: real keys with values of the right shape, so that many of them
# are valid and the checks on a loaded model (`check_loaded`) run often.
plausible_scalars = st.sampled_from(INTERESTING_SCALARS) | st.integers(-2, 70000) | st.booleans() | st.none()
probe_dicts = st.fixed_dictionaries(
    {"type": st.just("http")},
    optional={
        "url": st.sampled_from(["/", "/health", "/${{ env.X }}", "/a?b=$$1", "x"]),
        "method": st.sampled_from(["get", "post", "put", "head", "GET"]),
        "headers": st.lists(
            st.fixed_dictionaries({"name": st.sampled_from(["X-A", "X B", ""]), "value": plausible_scalars}),
            max_size=3,
        ),
        "body": plausible_scalars,
        "timeout": plausible_scalars,
        "interval": plausible_scalars,
        "ready_after": plausible_scalars,
        "until_ready": plausible_scalars,
    },
)
plausible_services = st.fixed_dictionaries(
    {"type": st.just("service"), "port": st.sampled_from([8000, "8080:8000"]) | plausible_scalars},
    optional={
        "name": st.sampled_from(["llama31", "a", "Bad"]),
        "image": st.sampled_from(["busybox", ""]),
        "python": st.sampled_from([3.12, 3.1, "3.11", 2.7]),
        "env": st.lists(st.sampled_from(["X", "X=1", "Y=${{ secrets.X }}", "1BAD", "Z=$$"]), max_size=4)
        | st.dictionaries(st.sampled_from(["X", "Y", "1B"]), plausible_scalars, max_size=3),
        "commands": st.lists(st.text(max_size=10), max_size=3),
        "replicas": plausible_scalars,
        "model": st.sampled_from(["m", "", {"name": "m", "prefix": "/api"}]),
        "probes": st.lists(probe_dicts, max_size=3),
        "resources": st.fixed_dictionaries(
            {},
            optional={
                "gpu": plausible_scalars,
                "memory": plausible_scalars,
                "cpu": plausible_scalars,
                "shm_size": plausible_scalars,
                "disk": plausible_scalars,
            },
        ),
        "volumes": st.lists(
            st.sampled_from(["/a:/b", "/a:/b:ro", "/a", {"name": "v", "path": "/d"}]), max_size=2
        ),
        "retry": st.booleans() | st.just({"on_events": ["error"], "duration": "1h"}),
        "stop_duration": plausible_scalars,
        "registry_auth": st.just({"username": "u", "password": "p"}),
        "backends": st.just(["aws"]),
        "schedule": values,
    },
)


@pytest.mark.slow
@LOADER
@given(plausible_services)
def test_plausible_services(data: dict[str, Any]) -> None:
    load(dump(data))


def dump(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


@pytest.mark.slow
@LOADER
@given(documents)
def test_random_yaml_documents(data: Any) -> None:
    load(dump(data))


@pytest.mark.slow
@LOADER
@given(services)
def test_random_services(data: dict[str, Any]) -> None:
    load(dump(data))


@pytest.mark.slow
@LOADER
@given(st.builds(lambda probes: {"type": "service", "port": 8000, "probes": probes}, values))
def test_random_probes(data: dict[str, Any]) -> None:
    load(dump(data))


@LOADER
@given(st.binary(max_size=300))
def test_random_bytes(raw: bytes) -> None:
    load(raw)


@pytest.mark.slow
@LOADER
@given(st.text(max_size=300))
def test_random_text(text: str) -> None:
    load(text)


SOUP = [
    b"type: service\n",
    b"port: 8000\n",
    b"\x00",
    b"\xff",
    b"\xc3",
    "\ufeff".encode(),
    "\u2028".encode(),
    b"\t",
    b"&a ",
    b"*a",
    b"{",
    b"[",
    b"'",
    b'"',
    b":",
    b"- ",
    b"  ",
    b"\n",
    b"x",
    b"!!binary ",
    b"!!python/object/apply:os.system ",
    b"? ",
    b"<<: *a\n",
    b"%YAML 1.1\n",
    b"---\n",
    b"...\n",
]


@LOADER
@given(st.lists(st.sampled_from(SOUP), max_size=30))
def test_yaml_syntax_soup(parts: list[bytes]) -> None:
    load(b"".join(parts))


# --- (b) mutations of the samples -----------------------------------------------------------

replacement_scalars = (
    st.sampled_from(INTERESTING_SCALARS)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "[",
            "]",
            "{",
            "'",
            '"',
            "&a",
            "*a",
            "*b",
            "|",
            ">",
            "- x",
            "x: y",
            "!!python/object:os.system",
            "\t",
            "#",
        ]
    )
)


@st.composite
def mutated_sample(draw: st.DrawFn) -> str:
    lines = SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))].splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        index = draw(st.integers(0, len(lines) - 1))
        line = lines[index]
        operation = draw(
            st.sampled_from(["delete", "duplicate", "swap", "value", "insert", "indent", "dedent"])
        )
        if operation == "delete":
            del lines[index]
        elif operation == "duplicate":
            lines.insert(index, line)
        elif operation == "swap":
            other = draw(st.integers(0, len(lines) - 1))
            lines[index], lines[other] = lines[other], line
        elif operation == "value":
            key, sep, _ = line.partition(": ")
            scalar = draw(replacement_scalars)
            lines[index] = f"{key}{sep}{scalar}" if sep else line.split("- ")[0] + "- " + scalar
        elif operation == "insert":
            indent = " " * draw(st.integers(0, 8))
            key = draw(st.sampled_from(FIELD_NAMES) | st.text(min_size=1, max_size=8))
            lines.insert(index, f"{indent}{key}: {draw(replacement_scalars)}")
        elif operation == "indent":
            lines[index] = " " * draw(st.integers(1, 4)) + line
        else:
            lines[index] = line[draw(st.integers(1, 4)) :] if line.startswith(" ") else line
    return "\n".join(lines) + "\n"


@pytest.mark.slow
@LOADER
@given(mutated_sample())
def test_mutated_samples(text: str) -> None:
    load(text)


@pytest.mark.slow
def test_the_mutation_strategy_reaches_valid_and_invalid_files() -> None:
    """Guards the fuzzer itself: mutations must produce both outcomes, or they test little."""
    outcomes: set[str] = set()

    @settings(max_examples=200, deadline=None, database=None)
    @given(mutated_sample())
    def collect(text: str) -> None:
        try:
            parse_service(text)
            outcomes.add("valid")
        except ConfigError as exc:
            outcomes.add("yaml" if "invalid YAML" in str(exc) else "model")

    collect()
    assert outcomes == {"valid", "yaml", "model"}


# --- through the CLI ----------------------------------------------------------------------


def validate(raw: bytes, check_env: bool) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "svc.yml"
        path.write_bytes(raw)
        out, err = io.StringIO(), io.StringIO()
        args = ["validate", *(["--check-env"] if check_env else []), str(path)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run(args)
    return code, out.getvalue() + err.getvalue()


def check_cli(raw: bytes, check_env: bool) -> None:
    code, output = validate(raw, check_env)
    assert code in (0, 2), output
    assert "Traceback" not in output
    assert "error: unexpected " not in output  # the CLI's wording for an exception it did not expect
    assert ": valid (" in output if code == 0 else ": invalid (" in output


@CLI
@given(mutated_sample(), st.booleans())
def test_cli_on_mutated_samples(text: str, check_env: bool) -> None:
    check_cli(text.encode(), check_env)


@pytest.mark.slow
@CLI
@given(services | documents, st.booleans())
def test_cli_on_random_documents(data: Any, check_env: bool) -> None:
    check_cli(dump(data).encode(), check_env)


@CLI
@given(st.binary(max_size=200))
def test_cli_on_random_bytes(raw: bytes) -> None:
    check_cli(raw, False)


def test_nan_and_infinity_are_refused_where_numbers_are_expected() -> None:
    for value in (math.nan, math.inf, -math.inf):
        for key in ("port", "replicas", "python", "max_price"):
            try:
                loaded = parse_service(dump({"type": "service", "port": 8000, key: value}))
            except ConfigError as exc:
                check_error(exc)
                continue
            assert key == "max_price", f"{key}: {value} was accepted"
            check_loaded(loaded)
