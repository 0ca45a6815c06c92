"""Ask dstack's own parser whether service files are valid.

Run it with the python of a virtualenv that has dstack installed (not dstackctl's):

    echo '[{"id": "a", "text": "type: service\\nport: 80\\nimage: x\\n"}]' \\
        | .cache/dstack-0.22.5/bin/python scripts/dstack_parity.py

stdin: a JSON list of {"id": ..., "text": YAML text}.
stdout: a JSON list, in the same order, of {"id", "accepted": bool, "error": str | null}.

`accepted` means dstack accepts the text as a `type: service` configuration
(`dstack._internal.core.models.configurations.parse_apply_configuration`, what `dstack apply`
calls). A document of another type is reported as not accepted, with an error saying so:
only services matter here. `error` is the first 300 characters of dstack's message, its lines
joined with " | " (pydantic's links to its docs left out). The exit status is 0 whenever the
batch was read, whatever the verdicts.
"""

from __future__ import annotations

import json
import sys
from typing import Any

ERROR_CHARS = 300


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines()]
    # pydantic's "For further information visit https://errors.pydantic.dev/..." says nothing.
    kept = [line for line in lines if line and not line.startswith("For further information visit")]
    return " | ".join(kept)[:ERROR_CHARS]


def verdict(text: str) -> tuple[bool, str | None]:
    import yaml
    from dstack._internal.core.models.configurations import (  # type: ignore[import-not-found,unused-ignore]
        parse_apply_configuration,
    )

    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return False, _one_line(f"YAML: {exc}")
    if not isinstance(data, dict):
        return False, f"not a mapping: {type(data).__name__}"
    if data.get("type") != "service":
        return False, _one_line(f"not a service document (type: {data.get('type')!r})")
    try:
        parse_apply_configuration(data)
    except Exception as exc:  # dstack raises ConfigurationError, but a bad value may raise anything
        return False, _one_line(f"{type(exc).__name__}: {exc}")
    return True, None


def main() -> int:
    cases = json.load(sys.stdin)
    results = []
    for case in cases:
        accepted, error = verdict(case["text"])
        results.append({"id": case["id"], "accepted": accepted, "error": error})
    json.dump(results, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
