"""Reading YAML into plain data plus the line of every node, with limits for hostile input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from dstackctl.config.issues import Loc

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 50_000


class SourceError(Exception):
    """The file cannot be read as a YAML mapping; `line` is 1-based when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


@dataclass
class YamlSource:
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    duplicate_keys: list[tuple[Loc, int, int]] = field(default_factory=list)

    def line_of(self, loc: Loc) -> int | None:
        """The line of `loc`, or of its nearest ancestor present in the file."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return None

    def value_at(self, loc: Loc) -> tuple[bool, Any]:
        node = self.data
        for part in loc:
            in_mapping = isinstance(node, dict) and part in node
            in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
            if not (in_mapping or in_list):
                return False, None
            node = node[part]
        return True, node


class _Loader(yaml.SafeLoader):
    """A SafeLoader that stops composing past MAX_NODES nodes: the pure-Python parser needs
    seconds for a 1 MiB flow list of 400,000 values, and this refuses it after 50,000."""

    nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise SourceError(f"the file has more than {MAX_NODES} values; it is not a service file")
        return super().compose_node(parent, index)


def too_big(size: int | None) -> str:
    """The sentence for a file over MAX_FILE_BYTES (`size` None or small: not known)."""
    shown = f"{size / 1024 / 1024:.1f} MiB" if size and size > MAX_FILE_BYTES else "more than 1 MiB"
    return f"the file is {shown}; a service file may be at most 1 MiB"


# PyYAML's words for the mistakes people make, and what to check instead.
_EXPLAINED = {
    "mapping values are not allowed here": (
        "a `key: value` where none can start; check this line's indentation against the lines "
        "above (keys of one mapping line up), or quote a value that contains ': '"
    ),
    "expected <block end>": (
        "this line is indented differently from the lines it belongs with; line up the items of "
        "one list, or the keys of one mapping, at the same column"
    ),
    "could not find expected ':'": (
        "a line without `key: value`; check for a missing colon, or a quote left open above"
    ),
    "found character '\\t' that cannot start any token": "a tab; YAML indents with spaces only",
}


def _explained(problem: str) -> str:
    for start, sentence in _EXPLAINED.items():
        if problem.startswith(start):
            return sentence
    return problem


def read_yaml(raw: bytes) -> YamlSource:
    if len(raw) > MAX_FILE_BYTES:
        raise SourceError(too_big(len(raw)))
    if raw.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        raise SourceError("the file is UTF-16 or UTF-32 text; save it as UTF-8")
    if b"\x00" in raw:
        raise SourceError("the file is binary, not YAML text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"the file is not UTF-8 text (byte {exc.start} cannot be decoded)",
            raw.count(b"\n", 0, exc.start) + 1,
        ) from None
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise SourceError(
            f"the file contains a character that YAML does not allow (U+{exc.character:04X})", line
        ) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise SourceError("the file is empty; a service needs at least `type: service` and `port`")
        source = YamlSource(data=None)
        _index(loader, node, (), source, set())
        if _expanded_size(node, {}) > MAX_NODES:
            raise SourceError(
                f"the file expands to more than {MAX_NODES} values through aliases (*name); "
                f"it is not a service file"
            )
        source.data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise SourceError(f"invalid YAML: {_explained(problem)}", mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise SourceError(f"invalid YAML: {exc}") from None
    except RecursionError:
        raise SourceError("the YAML is nested too deeply") from None
    finally:
        loader.dispose()
    if not isinstance(source.data, dict):
        kind = type(source.data).__name__ if source.data is not None else "null"
        kind = {"list": "a list", "str": "a string", "int": "a number", "float": "a number"}.get(kind, kind)
        raise SourceError(f"the file holds {kind}; a service file must be a mapping of keys", 1)
    return source


def _index(loader: yaml.SafeLoader, node: yaml.Node, loc: Loc, source: YamlSource, seen: set[int]) -> None:
    """Record the line of every node reachable without re-entering an alias twice."""
    if len(source.lines) > MAX_NODES:
        raise SourceError(f"the file has more than {MAX_NODES} values; it is not a service file")
    source.lines.setdefault(loc, node.start_mark.line + 1)
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            if key_node.tag == "tag:yaml.org,2002:int":
                key = loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            key_loc: Loc = (*loc, key)
            if key in first_line:
                source.duplicate_keys.append((key_loc, line, first_line[key]))
            first_line.setdefault(key, line)
            source.lines[key_loc] = line
            _index(loader, value_node, key_loc, source, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index(loader, item, (*loc, index), source, seen)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values `node` becomes once every alias is copied out (stops counting past the limit)."""
    if id(node) in memo:
        return memo[id(node)]
    size = 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            size += _expanded_size(key_node, memo) + _expanded_size(value_node, memo)
            if size > MAX_NODES:
                break
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            size += _expanded_size(item, memo)
            if size > MAX_NODES:
                break
    memo[id(node)] = size
    return size
