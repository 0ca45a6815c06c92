"""Collect dstack's own `type: service` examples into tests/data/dstack_examples/.

Not a test: run it by hand to refresh the examples from a clone of dstack's repository,

    .venv/bin/python tests/parity/collect_examples.py \\
        --git-dir /path/to/dstack/.git --dstack-python .cache/dstack-0.22.5/bin/python

It reads the commit HEAD of --git-dir (with `git ls-tree` / `git show`, no work tree needed):

- every YAML file under examples/ whose document has `type: service`;
- every fenced ```yaml block with `type: service` in the Markdown under examples/,
  mkdocs/docs/ (the documentation) and mkdocs/blog/ (the blog of the same site).

Identical texts are kept once. Each is parsed by dstack (scripts/dstack_parity.py run with
--dstack-python); only those dstack accepts are written, one .yml per example named after
its source path (`/` -> `__`, `__blockNN` for the NN-th service block of a Markdown file).
SOURCES.md records the commit, the counts and why the others were left out.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "tests" / "data" / "dstack_examples"
PARITY_SCRIPT = REPO_ROOT / "scripts" / "dstack_parity.py"
MARKDOWN_ROOTS = ("examples/", "mkdocs/docs/", "mkdocs/blog/")
YAML_ROOTS = ("examples/",)
FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)```+\s*ya?ml\b.*$")
FENCE_CLOSE = re.compile(r"^[ \t]*```+\s*$")
SERVICE = re.compile(r"^type:\s*service\s*(#.*)?$", re.MULTILINE)


@dataclass
class Example:
    name: str  # file name under OUT_DIR
    source: str  # path in dstack's repository (and block number)
    text: str


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", *args], capture_output=True, text=True, check=True
    ).stdout


def fenced_yaml_blocks(markdown: str) -> list[str]:
    """The contents of the ```yaml blocks, with the fence's indentation taken off."""
    blocks: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        opened = FENCE_OPEN.match(lines[i])
        i += 1
        if not opened:
            continue
        indent = opened.group("indent")
        body: list[str] = []
        while i < len(lines) and not FENCE_CLOSE.match(lines[i]):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        blocks.append("\n".join(body).strip("\n") + "\n")
    return blocks


def yaml_documents(text: str) -> list[str]:
    """The documents of a YAML stream as texts (split at `---` lines)."""
    parts = re.split(r"^---\s*$", text, flags=re.MULTILINE)
    return [part.strip("\n") + "\n" for part in parts if part.strip()]


def is_service(text: str) -> bool:
    return SERVICE.search(text) is not None


def flat_name(path: str) -> str:
    return path.replace("/", "__")


def collect(git_dir: str) -> list[Example]:
    paths = git(git_dir, "ls-tree", "-r", "--name-only", "HEAD").splitlines()
    found: list[Example] = []
    for path in sorted(paths):
        if path.endswith((".yml", ".yaml")) and path.startswith(YAML_ROOTS):
            services = [
                doc for doc in yaml_documents(git(git_dir, "show", f"HEAD:{path}")) if is_service(doc)
            ]
            for number, doc in enumerate(services, 1):
                suffix = f"__doc{number:02d}" if len(services) > 1 else ""
                name = flat_name(path) + suffix
                found.append(Example(name if name.endswith(".yml") else name + ".yml", path, doc))
        elif path.endswith(".md") and path.startswith(MARKDOWN_ROOTS):
            blocks = [block for block in fenced_yaml_blocks(git(git_dir, "show", f"HEAD:{path}"))]
            services = [block for block in blocks if is_service(block)]
            for number, block in enumerate(services, 1):
                found.append(
                    Example(f"{flat_name(path)}__block{number:02d}.yml", f"{path} (block {number})", block)
                )
    return found


def dstack_verdicts(dstack_python: str, examples: list[Example]) -> dict[str, dict[str, Any]]:
    batch = json.dumps([{"id": e.name, "text": e.text} for e in examples])
    run = subprocess.run(
        [dstack_python, str(PARITY_SCRIPT)], input=batch, capture_output=True, text=True, check=True
    )
    return {item["id"]: item for item in json.loads(run.stdout)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--git-dir", required=True, help="dstack's git directory")
    parser.add_argument("--dstack-python", required=True, help="python of a venv with dstack installed")
    args = parser.parse_args()

    commit = git(args.git_dir, "rev-parse", "HEAD").strip()
    described = git(args.git_dir, "log", "-1", "--format=%ci %s", "HEAD").strip()
    version = subprocess.run(
        [args.dstack_python, "-c", "import dstack.version as v; print(v.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    examples = collect(args.git_dir)
    unique: list[Example] = []
    duplicates: list[tuple[Example, Example]] = []
    by_text: dict[str, Example] = {}
    for example in examples:
        first = by_text.get(example.text)
        if first is not None:
            duplicates.append((example, first))
            continue
        by_text[example.text] = example
        unique.append(example)

    verdicts = dstack_verdicts(args.dstack_python, unique)
    kept = [e for e in unique if verdicts[e.name]["accepted"]]
    rejected = [e for e in unique if not verdicts[e.name]["accepted"]]

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for old in OUT_DIR.glob("*.yml"):
        old.unlink()
    for example in kept:
        (OUT_DIR / example.name).write_text(f"# From dstack's repository: {example.source}\n" + example.text)

    per_root: dict[str, int] = {}
    for example in examples:
        root = "/".join(example.source.split("/")[:2]) + "/"
        per_root[root] = per_root.get(root, 0) + 1
    lines = [
        "# dstack's own `type: service` examples",
        "",
        "Written by `tests/parity/collect_examples.py`; do not edit by hand, run it again.",
        "",
        f"- Repository: https://github.com/dstackai/dstack, commit `{commit}` ({described}).",
        f"- Checked with dstack {version} (`scripts/dstack_parity.py`);"
        " only the examples it accepts are kept.",
        "- Collected: every YAML file under `examples/` with `type: service`, and every fenced"
        " ```` ```yaml ```` block with `type: service` in the Markdown of `examples/`,"
        " `mkdocs/docs/` (the documentation) and `mkdocs/blog/` (the blog of the same site).",
        "  Each file starts with a comment naming its source; `__blockNN` is the NN-th service block of"
        " a Markdown file.",
        "",
        "| | count |",
        "|---|---|",
        f"| service documents found | {len(examples)} |",
        *(f"| ... under `{root}` | {count} |" for root, count in sorted(per_root.items())),
        f"| identical to one found earlier (kept once) | {len(duplicates)} |",
        f"| distinct | {len(unique)} |",
        f"| rejected by dstack {version} (left out) | {len(rejected)} |",
        f"| **kept** | **{len(kept)}** |",
        "",
    ]
    if rejected:
        lines += [f"## Rejected by dstack {version}", "", "| source | dstack's error |", "|---|---|"]
        for example in rejected:
            error = str(verdicts[example.name]["error"]).replace("|", "/")
            lines.append(f"| {example.source} | {error} |")
        lines.append("")
    if duplicates:
        lines += ["## Duplicates (kept once)", "", "| source | same text as |", "|---|---|"]
        lines += [f"| {dup.source} | {first.source} |" for dup, first in duplicates]
        lines.append("")
    (OUT_DIR / "SOURCES.md").write_text("\n".join(lines))
    print(f"{len(examples)} found, {len(unique)} distinct, {len(kept)} kept, {len(rejected)} rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
