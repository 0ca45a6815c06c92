"""One request's trip to a replica: send it, wait for the head of the answer, relay the body.

The replica's silence is bounded by an idle read timeout (aiohttp's `sock_read`: it restarts
with every byte that arrives), so a token stream lives as long as tokens keep coming while a
replica that hangs is given up after `read_timeout` seconds without a byte.
"""

from __future__ import annotations

import asyncio
import errno

from aiohttp import client_exceptions, http_exceptions, web
from aiohttp.http import RawResponseMessage
from aiohttp.streams import StreamReader

from dstackctl.endpoint_answers import bad_gateway, broken_answer, gateway_timeout, is_small
from dstackctl.forwarding import OutgoingRequest, drop_hop_by_hop
from dstackctl.stall_watch import StallWatch
from dstackctl.upstream_pool import UpstreamConnection, UpstreamPool
from dstackctl.websocket_relay import tunnel

_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
# What reading an answer raises when the replica's connection broke or the answer was garbled.
_UPSTREAM_ERRORS = (client_exceptions.ClientError, http_exceptions.HttpProcessingError, OSError)


class Unreachable(Exception):
    """No connection could be made to the replica: nothing was sent."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.out_of_fds = isinstance(error, OSError) and error.errno in _OUT_OF_FDS


class ClosedUnanswered(Exception):
    """The replica closed the connection (or reset it) before any byte of an answer."""


class UpstreamTimeout(Exception):
    """The replica sent no byte of an answer for the read timeout."""


class BadGateway(Exception):
    """The replica's answer was broken; the message says how."""


class Exchange:
    """A request sent to a replica on `connection`, whose answer head has arrived."""

    __slots__ = ("connection", "message", "payload", "upload")

    def __init__(
        self,
        connection: UpstreamConnection,
        upload: asyncio.Task[None] | None,
        answer: tuple[RawResponseMessage, StreamReader],
    ) -> None:
        self.connection = connection
        self.upload = upload  # the rest of a streamed request body, still being sent
        self.message, self.payload = answer

    @property
    def request_sent(self) -> bool:
        upload = self.upload
        return upload is None or (upload.done() and not upload.cancelled() and upload.exception() is None)

    def end(self, pool: UpstreamPool) -> None:
        """Give the connection back: pooled when request and answer both went through whole."""
        reusable = self.request_sent and self.payload.is_eof()
        if self.upload is not None:
            self.upload.cancel()
        pool.release(self.connection, reusable)


async def _stopped(upload: asyncio.Task[None] | None) -> None:
    """Cancel `upload` and wait until it ended, so the body can be read again from the start."""
    if upload is None:
        return
    upload.cancel()
    await asyncio.wait({upload})


class Forwarder:
    """Sends requests to replicas over `pool` and relays their answers to the clients."""

    def __init__(self, pool: UpstreamPool, read_timeout: float, stalls: StallWatch | None = None) -> None:
        self.pool = pool
        self.read_timeout = read_timeout
        self.stalls = stalls or StallWatch()

    async def send_watched(
        self, request: web.BaseRequest, outgoing: OutgoingRequest, key: str, port: int
    ) -> Exchange | None:
        """`send`, watched for stalls (stall_watch.py); None when replica `key` was ejected as
        hung while this request, which can safely go elsewhere, waited on it."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        token, waiting = self.stalls.wait(key, loop.time(), task, outgoing.resendable)
        answered_at = None
        try:
            exchange = await self.send(outgoing, port)
            answered_at = loop.time()
            return exchange
        except asyncio.CancelledError:
            if not waiting.abandoned:
                raise  # the client left, or the endpoint is closing
            # Cancelled by the stall watch alone (its connection to the hung replica is
            # closed): take this request elsewhere, unless its client has left meanwhile.
            if task is not None and hasattr(task, "uncancel"):  # Python 3.11+
                task.uncancel()
            if request.transport is None:
                raise
            return None
        finally:
            self.stalls.done(key, token, answered_at)

    async def send(self, outgoing: OutgoingRequest, port: int) -> Exchange:
        """Send `outgoing` to the replica at `port` and wait for the head of its answer."""
        connection = self.pool.take_idle(port) or await self._open(port)
        try:
            return await self._exchange(connection, outgoing)
        except ClosedUnanswered:
            if not (connection.reused and outgoing.replayable):
                raise
        # The replica closed that idle connection as it was being reused (its keep-alive
        # timeout, a restart): the request never reached it, so send it again on a new one.
        return await self._exchange(await self._open(port), outgoing)

    async def _open(self, port: int) -> UpstreamConnection:
        try:
            return await self.pool.open(port)
        except (OSError, asyncio.TimeoutError) as exc:
            raise Unreachable(exc) from exc

    async def _exchange(self, connection: UpstreamConnection, outgoing: OutgoingRequest) -> Exchange:
        connection.expect_response(outgoing.head_only, self.read_timeout)
        upload: asyncio.Task[None] | None = None
        try:
            upload = outgoing.send(connection)
            answer = await connection.read_response()
        except _UPSTREAM_ERRORS as exc:
            connection.close()
            await _stopped(upload)
            if isinstance(exc, asyncio.TimeoutError):
                raise UpstreamTimeout from exc
            if connection.responded:
                raise BadGateway(broken_answer(exc)) from exc
            raise ClosedUnanswered from exc
        except BaseException:  # cancelled: the client left, or the server is shutting down
            connection.close()
            if upload is not None:
                upload.cancel()
            raise
        return Exchange(connection, upload, answer)

    async def relay(self, request: web.BaseRequest, exchange: Exchange, upgrade: bool) -> web.StreamResponse:
        """Pass the replica's answer on to the client, streaming its body as it arrives."""
        message, payload = exchange.message, exchange.payload
        if message.code == 101:
            try:
                if not upgrade:
                    return bad_gateway("the replica switched protocols unasked")
                return await tunnel(request, exchange.connection, message, self.read_timeout)
            finally:
                exchange.end(self.pool)
        if is_small(message.headers, payload):
            # Head and body go out in one write; a stream, or a large body, goes on as it comes.
            try:
                body = payload.read_nowait() if payload.is_eof() else await payload.read()
            except _UPSTREAM_ERRORS as exc:
                if isinstance(exc, asyncio.TimeoutError):
                    return gateway_timeout(self.read_timeout)
                return bad_gateway(broken_answer(exc))
            finally:
                exchange.end(self.pool)
            whole = web.Response(
                status=message.code, reason=message.reason, headers=message.headers, body=body or None
            )
            drop_hop_by_hop(whole.headers)
            return whole
        return await self._stream(request, exchange)

    async def _stream(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse:
        message, payload = exchange.message, exchange.payload
        response = web.StreamResponse(status=message.code, reason=message.reason, headers=message.headers)
        drop_hop_by_hop(response.headers)
        try:
            await response.prepare(request)
            while chunk := await payload.readany():
                await response.write(chunk)
            await response.write_eof()
        except _UPSTREAM_ERRORS:
            # The replica or the client went away mid-response, or the replica fell silent
            # for the read timeout: the head is out, so closing is all that is left to say.
            if request.transport is not None:
                request.transport.close()
        finally:
            exchange.end(self.pool)
        return response
