"""The per-service agent: a detached process that makes Docker match the desired spec.

`process` starts and stops it (cheap to import); `service_agent.ServiceAgent` is the agent
itself, loaded only where it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dstackctl.agent.service_agent import ServiceAgent

__all__ = ["ServiceAgent"]


def __getattr__(name: str) -> Any:
    if name == "ServiceAgent":
        from dstackctl.agent.service_agent import ServiceAgent

        return ServiceAgent
    raise AttributeError(name)
