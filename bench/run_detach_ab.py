"""`run -d` of this checkout against other checkouts (e.g. `git worktree add /tmp/base HEAD~3`),
interleaved round by round, with 8 parallel `docker run -d` as the peer in the same rounds.

On a shared 2-core machine the speed drifts by tens of percent within minutes, so a change of
50 ms in `run -d` shows only when both versions run in the same rounds; `run_detach.py` alone
compares one version with docker. Each version runs as `python -m dstackctl` with its tree
first on PYTHONPATH (its bytecode written first), in its own DSTACKCTL_HOME and service name.

    .venv/bin/python bench/run_detach_ab.py TREE [TREE...] [--runs 10] [--replicas 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import run_detach as rd
from _report import REPO_ROOT, compile_package, load_average


def _cli(tree: Path) -> list[str]:
    return ["env", f"PYTHONPATH={tree}", sys.executable, "-m", "dstackctl"]


def measure(trees: dict[str, Path], runs: int, replicas: int) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="dstackctl-bench-ab-"))
    token = secrets.token_hex(3)
    totals: dict[str, list[float]] = {label: [] for label in trees}
    starts: dict[str, list[float]] = {label: [] for label in trees}
    docker: list[float] = []
    errors: list[str] = []
    try:
        with rd.cleanup_on_exit(token, root):
            for index in range(runs):
                for number, (label, tree) in enumerate(trees.items()):
                    round_ = rd.Round(index)
                    name = f"benchrd-{token}-{index}-{number}"  # the prefix cleanup_on_exit removes
                    try:
                        rd.run_dstackctl(root, name, replicas, round_, cli=_cli(tree))
                    except rd.BenchError as exc:
                        errors.append(f"{label}: {exc}")
                        continue
                    assert round_.dstackctl_s is not None
                    totals[label].append(round_.dstackctl_s)
                    if "cli+agent start" in round_.phases:
                        starts[label].append(round_.phases["cli+agent start"])
                round_ = rd.Round(index)
                try:
                    rd.run_docker(token, replicas, round_)
                except rd.BenchError as exc:
                    errors.append(f"docker: {exc}")
                else:
                    assert round_.docker_s is not None
                    docker.append(round_.docker_s)
                shown = ", ".join(f"{label} {values[-1]:.3f}" for label, values in totals.items() if values)
                peer = f"{docker[-1]:.3f}" if docker else "-"
                print(f"round {index + 1}: {shown}, docker {peer}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peer = statistics.median(docker) if docker else None
    rows = []
    for label, values in totals.items():
        median = statistics.median(values) if values else None
        rows.append(
            {
                "version": label,
                "tree": str(trees[label]),
                "median_s": median,
                "ratio_to_docker": median / peer if median and peer else None,
                "cli_and_agent_start_median_s": statistics.median(starts[label]) if starts[label] else None,
                "rounds": len(values),
            }
        )
    return {"replicas": replicas, "docker_median_s": peer, "results": rows, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("trees", nargs="+", type=Path, help="other checkouts to compare with this one")
    parser.add_argument("--runs", type=int, default=10, help="interleaved rounds (>= 1)")
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    trees = {"this checkout": REPO_ROOT}
    for tree in args.trees:
        if not (tree / "dstackctl" / "__init__.py").is_file():
            parser.error(f"{tree} holds no dstackctl package")
        trees[str(tree)] = tree.resolve()
    for tree in trees.values():
        compile_package(tree)
    problems = rd.preflight()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    before = load_average()
    summary = measure(trees, args.runs, args.replicas)
    summary["load_average_before"], summary["load_average_after"] = before, load_average()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    peer = summary["docker_median_s"]
    shown = "-" if peer is None else f"{peer:.3f}"
    print(
        f"{summary['replicas']} replicas; {summary['replicas']} x docker run -d in parallel: median {shown} s"
    )
    for row in summary["results"]:  # type: ignore[attr-defined]
        print(
            f"{row['version']}: median {row['median_s']:.3f} s ({row['ratio_to_docker']:.2f}x docker), "
            f"CLI and agent start {row['cli_and_agent_start_median_s']:.3f} s, {row['rounds']} rounds"
        )
    for error in summary["errors"]:  # type: ignore[attr-defined]
        print(f"error: {error}")
    print(f"note: load average before {before}, after {summary['load_average_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
