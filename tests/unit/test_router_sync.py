"""RouterSync against the in-process fake SMG router: the calls it makes, and how it fails."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_router import Call, FakeRouter

from dstackctl.agent.router_sync import WORKER_LABEL, RouterSync, SyncResult, Worker

A = Worker("workers/0/1", "http://10.0.0.1:8000")
B = Worker("workers/1/1", "http://10.0.0.2:8000")


@pytest.fixture
def router() -> Iterator[FakeRouter]:
    with FakeRouter() as fake:
        yield fake


@pytest.fixture
def syncer() -> RouterSync:
    return RouterSync(timeout=2.0)


def _post(worker: Worker) -> Call:
    body = {
        "url": worker.url,
        "worker_type": "regular",
        "connection_mode": "http",
        "runtime_type": "sglang",
        "labels": {WORKER_LABEL: worker.key},
    }
    return Call("POST", "/workers", body)


def _id_of(router: FakeRouter, url: str) -> str:
    return next(worker_id for worker_id, spec in router.workers.items() if spec["url"] == url)


def test_adds_ready_workers_with_dstack_body_and_label(router: FakeRouter, syncer: RouterSync) -> None:
    result = syncer.sync(router.base_url, [A, B])
    assert result == SyncResult(added=(A.key, B.key), removed=(), error=None)
    assert router.take_calls() == [Call("GET", "/workers", None), _post(A), _post(B)]
    assert router.urls() == {A.url, B.url}


def test_in_sync_router_is_only_read(router: FakeRouter, syncer: RouterSync) -> None:
    syncer.sync(router.base_url, [A, B])
    router.take_calls()
    assert syncer.sync(router.base_url, [B, A]) == SyncResult()
    assert router.take_calls() == [Call("GET", "/workers", None)]


def test_removes_a_worker_that_left(router: FakeRouter, syncer: RouterSync) -> None:
    syncer.sync(router.base_url, [A, B])
    a_id = _id_of(router, A.url)
    router.take_calls()
    assert syncer.sync(router.base_url, [B]) == SyncResult(removed=(A.key,))
    assert router.take_calls() == [Call("GET", "/workers", None), Call("DELETE", f"/workers/{a_id}", None)]
    assert syncer.sync(router.base_url, []) == SyncResult(removed=(B.key,))
    assert router.urls() == set()


def test_re_adds_everything_after_the_router_restarts(router: FakeRouter, syncer: RouterSync) -> None:
    syncer.sync(router.base_url, [A, B])
    router.restart()
    router.take_calls()
    assert syncer.sync(router.base_url, [A, B]) == SyncResult(added=(A.key, B.key))
    assert router.take_calls()[1:] == [_post(A), _post(B)]


def test_a_worker_of_ours_at_a_new_address_is_replaced(router: FakeRouter, syncer: RouterSync) -> None:
    syncer.sync(router.base_url, [A])
    old_id = _id_of(router, A.url)
    moved = Worker(A.key, "http://10.0.0.9:8000")
    router.take_calls()
    assert syncer.sync(router.base_url, [moved]) == SyncResult(added=(A.key,), removed=(A.key,))
    assert router.take_calls()[1:] == [_post(moved), Call("DELETE", f"/workers/{old_id}", None)]
    assert router.urls() == {moved.url}


def test_foreign_workers_are_left_alone_and_matched_by_url(router: FakeRouter, syncer: RouterSync) -> None:
    router.add_foreign_worker("http://10.0.0.7:9000", {"region": "here"})
    router.add_foreign_worker("http://10.0.0.8:9000")
    router.add_foreign_worker(A.url)  # registered before us, without the label: counts as A
    assert syncer.sync(router.base_url, [A, B]) == SyncResult(added=(B.key,))
    b_id = _id_of(router, B.url)
    router.take_calls()
    assert syncer.sync(router.base_url, []) == SyncResult(removed=(B.key,))
    assert router.take_calls() == [Call("GET", "/workers", None), Call("DELETE", f"/workers/{b_id}", None)]
    assert router.urls() == {"http://10.0.0.7:9000", "http://10.0.0.8:9000", A.url}


def test_a_worker_still_registering_is_not_an_error(router: FakeRouter, syncer: RouterSync) -> None:
    router.async_register = True
    assert syncer.sync(router.base_url, [A]) == SyncResult(added=(A.key,))
    # Not listed yet: posted again, and SMG's 409 WORKER_CREATE_IN_PROGRESS is fine.
    assert syncer.sync(router.base_url, [A]) == SyncResult()
    router.complete_pending()
    router.take_calls()
    assert syncer.sync(router.base_url, [A]) == SyncResult()
    assert router.take_calls() == [Call("GET", "/workers", None)]


def _assert_sentence(error: str | None, *words: str) -> None:
    assert error is not None and error[0].isupper() and error.endswith(".")
    for word in words:
        assert word in error


def test_router_down_is_an_error_not_an_exception(syncer: RouterSync) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed below: nothing listens there
    result = syncer.sync(f"http://user:secret@127.0.0.1:{port}", [A])
    assert result.added == () and result.removed == ()
    _assert_sentence(result.error, f"127.0.0.1:{port}", "GET /workers", "refused")
    assert "secret" not in (result.error or "")


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_http_500_is_an_error(router: FakeRouter, syncer: RouterSync, method: str) -> None:
    syncer.sync(router.base_url, [A])
    router.fail = {method: 500}
    router.take_calls()
    result = syncer.sync(router.base_url, [B])  # adds B, removes A
    _assert_sentence(result.error, "HTTP 500")
    if method == "GET":  # nothing is changed without the router's list, as in dstack
        assert result == SyncResult(error=result.error)
        assert router.take_calls() == [Call("GET", "/workers", None)]
    else:  # one refused request does not stop the others
        assert result.added == (() if method == "POST" else (B.key,))
        assert result.removed == (() if method == "DELETE" else (A.key,))
        assert [c.method for c in router.take_calls()] == ["GET", "POST", "DELETE"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_hanging_router_times_out(router: FakeRouter, method: str) -> None:
    syncer = RouterSync(timeout=0.2)
    router.hang = {method}
    started = time.monotonic()
    result = syncer.sync(router.base_url, [A, B])
    assert time.monotonic() - started < 1.5
    _assert_sentence(result.error, f"did not answer {method} /workers", "0.2 s")
    # The first unanswered request ends the sync: B is not tried.
    assert [c.method for c in router.take_calls()] == (["GET"] if method == "GET" else ["GET", "POST"])


def test_an_unreadable_list_is_an_error(router: FakeRouter, syncer: RouterSync) -> None:
    router.workers["not-a-dict"] = {"url": 5}
    result = syncer.sync(router.base_url, [A])
    _assert_sentence(result.error, "cannot read")
    assert [c.method for c in router.take_calls()] == ["GET"]


def test_bad_urls_are_refused() -> None:
    with pytest.raises(ValueError):
        Worker("workers/0/0", "10.0.0.1:8000")
    _assert_sentence(RouterSync().sync("router:8000", [A]).error, "router URL")


def test_fake_router_runs_standalone() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).resolve().parent.parent / "fake_router.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert "listening" in proc.stdout.readline()  # printed once the socket is bound
        assert RouterSync().sync(f"http://127.0.0.1:{port}", [A]) == SyncResult(added=(A.key,))
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
