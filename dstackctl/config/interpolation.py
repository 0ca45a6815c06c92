"""dstack's `${{ namespace.NAME }}` interpolation; `$$` escapes a dollar sign."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_EXPRESSION = re.compile(r"^\s*([a-z]+)\.([A-Za-z_][A-Za-z0-9_]*)\s*$")


@dataclass(frozen=True)
class Reference:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"${{{{ {self.namespace}.{self.name} }}}}"


def _scan(text: str, namespaces: tuple[str, ...]) -> list[str | Reference]:
    """Split `text` into literal pieces and references, raising ValueError on a bad expression.

    The messages never quote `text` itself: it may be a secret (an env value, a header value).
    """
    pieces: list[str | Reference] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            literal.append("$")
            i += 2
        elif text.startswith("${{", i):
            end = text.find("}}", i + 3)
            if end < 0:
                raise ValueError("has an unterminated '${{'; close it with '}}'")
            expression = text[i + 3 : end]
            match = _EXPRESSION.match(expression)
            if not match:
                raise ValueError(
                    f"cannot read '${{{{{expression}}}}}'; write ${{{{ env.NAME }}}}"
                    f" (write $$ for a literal dollar sign)"
                )
            namespace, name = match.groups()
            if namespace not in namespaces:
                allowed = " or ".join(f"${{{{ {ns}.NAME }}}}" for ns in namespaces)
                raise ValueError(
                    f"unknown namespace {namespace!r} in ${{{{ {namespace}.{name} }}}}; use {allowed}"
                )
            if literal:
                pieces.append("".join(literal))
                literal = []
            pieces.append(Reference(namespace, name))
            i = end + 2
        else:
            literal.append(text[i])
            i += 1
    if literal:
        pieces.append("".join(literal))
    return pieces


def references(text: str, namespaces: tuple[str, ...]) -> list[Reference]:
    return [piece for piece in _scan(text, namespaces) if isinstance(piece, Reference)]


def interpolate(text: str, values: Mapping[str, Mapping[str, str]], namespaces: tuple[str, ...]) -> str:
    """Replace every reference with its value; a missing value raises KeyError(reference)."""
    out: list[str] = []
    for piece in _scan(text, namespaces):
        if isinstance(piece, Reference):
            try:
                out.append(values[piece.namespace][piece.name])
            except KeyError:
                raise KeyError(piece) from None
        else:
            out.append(piece)
    return "".join(out)
