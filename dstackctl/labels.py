"""The Docker labels that tie a container to its service, replica and deployment (pure).

Docker is the truth for what exists: the agent finds, adopts and classifies containers by
these labels alone, so nothing here may import docker-py.
"""

from __future__ import annotations

from pathlib import Path

LABEL_RUN = "dstackctl.run"
LABEL_HOME = "dstackctl.home"
LABEL_GROUP = "dstackctl.group"
LABEL_REPLICA = "dstackctl.replica"
LABEL_JOB = "dstackctl.job"
LABEL_DEPLOYMENT = "dstackctl.deployment"
LABEL_CONFIG_HASH = "dstackctl.config-hash"
LABEL_GROUP_HASH = "dstackctl.group-hash"  # what the replica's group runs (see Deployment.owns)
LABEL_GPUS = "dstackctl.gpus"
# The service's spec (no env values) on every container, so a lost store can be rebuilt.
LABEL_SPEC = "dstackctl.spec"
# dstack names the replica group of a service without `replicas:` groups "0".
DEFAULT_GROUP = "0"


def home_label(home: Path) -> str:
    """Containers of different stores (e.g. test runs) must never be adopted by each other."""
    import hashlib  # here: `ps` reads labels.py's names and never needs a hash

    return hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]


def service_labels(run_name: str, home: Path) -> dict[str, str]:
    """The labels every container of one service carries (a filter for listing them)."""
    return {LABEL_RUN: run_name, LABEL_HOME: home_label(home)}


def replica_name(group: str, replica_num: int) -> str:
    """`replica=1`, or `group=workers replica=1` in a service with replica groups."""
    return f"replica={replica_num}" if group == DEFAULT_GROUP else f"group={group} replica={replica_num}"
