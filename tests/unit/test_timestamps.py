"""Timestamps to the millisecond (issue 15 item 10): `last_checked_at`, `last_scaled_at` and the
other times the agent and the CLI write are ISO 8601 in UTC with milliseconds and a `Z`, as
dstack's JSON has them (`2026-12-03T18:20:01.123Z`); whole-second values of older state files
still read, and `ps` renders both.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import cli

from dstackctl.agent.autoscaler import Autoscaler
from dstackctl.agent.desired import Deployment
from dstackctl.config.loader import parse_service
from dstackctl.deploy import Release
from dstackctl.probe_wire import ProbeResult
from dstackctl.probes import recorded
from dstackctl.request_rate import RequestRate
from dstackctl.status import GroupScaling, ObservedState, ProbeView, ReplicaRow
from dstackctl.store import Store
from dstackctl.timeutil import ago, parse_utc, utc_now

MILLISECONDS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
OLD_VALUE = "2026-12-03T18:20:01Z"  # as state files written before this change hold them


def _milliseconds(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def test_now_is_written_to_the_millisecond_in_utc() -> None:
    before = datetime.now(timezone.utc) - timedelta(milliseconds=1)
    text = utc_now()
    assert MILLISECONDS.match(text), text
    assert before <= parse_utc(text) <= datetime.now(timezone.utc)


def test_a_probe_check_is_stamped_to_the_millisecond() -> None:
    before = datetime.now(timezone.utc) - timedelta(milliseconds=1)
    checked = recorded(ProbeView("/health", 1), ProbeResult(ok=True, status=200, error=None))
    assert checked.last_checked_at is not None and MILLISECONDS.match(checked.last_checked_at)
    assert before <= parse_utc(checked.last_checked_at) <= datetime.now(timezone.utc)


def test_an_epoch_is_written_rounded_up_so_that_it_never_reads_back_earlier() -> None:
    from dstackctl.timeutil import utc_at

    epoch = datetime(2026, 12, 3, 18, 20, 1, 123400, tzinfo=timezone.utc).timestamp()
    assert utc_at(epoch) == "2026-12-03T18:20:01.124Z"
    assert utc_at(epoch - 0.1234) == "2026-12-03T18:20:01.000Z"
    for fraction in (0.0, 0.0004, 0.25, 0.9991, 0.9999):
        read_back = parse_utc(utc_at(1_700_000_000 + fraction)).timestamp()
        assert 0 <= read_back - (1_700_000_000 + fraction) < 0.001


def test_older_whole_second_values_and_other_iso_forms_still_read() -> None:
    moment = datetime(2026, 12, 3, 18, 20, 1, tzinfo=timezone.utc)
    assert parse_utc(OLD_VALUE) == moment
    assert parse_utc("2026-12-03T18:20:01+00:00") == moment
    assert parse_utc("2026-12-03T18:20:01.123456Z") == moment + timedelta(microseconds=123456)
    assert parse_utc("2026-12-03T18:20:01") == moment  # no offset: UTC
    assert ago(OLD_VALUE, now=moment + timedelta(seconds=12.9)) == "12 sec ago"
    assert ago(_milliseconds(moment), now=moment + timedelta(minutes=11)) == "11 mins ago"


# --- the autoscaler's last scaling event, across an agent restart -------------------------------

SERVICE = """type: service
name: svc
port: 8000
image: app
replicas: 1..4
scaling: {metric: rps, target: 1, window: 30s, scale_up_delay: 10s, scale_down_delay: 20s}
"""


def _deployment() -> Deployment:
    return Deployment.load(Release.of(parse_service(SERVICE, "svc.yml"), {}).record(1), {})


def test_a_restarted_agent_holds_a_scale_up_for_the_whole_delay() -> None:
    """The last scaling event at .8 of a second, read back after a restart: the scale-up delay
    (10 s) must not end 0.8 s early, as it did when the time was written in whole seconds."""
    scaled_at = datetime(2026, 12, 3, 18, 20, 1, 800000, tzinfo=timezone.utc).timestamp()
    before = Autoscaler(RequestRate(lambda: scaled_at), clock=lambda: scaled_at)
    before.apply(_deployment())  # the service's start: its first scaling event
    saved = json.loads(json.dumps(before.groups["0"].to_json()))

    now = scaled_at + 9.5
    restored = GroupScaling.from_json(saved)
    assert restored is not None
    after = Autoscaler(RequestRate(lambda: now), restored={"0": restored}, clock=lambda: now)
    after.rate.count(60)  # 2 rps over the 30 s window: 2 replicas wanted
    assert {n: g.count for n, g in after.apply(_deployment()).groups.items()} == {"0": 1}
    assert after.groups["0"].pending == "scale-up to 2 in 1s (scale_up_delay)"
    assert saved["last_scaled_at"] == "2026-12-03T18:20:01.800Z"


# --- ps, ps -v and ps --json over a state with both kinds of value -------------------------------


@pytest.fixture
def store_with_both(dstack_home: Path) -> Store:
    """A service whose state holds millisecond times and, for replica 1, whole-second ones."""
    now = datetime.now(timezone.utc)

    def before(seconds: float) -> str:
        return _milliseconds(now - timedelta(seconds=seconds))

    store = Store(dstack_home)
    spec = {"name": "web", "run_id": "r1", "desired": "running", "replicas": 2}
    store.write("web", "spec", {**spec, "submitted_at": before(20.2)})
    fresh = ReplicaRow(
        replica_num=0,
        deployment_num=0,
        status="running",
        phase="ready",
        ready=True,
        probes=(ProbeView("/health", 1, 1, 0, before(0.4)),),
        submitted_at=before(90.3),
    )
    old = ReplicaRow(
        replica_num=1,
        deployment_num=0,
        status="running",
        phase="ready",
        ready=True,
        probes=(ProbeView("/health", 1, 1, 0, OLD_VALUE),),
        submitted_at=(now - timedelta(minutes=11, seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    scaling = {"0": GroupScaling(1, 4, 2, 1.0, 30, 0.5, before(2.5))}
    state = ObservedState("web", "r1", target_replicas=2, replicas=(fresh, old), scaling=scaling)
    store.write("web", "state", state.to_json())
    return store


def test_ps_renders_ages_from_millisecond_and_whole_second_times(
    store_with_both: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = cli(capsys, "ps")
    assert plain.code == 0 and re.search(r"\b2[0-2] sec ago\b", plain.out), plain.out
    verbose = cli(capsys, "ps", "-v")
    assert verbose.code == 0, verbose.err
    assert "1 min ago" in verbose.out and "11 mins ago" in verbose.out, verbose.out
    assert "last scaled now" in verbose.out, verbose.out


def test_ps_json_gives_the_times_as_they_were_written(
    store_with_both: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = cli(capsys, "ps", "--json")
    assert shown.code == 0, shown.err
    [run] = json.loads(shown.out)["runs"]
    checked = [r["probes"][0]["last_checked_at"] for r in run["replicas"]]
    assert MILLISECONDS.match(checked[0]) and checked[1] == OLD_VALUE, checked
    assert MILLISECONDS.match(run["submitted_at"]), run["submitted_at"]
    assert MILLISECONDS.match(run["scaling"]["0"]["last_scaled_at"]), run["scaling"]
