"""The hint added to a failed pull of an image dstackctl chose itself (issue 16)."""

from __future__ import annotations

from typing import Any

import pytest

from dstackctl.config.models import ServiceConfiguration
from dstackctl.replica_spec import missing_image_hint


def config(**fields: Any) -> ServiceConfiguration:
    return ServiceConfiguration.model_validate(
        {"type": "service", "port": 8000, "commands": ["true"], **fields}
    )


def test_a_python_config_is_told_about_the_base_image_variable() -> None:
    assert missing_image_hint(config(python="3.11")) == (
        "; dstack's base image (for configs without `image`) can be replaced: set DSTACK_DOCKER_BASE_IMAGE"
        " to an image this machine has (scripts/build-base-image.sh builds dstackctl-python:latest), then"
        " stop the service and run it again"
    )


def test_docker_true_is_told_about_the_dind_image_variable() -> None:
    hint = missing_image_hint(config(docker=True))
    assert "set DSTACK_DIND_IMAGE to an image this machine has" in hint
    assert "DSTACK_DOCKER_BASE_IMAGE" not in hint


@pytest.mark.parametrize("image", ["dstackai/base:0.15-base-ubuntu24.04", "example.org/app:1"])
def test_an_image_of_the_config_s_own_gets_no_hint(image: str) -> None:
    assert missing_image_hint(config(image=image)) == ""
