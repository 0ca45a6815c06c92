"""dstack's `ps` layout as rendered by tabulate: run rows, indented replica rows, probe symbols."""

from __future__ import annotations

from dstackctl.cli.render import runs_table
from dstackctl.runs import RunView
from dstackctl.spec_document import DeploymentRecord, SpecDocument
from dstackctl.status import ObservedState, ProbeView, ReplicaRow

# success streaks that give each symbol with ready_after=2
_STREAK = {"✓": 2, "~": 1, "×": 0}


def _view(replicas: list[ReplicaRow]) -> RunView:
    return RunView(
        name="llama31",
        status="running",
        deployment_num=2,
        submitted_at=None,
        url="http://127.0.0.1:8000",
        replicas=replicas,
        desired="running",
        agent_alive=True,
        spec=SpecDocument("llama31", "r1", DeploymentRecord(2, "h", len(replicas), {})),
        observed=ObservedState("llama31", "r1", replicas=tuple(replicas)),
    )


def _replica(num: int, symbols: list[str]) -> ReplicaRow:
    return ReplicaRow(
        replica_num=num,
        deployment_num=2,
        status="running",
        url=f"http://127.0.0.1:3300{num}",
        probes=tuple(ProbeView("/health", 2, success_streak=_STREAK[s]) for s in symbols),
    )


def test_verbose_rows_keep_the_replicas_indented_under_their_run() -> None:
    lines = runs_table([_view([_replica(0, ["✓"]), _replica(1, ["~", "×"])])], verbose=True, wide=False)
    header, run_row, first, second = lines.splitlines()

    assert header.split() == ["NAME", "BACKEND", "STATUS", "READY", "PROBES", "SUBMITTED", "URL", "MESSAGE"]
    assert run_row.startswith("llama31 deployment=2 ")
    assert first.startswith("   group=0 replica=0 deployment=2  local")
    assert second.startswith("           replica=1 deployment=2  local")
    assert "✓" in first.split()
    assert "~×" in second.split()


def test_the_plain_listing_has_one_row_per_run() -> None:
    lines = runs_table([_view([_replica(0, ["✓"])])], verbose=False, wide=False).splitlines()

    assert len(lines) == 2
    assert lines[1].split()[:3] == ["llama31", "local", "running"]


def test_no_runs_says_how_to_start_one() -> None:
    assert runs_table([], verbose=True, wide=False) == "No services. Start one with `dstackctl run -f FILE`."


def _grouped(group: str, num: int) -> ReplicaRow:
    return ReplicaRow(replica_num=num, deployment_num=2, group=group, status="running")


def test_groups_show_as_dstack_shows_them_by_position_with_replicas_aligned() -> None:
    view = _view([_grouped("workers", 1), _grouped("router", 0), _grouped("workers", 0)])
    config = {"replicas": [{"name": "router", "count": 1}, {"name": "workers", "count": 2}]}
    view.spec = SpecDocument("llama31", "r1", DeploymentRecord(2, "h", 3, config))
    names = [line[:34].rstrip() for line in runs_table([view], verbose=True, wide=False).splitlines()[2:]]
    assert names == [
        "   group=0 replica=0 deployment=2",
        "   group=1 replica=0 deployment=2",
        "           replica=1 deployment=2",
    ]


def test_one_replica_is_named_too_where_dstack_leaves_the_name_out() -> None:
    line = runs_table([_view([_replica(0, ["✓"])])], verbose=True, wide=False).splitlines()[2]
    assert line.startswith("   group=0 replica=0 deployment=2 ")


def test_the_service_row_shows_ready_of_desired_and_degraded_when_a_replica_failed() -> None:
    failed = ReplicaRow(replica_num=1, deployment_num=2, status="failed", phase="failed", exit_code=3)
    ok = ReplicaRow(replica_num=0, deployment_num=2, status="running", phase="ready", ready=True)
    view = _view([ok, failed])
    view.observed = ObservedState("llama31", "r1", target_replicas=2, replicas=(ok, failed))
    line = runs_table([view], verbose=False, wide=False).splitlines()[1]
    assert line.split()[:4] == ["llama31", "local", "running", "1/2"]
    assert view.to_json()["ready_replicas"] == 1 and view.to_json()["desired_replicas"] == 2


def test_the_plain_table_is_what_tabulate_prints() -> None:
    import random

    import tabulate as tabulate_module
    from tabulate import tabulate

    from dstackctl.cli.render import plain_table

    tabulate_module.PRESERVE_WHITESPACE = True
    pieces = ["", " ", "a", "llama31", "  replica=1", "✓×~", "http://127.0.0.1:8000", "1/2 (0..3)", "…", "42"]
    chooser = random.Random(7)
    for _ in range(500):
        columns = chooser.randint(1, 9)
        headers = [
            chooser.choice(["NAME", "X", "STATUS", "RPS", "PROBES", "MESSAGE"]) for _ in range(columns)
        ]
        rows = [
            ["".join(chooser.choices(pieces, k=chooser.randint(0, 3))) for _ in range(columns)]
            for _ in range(chooser.randint(1, 6))
        ]
        assert plain_table(headers, rows) == tabulate(
            rows, headers=headers, tablefmt="plain", disable_numparse=True
        )
