"""The one module that talks to Docker (docker-py); everything above sees small wrappers.

Errors from the engine become DstackctlError with one sentence that says what to do.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest

from dstackctl.docker_address import (
    DEFAULT_SOCKET,
    PERMISSION_DENIED,
    engine_address,
    not_running,
)
from dstackctl.docker_address import (
    DockerError as DockerError,  # re-exported: its home is docker_address, free of docker-py
)
from dstackctl.labels import (
    LABEL_GPUS,
)
from dstackctl.replica import Replica

if TYPE_CHECKING:
    from dstackctl.replica_spec import ReplicaSpec

NO_GPU_RUNTIME = (
    "this Docker engine has no NVIDIA GPU runtime; install nvidia-container-toolkit, "
    "run `nvidia-ctk runtime configure --runtime=docker` and restart Docker"
)


def _engine_error(exc: Exception, tried: str | None = None) -> DockerError:
    text = str(exc)
    if isinstance(exc, docker.errors.DockerException) and "Permission denied" in text:
        return DockerError(PERMISSION_DENIED)
    if (
        "No such file or directory" in text
        or "Connection refused" in text
        or isinstance(exc, requests.exceptions.ConnectionError)
    ):
        return not_running(tried)
    return DockerError(f"cannot talk to Docker: {text}")


class _Guarded:
    """docker-py's low-level client, with a lost connection to the engine (Docker stopped or
    restarting) raised as DockerError from every call, never as a requests exception."""

    def __init__(self, api: Any) -> None:
        self._api = api

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._api, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except docker.errors.DockerException:
                raise  # APIError is also a requests HTTPError: the caller handles it
            except requests.exceptions.RequestException as exc:
                raise _engine_error(exc) from None

        return call


class DockerEngine:
    """A connection to the local engine with the few operations dstackctl needs."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._api = _Guarded(client.api)

    @classmethod
    def connect(cls, timeout: int = 30) -> DockerEngine:
        """The engine the docker CLI would use: DOCKER_HOST, else DOCKER_CONTEXT or the
        context of `docker context use`, else the local socket."""
        address = engine_address()
        try:
            if address is None:
                client = docker.from_env(timeout=timeout)
            else:
                client = docker.DockerClient(base_url=address, timeout=timeout)
            client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _engine_error(exc, address or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET) from None
        return cls(client)

    def close(self) -> None:
        self._client.close()

    def ping(self) -> None:
        try:
            self._client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _engine_error(exc) from None

    # --- queries ------------------------------------------------------------------------

    def list_replicas(self, labels: dict[str, str]) -> list[Replica]:
        """Every container (running or not) carrying all `labels`.

        One list call; only containers that stopped are inspected (for exit code and OOM).
        """
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        try:
            summaries = self._api.containers(all=True, filters=filters)
            result = []
            for summary in summaries:
                if summary.get("State") == "running":
                    result.append(Replica.from_summary(summary))
                    continue
                with contextlib.suppress(docker.errors.NotFound):
                    result.append(Replica.from_attrs(self._api.inspect_container(summary["Id"])))
            return result
        except docker.errors.APIError as exc:
            raise DockerError(f"cannot list containers: {exc.explanation}") from None
        except requests.exceptions.RequestException as exc:
            raise _engine_error(exc) from None

    def gpus_in_use(self) -> set[str]:
        """UUIDs of the GPUs assigned to any dstackctl container on this engine (any service)."""
        try:
            summaries = self._api.containers(all=True, filters={"label": [LABEL_GPUS]})
        except docker.errors.APIError as exc:
            raise DockerError(f"cannot list containers: {exc.explanation}") from None
        except requests.exceptions.RequestException as exc:
            raise _engine_error(exc) from None
        used: set[str] = set()
        for summary in summaries:
            used.update(u for u in (summary.get("Labels") or {}).get(LABEL_GPUS, "").split(",") if u)
        return used

    def has_image(self, image: str) -> bool:
        try:
            self._api.inspect_image(image)
            return True
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.APIError as exc:
            raise DockerError(f"cannot inspect image {image}: {exc.explanation}") from None

    # --- images -------------------------------------------------------------------------

    def pull(
        self,
        image: str,
        progress: Callable[[str], None] = lambda _: None,
        auth: dict[str, str] | None = None,
    ) -> None:
        """Pull `image`, reporting progress as short text such as `downloading 45% (3 layers)`."""
        repository, tag = _split_image(image)
        layers: dict[str, tuple[int, int]] = {}
        try:
            for event in self._api.pull(repository, tag=tag, stream=True, decode=True, auth_config=auth):
                if "error" in event:
                    raise DockerError(_pull_failed(image, event["error"]))
                detail = event.get("progressDetail") or {}
                if event.get("id") and detail.get("total"):
                    layers[event["id"]] = (detail.get("current", 0), detail["total"])
                    done = sum(c for c, _ in layers.values())
                    total = sum(t for _, t in layers.values())
                    progress(f"pulling {image}: {100 * done // max(total, 1)}% of {len(layers)} layers")
        except docker.errors.APIError as exc:
            raise DockerError(_pull_failed(image, str(exc.explanation))) from None
        except requests.exceptions.RequestException as exc:
            raise _engine_error(exc) from None

    # --- containers ---------------------------------------------------------------------

    def create_and_start(self, spec: ReplicaSpec) -> Replica:
        try:
            created = self._api.create_container(
                spec.image,
                name=spec.name,
                command=spec.command,
                entrypoint=spec.entrypoint,
                environment=spec.environment,
                working_dir=spec.working_dir,
                user=spec.user or "",
                labels=spec.labels,
                ports=[spec.container_port],
                host_config=self._host_config(spec),
                networking_config=self._api.create_networking_config(
                    {spec.network: self._api.create_endpoint_config()}
                )
                if spec.network
                else None,
                stop_timeout=spec.stop_grace_seconds,
                detach=True,
            )
        except docker.errors.ImageNotFound:
            raise DockerError(f"image {spec.image} is not on this machine; build or pull it first") from None
        except docker.errors.APIError as exc:
            raise DockerError(f"cannot create a container: {exc.explanation}") from None
        container_id = created["Id"]
        try:
            self._api.start(container_id)
        except docker.errors.APIError as exc:
            with contextlib.suppress(docker.errors.APIError):
                self._api.remove_container(container_id, force=True)
            raise DockerError(_start_failed(spec.name, str(exc.explanation or exc))) from None
        return self.inspect(container_id)

    def _host_config(self, spec: ReplicaSpec) -> Any:
        device_requests = None
        if spec.gpu_count or spec.gpu_device_ids:
            device_requests = [
                DeviceRequest(
                    count=None if spec.gpu_device_ids else spec.gpu_count,
                    device_ids=spec.gpu_device_ids,
                    capabilities=[["gpu"]],
                )
            ]
        return self._api.create_host_config(
            port_bindings={f"{spec.container_port}/tcp": (spec.publish_host, None)},
            binds=spec.binds or None,
            init=True,
            privileged=spec.privileged,
            shm_size=spec.shm_size_bytes,
            mem_limit=spec.mem_limit_bytes,
            nano_cpus=spec.nano_cpus,
            device_requests=device_requests,
            network_mode=spec.network,
        )

    # --- networks -----------------------------------------------------------------------

    def ensure_network(self, name: str, labels: dict[str, str]) -> None:
        """Create the bridge network `name` unless it exists."""
        try:
            if any(n.get("Name") == name for n in self._api.networks(filters={"name": name})):
                return
            self._api.create_network(name, driver="bridge", labels=labels)
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # created meanwhile
                return
            if "address pool" in str(exc.explanation):
                raise DockerError(
                    f"Docker has no free address pool for the network {name}; remove unused "
                    f"networks (`docker network prune`) or add `default-address-pools` to "
                    f"/etc/docker/daemon.json"
                ) from None
            raise DockerError(f"cannot create the network {name}: {exc.explanation}") from None
        except requests.exceptions.RequestException as exc:
            raise _engine_error(exc) from None

    def remove_networks(self, labels: dict[str, str]) -> int:
        """Remove every network carrying all `labels`; returns how many."""
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        removed = 0
        try:
            for network in self._api.networks(filters=filters):
                with contextlib.suppress(docker.errors.NotFound):
                    self._api.remove_network(network["Id"])
                    removed += 1
        except docker.errors.APIError as exc:
            raise DockerError(f"cannot remove a network: {exc.explanation}") from None
        except requests.exceptions.RequestException as exc:
            raise _engine_error(exc) from None
        return removed

    def start(self, container_id: str) -> None:
        """Start an existing, stopped container again (same id, labels and env)."""
        try:
            self._api.start(container_id)
        except docker.errors.NotFound:
            raise DockerError(f"container {container_id[:12]} no longer exists") from None
        except docker.errors.APIError as exc:
            raise DockerError(f"cannot start container {container_id[:12]}: {exc.explanation}") from None

    def inspect(self, container_id: str) -> Replica:
        try:
            return Replica.from_attrs(self._api.inspect_container(container_id))
        except docker.errors.NotFound:
            raise DockerError(f"container {container_id[:12]} no longer exists") from None

    def stop_and_remove(self, container_id: str, grace_seconds: int) -> None:
        """Stop with SIGTERM, SIGKILL after the grace period, then remove. Gone is fine."""
        try:
            self._api.stop(container_id, timeout=grace_seconds)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            pass  # already stopping or dead; removal below forces it
        with contextlib.suppress(docker.errors.NotFound):
            try:
                self._api.remove_container(container_id, force=True)
            except docker.errors.APIError as exc:
                if "already in progress" not in str(exc):
                    raise DockerError(f"cannot remove container {container_id[:12]}: {exc}") from None

    def logs(
        self,
        container_id: str,
        tail: int | None = None,
        follow: bool = False,
        stop: threading.Event | None = None,
        timestamps: bool = False,
        since: float | None = None,
    ) -> Iterator[bytes]:
        """Log lines (stdout and stderr) as bytes, ending with the container or on `stop`;
        with `timestamps`, each starts with Docker's RFC 3339 time and a space."""
        try:
            stream = self._api.logs(
                container_id,
                stdout=True,
                stderr=True,
                stream=True,
                follow=follow,
                tail="all" if tail is None else tail,
                timestamps=timestamps,
                **({"since": since} if since is not None else {}),
            )
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            raise DockerError(f"cannot read logs: {exc.explanation}") from None
        buffer = b""
        try:
            for chunk in _until_disconnected(stream):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                yield from (line + b"\n" for line in lines)
                if stop is not None and stop.is_set():
                    break
        finally:
            with contextlib.suppress(Exception):
                stream.close()
        if buffer:
            yield buffer

    def environment(self, container_id: str) -> dict[str, str]:
        """The container's environment variables (for rebuilding a lost store only)."""
        try:
            attrs = self._api.inspect_container(container_id)
        except docker.errors.APIError as exc:
            raise DockerError(f"cannot inspect container {container_id[:12]}: {exc.explanation}") from None
        pairs = (item.partition("=") for item in attrs.get("Config", {}).get("Env") or [])
        return {key: value for key, _, value in pairs}

    def tail_text(self, container_id: str, lines: int) -> list[str]:
        try:
            raw = self._api.logs(container_id, stdout=True, stderr=True, tail=lines)
        except (docker.errors.APIError, DockerError):
            return []
        text: str = raw.decode("utf-8", "replace")
        return text.splitlines()[-lines:]


def _until_disconnected(stream: Any) -> Iterator[bytes]:
    """A log stream that ends quietly when the engine goes away."""
    try:
        yield from stream
    except (requests.exceptions.RequestException, OSError):
        return


def _split_image(image: str) -> tuple[str, str]:
    name, _, digest = image.partition("@")
    if digest:
        return name, digest
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = name.rpartition(":")
        return repository, tag
    return name, "latest"


def _pull_failed(image: str, reason: str) -> str:
    return (
        f"image {image} is not on this machine and pulling it failed ({reason.strip()}); "
        f"build it locally or check the name and your registry access"
    )


def _start_failed(name: str, explanation: str) -> str:
    if "could not select device driver" in explanation or "nvidia" in explanation.lower():
        return NO_GPU_RUNTIME
    if "port is already allocated" in explanation or "address already in use" in explanation:
        return f"the port is in use: {explanation}"
    return f"cannot start container {name}: {explanation}"
