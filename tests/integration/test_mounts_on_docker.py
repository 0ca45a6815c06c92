"""Mounts and working folders as Docker really applies them (issue 15, item 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import cli, write_service

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_two_volumes_of_one_host_path_and_a_relative_working_dir_reach_the_container(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "marker").write_text("here")
    # The replica starts its server only when both mounts and the folder are as expected;
    # otherwise it exits and `run -d` fails with its log.
    check = 'test -f /a/marker && test -f /b/marker && test "$PWD" = /workflow/app'
    path = write_service(
        tmp_path,
        "mounts",
        test_image,
        [
            f"{check} || {{ echo mounts: a=$(ls /a) b=$(ls /b) pwd=$PWD; exit 3; }}",
            "exec httpd -f -p 8000 -h /www",
        ],
        extra=f"volumes: ['{shared}:/a', '{shared}:/b:ro']\nworking_dir: app\n",
    )
    started = cli(capsys, "run", "-d", path, "--timeout", "60s")
    assert started.code == 0, started.err
    assert cli(capsys, "stop", "mounts", "-y").code == 0
