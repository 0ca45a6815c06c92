"""A hung replica found by its silence: the endpoint reports a replica that keeps a request
waiting without answering anything, the agent's probe confirms it (here: the test's callback
ejects at once), and the waiting GETs go to another replica while POSTs stay."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import requests
from helpers import wait_until
from test_proxy_pool import WAIT, Upstream, get, no_startup_grace, upstream
from test_proxy_timeouts import Silent, endpoint_with, silent

from dstackctl.endpoint_limits import EndpointLimits
from dstackctl.proxy import Endpoint
from dstackctl.stall_watch import StallWatch

__all__ = ["no_startup_grace", "silent", "upstream"]  # fixtures, used here too


# --- the watch, on a clock of our own -----------------------------------------------------


def test_a_replica_is_suspected_after_a_request_waited_on_it_without_any_answer() -> None:
    watch = StallWatch(after=5)
    watch.wait("a", now=100, task=None, resend=True)
    token, _ = watch.wait("b", now=100, task=None, resend=True)
    watch.done("b", token, answered_at=101)
    watch.wait("b", now=101, task=None, resend=True)

    assert watch.suspects(now=104) == []
    assert watch.suspects(now=105) == ["a"]
    assert watch.suspects(now=106) == ["b"]
    assert watch.suspects(now=108) == []  # each reported once per 5 s
    assert watch.suspects(now=110) == ["a"]


def test_an_answer_on_the_replica_clears_the_suspicion_and_a_finished_wait_leaves_nothing() -> None:
    watch = StallWatch(after=5)
    first, _ = watch.wait("a", now=100, task=None, resend=False)
    second, _ = watch.wait("a", now=102, task=None, resend=False)
    watch.done("a", first, answered_at=104)  # it answered the first: it is alive

    assert watch.suspects(now=108) == []
    assert watch.suspects(now=109) == ["a"]  # the second has waited 5 s since that answer
    watch.done("a", second, answered_at=None)
    assert watch.suspects(now=120) == []


def test_only_requests_that_can_safely_go_elsewhere_are_abandoned() -> None:
    watch = StallWatch(after=5)
    _, get = watch.wait("a", now=100, task=None, resend=True)
    _, post = watch.wait("a", now=100, task=None, resend=False)

    assert watch.abandon("a") == 1
    assert get.abandoned and not post.abandoned
    assert watch.abandon("a") == 0  # once is enough


# --- the endpoint -------------------------------------------------------------------------


def with_a_stall_ejector(silent: Silent, read_timeout: float = 30) -> tuple[Endpoint, list[str]]:
    limits = EndpointLimits(read_timeout=read_timeout, suspect_after=0.5)
    endpoint = endpoint_with(limits, hung=silent.port)
    suspected: list[str] = []

    def confirm(key: str) -> None:  # the agent runs the replica's probe; here it fails at once
        suspected.append(key)
        endpoint.eject(key, "its probe timed out")

    endpoint.watch_stalls(confirm)
    return endpoint, suspected


def test_a_get_waiting_on_a_hung_replica_is_answered_by_another_once_it_is_ejected(
    silent: Silent, upstream: Upstream
) -> None:
    endpoint, suspected = with_a_stall_ejector(silent)
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(get, endpoint, "/text?stuck")  # only the hung replica is there
            wait_until(lambda: silent.requests, timeout=WAIT, what="the request to reach the hung replica")
            endpoint.set_upstreams({"hung": silent.port, "ok": upstream.port})
            began = time.monotonic()
            answer = waiting.result(WAIT)
        took = time.monotonic() - began
        ejected = endpoint.ejected()
        after = [get(endpoint, f"/text?{i}").status_code for i in range(4)]
    finally:
        endpoint.close()

    assert answer.status_code == 200
    assert [seen.path for seen in upstream.seen][:1] == ["/text?stuck"]  # sent again, to the good one
    assert took < WAIT
    assert suspected == ["hung"] and ejected == {"hung"}
    assert after == [200] * 4 and len(silent.requests) == 1


def test_a_post_waiting_on_a_hung_replica_is_never_sent_to_another(
    silent: Silent, upstream: Upstream
) -> None:
    endpoint, suspected = with_a_stall_ejector(silent, read_timeout=3)
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                lambda: requests.post(endpoint.url + "/echo", data=b"pay once", timeout=WAIT)
            )
            wait_until(lambda: silent.requests, timeout=WAIT, what="the POST to reach the hung replica")
            endpoint.set_upstreams({"hung": silent.port, "ok": upstream.port})
            wait_until(lambda: suspected, timeout=WAIT, what="the stall to be reported")
            answer = waiting.result(WAIT)
    finally:
        endpoint.close()

    assert answer.status_code == 504  # the read timeout, on the replica it was sent to
    assert not [seen for seen in upstream.seen if seen.method == "POST"]


def test_a_replica_that_answers_is_not_suspected(upstream: Upstream) -> None:
    limits = EndpointLimits(suspect_after=0.5)
    endpoint = endpoint_with(limits, ok=upstream.port)
    suspected: list[str] = []
    endpoint.watch_stalls(suspected.append)
    try:
        deadline = time.monotonic() + 2  # a load of two seconds, four times the suspicion time
        while time.monotonic() < deadline:
            assert get(endpoint, "/text").status_code == 200
    finally:
        endpoint.close()

    assert suspected == []
