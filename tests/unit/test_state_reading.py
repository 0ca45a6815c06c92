"""state.json read back: what the agent wrote is what `ps` gets, old files too."""

from __future__ import annotations

import dataclasses

import pytest

from dstackctl.status import ObservedState, ProbeView, ReplicaRow, RolloutStatus


def _row(**changes: object) -> ReplicaRow:
    probe = ProbeView(
        "/health", 2, success_streak=2, last_checked_at="2026-12-03T10:00:00.000Z", last_status=200
    )
    row = ReplicaRow(
        replica_num=1,
        deployment_num=3,
        group="workers",
        status="running",
        phase="serving",
        ready=True,
        container_id="c" * 64,
        host_port=32768,
        url="http://127.0.0.1:32768",
        log_tail=("a", "b"),
        probes=(probe, ProbeView("/ready", 1)),
        gpus=({"index": 0},),
        restarts=2,
    )
    return dataclasses.replace(row, **changes)  # type: ignore[arg-type]


def test_rows_and_probes_read_back_equal_to_what_was_written() -> None:
    state = ObservedState(
        name="svc",
        run_id="r1",
        status="running",
        deployment_num=3,
        replicas=(_row(), _row(replica_num=2, ready=False, message="exited")),
        rollout=RolloutStatus("done", 2, 3, serving_at_start=(("workers", 1),)),
    )
    read = ObservedState.from_json(state.to_json())
    assert read == state
    assert read.replicas[0].probes[0].symbol == "✓"
    assert read.replicas[1].running_and_ready is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        read.replicas[0].ready = False  # type: ignore[misc]


def test_an_older_file_gets_defaults_and_unknown_keys_are_dropped() -> None:
    row = ReplicaRow.from_json({"replica_num": 0, "deployment_num": 0, "from_the_future": 1})
    assert row == ReplicaRow(replica_num=0, deployment_num=0)
    assert not hasattr(row, "from_the_future")
    probe = ProbeView.from_json({"url": "/h", "ready_after": 1, "symbol": "✓"})
    assert probe == ProbeView("/h", 1)
    assert probe.symbol == "×"  # worked out, never read from the file


def test_a_row_without_a_required_field_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="deployment_num"):
        ReplicaRow.from_json({"replica_num": 0})
