"""Hostile input: huge files, alias bombs, deep nesting, binary data — each a quick, clean refusal."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dstackctl.cli.main import run
from dstackctl.config.issues import ConfigError
from dstackctl.config.loader import parse_service

HEAD = "type: service\nport: 8000\nimage: app\n"  # dstack refuses a file that runs nothing


def refused(raw: bytes | str) -> str:
    """The one-issue error text for `raw`, checking it is a sentence and not an exception."""
    with pytest.raises(ConfigError) as exc:
        parse_service(raw, "hostile.yml")
    assert exc.value.issues
    for issue in exc.value.issues:
        assert issue.message.strip()
    return str(exc.value)


def timed(seconds: float, raw: bytes | str) -> str:
    start = time.monotonic()
    message = refused(raw)
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"took {elapsed:.2f}s"
    return message


def laughs(indent: str, levels: int = 9, width: int = 9) -> list[str]:
    """A billion laughs: each level is a list of `width` aliases of the level before."""
    lines = [f"{indent}l0: &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels + 1):
        refs = ", ".join([f"*l{level - 1}"] * width)
        lines.append(f"{indent}l{level}: &l{level} [{refs}]")
    return lines


def test_a_2_mib_file_is_refused_with_a_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = (HEAD + "# " + "x" * (2 * 1024 * 1024) + "\n").encode()
    assert "the file is 2.0 MiB; a service file may be at most 1 MiB" in timed(1, raw)
    path = tmp_path / "big.yml"
    path.write_bytes(raw)
    assert run(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert f"{path}: the file is 2.0 MiB" in err
    assert "Traceback" not in out + err


def test_a_file_just_under_the_limit_is_read() -> None:
    raw = (HEAD + "# " + "x" * (1024 * 1024 - 100) + "\n").encode()
    assert parse_service(raw).config.port.container_port == 8000


def test_alias_bomb_under_an_any_typed_key() -> None:
    text = HEAD + "schedule:\n" + "\n".join(laughs("  ")) + "\n"
    assert "through aliases" in timed(2, text)


def test_alias_bomb_under_commands() -> None:
    text = HEAD + "x-anchors: &bomb\n" + "\n".join(laughs("  ")) + "\ncommands: *bomb\n"
    timed(2, text)
    text = HEAD + "commands:\n  - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for level in range(1, 10):
        text += f"  - &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]\n"
    assert "through aliases" in timed(2, text)


def test_alias_bomb_as_a_top_level_value() -> None:
    text = "\n".join(laughs("")) + "\n" + HEAD + "max_duration: *l9\n"
    assert "through aliases" in timed(2, text)


def test_alias_bomb_through_merge_keys() -> None:
    lines = ["m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9}"]
    for level in range(1, 10):
        items = ", ".join(f"k{i}: *m{level - 1}" for i in range(9))
        lines.append(f"m{level}: &m{level} {{{items}}}")
    text = "\n".join(lines) + "\n" + HEAD + "scaling:\n  <<: *m9\n"
    timed(2, text)


def test_a_few_aliases_are_fine() -> None:
    text = HEAD + "backends: &b [aws, gcp]\nregions: *b\nresources:\n  gpu: &g A100:2\n"
    loaded = parse_service(text)
    assert loaded.config.regions == ["aws", "gcp"]
    assert str(loaded.config.resources.gpu) == "A100:2"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("flow-list", HEAD + "schedule: " + "[" * 5000 + "]" * 5000 + "\n"),
        ("flow-map", HEAD + "schedule: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n"),
        ("block-list", HEAD + "schedule:\n  " + "- " * 5000 + "x\n"),
    ],
)
def test_deep_nesting_gives_a_clean_error(name: str, text: str) -> None:
    assert "nested too deeply" in timed(5, text)


def test_deep_nesting_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deep.yml"
    path.write_text(HEAD + "commands: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n")
    assert run(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert f"{path}: the YAML is nested too deeply" in err
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("name", "raw", "fragment"),
    [
        ("nul-byte", b"type: service\x00\nport: 8000\n", "binary"),
        ("all-bytes", bytes(range(256)), "binary"),
        ("png-header", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        (
            "latin-1",
            b"type: service\nport: 8000\nname: caf\xe9\n",
            ":3: the file is not UTF-8 text (byte 34 cannot be decoded)",
        ),
        ("utf-16", "type: service\nport: 8000\n".encode("utf-16"), "UTF-16 or UTF-32 text; save it as UTF-8"),
        ("utf-32", "type: service\nport: 8000\n".encode("utf-32"), "UTF-16 or UTF-32 text"),
        (
            "control-char",
            b"type: service\nport: 8000\nname: a\x07b\n",
            "character that YAML does not allow (U+0007)",
        ),
        ("lone-surrogate", b"type: service\nname: \xed\xa0\x80\n", "not UTF-8"),
    ],
)
def test_binary_input_gives_a_clean_error(
    name: str, raw: bytes, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fragment in refused(raw)
    path = tmp_path / "bin.yml"
    path.write_bytes(raw)
    assert run(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert fragment in err
    assert "Traceback" not in out + err


def test_a_bom_is_accepted() -> None:
    assert parse_service(b"\xef\xbb\xbf" + HEAD.encode()).config.port.container_port == 8000


def test_python_tags_are_refused_not_run() -> None:
    message = refused(HEAD + "schedule: !!python/object/apply:os.system ['echo pwned']\n")
    assert "invalid YAML" in message
    assert "could not determine a constructor" in message


@pytest.mark.slow
def test_a_huge_number_of_keys_is_refused() -> None:
    text = HEAD + "tags: [" + "1," * 50_001 + "]\n"
    assert "more than 50000 values" in timed(5, text)
