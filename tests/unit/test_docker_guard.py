"""The docker-py guard: a lost engine becomes DockerError; API errors reach their handlers."""

from __future__ import annotations

import docker.errors
import pytest
import requests

from dstackctl.docker import DockerError, _Guarded


class _FakeApi:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.base_url = "http+docker://localhost"

    def inspect_image(self, _image: str) -> None:
        raise self.error


def test_a_lost_connection_becomes_one_sentence() -> None:
    guarded = _Guarded(_FakeApi(requests.exceptions.ConnectionError("socket gone")))
    with pytest.raises(DockerError, match="Docker is not running"):
        guarded.inspect_image("x")


@pytest.mark.parametrize("error", [docker.errors.ImageNotFound("no"), docker.errors.APIError("500")])
def test_api_errors_pass_through_although_they_are_requests_errors(error: Exception) -> None:
    assert isinstance(error, requests.exceptions.RequestException)
    guarded = _Guarded(_FakeApi(error))
    with pytest.raises(type(error)):
        guarded.inspect_image("x")
    assert guarded.base_url == "http+docker://localhost"
