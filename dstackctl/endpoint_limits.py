"""How long the endpoint waits on replicas and clients, and how many clients it serves at once."""

from __future__ import annotations

import dataclasses
import resource

from dstackctl.stall_watch import SUSPECT_AFTER_SECONDS
from dstackctl.upstream_health import EJECT_AFTER_FAILURES

# dstack's gateway gives a replica this long without a byte (nginx proxy_read_timeout, from
# DEFAULT_SERVICE_READ_TIMEOUT in dstack/_internal/proxy/lib/const.py, used by
# proxy/gateway/resources/nginx/service.jinja2 for plain requests and WebSockets alike).
READ_TIMEOUT_SECONDS = 300.0
# A request head arrives in one packet from any real client; one that trickles in is a
# client holding a connection (nginx's client_header_timeout, 60 s by default, is for the
# internet's slow links).
HEADER_TIMEOUT_SECONDS = 10.0
# A connection with no request in progress is closed after this long (nginx's default
# keepalive_timeout; dstack's nginx.conf keeps it).
KEEPALIVE_TIMEOUT_SECONDS = 75.0
# dstack's nginx.conf allows 16,384 connections per worker, replicas' included: half of
# them for clients. Lowered to what the open-file limit allows (each client connection may
# hold one to a replica too).
MAX_CLIENT_CONNECTIONS = 8192
# Half of them for one address, so that one client alone cannot take every connection.
MAX_CONNECTIONS_PER_CLIENT = 4096
# Descriptors kept for everything else the agent opens (Docker, probes, logs, the store).
_RESERVED_FDS = 256


@dataclasses.dataclass(frozen=True)
class EndpointLimits:
    read_timeout: float = READ_TIMEOUT_SECONDS
    header_timeout: float = HEADER_TIMEOUT_SECONDS
    keepalive_timeout: float = KEEPALIVE_TIMEOUT_SECONDS
    max_connections: int = MAX_CLIENT_CONNECTIONS
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT
    eject_after_failures: int = EJECT_AFTER_FAILURES
    suspect_after: float = SUSPECT_AFTER_SECONDS

    def within_open_file_limit(self) -> EndpointLimits:
        """These limits, with at most as many client connections as the descriptors allow."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return self
        allowed = max(16, (soft - _RESERVED_FDS) // 2)
        if self.max_connections <= allowed:
            return self
        return dataclasses.replace(
            self,
            max_connections=allowed,
            max_connections_per_client=min(self.max_connections_per_client, allowed),
        )
