"""Masking of env values in logs, and probe header values kept out of spec.json (issue 15,
item 6)."""

from __future__ import annotations

import pytest

from dstackctl.config.loader import parse_service
from dstackctl.deploy import Release, hide_probe_values
from dstackctl.kept_logs import masked, secret_masks


@pytest.mark.parametrize(
    ("env", "line", "shown"),
    [
        ({"HF_TOKEN": "hf_abcdef"}, b"token=hf_abcdef!", b"token=***!"),
        ({"PIN": "987"}, b"pin=987 of 1987", b"pin=*** of 1987"),
        ({"API_KEY": "42"}, b"key 42, page 142", b"key ***, page 142"),
        ({"WORKERS": "2"}, b"2 workers", b"2 workers"),  # not a secret's name: left alone
        ({"DB_PASSWORD": "pw1", "TOKEN": "pw12"}, b"pw1 pw12", b"*** ***"),
        ({"SECRET": ""}, b"nothing", b"nothing"),
    ],
)
def test_values_are_masked_and_short_ones_only_as_words_of_secret_names(
    env: dict[str, str], line: bytes, shown: bytes
) -> None:
    assert masked(line, secret_masks(env)) == shown


def test_masks_take_every_deployment_values() -> None:
    masks = secret_masks({"PIN": "111"}, {"PIN": "222"})
    assert masked(b"111 222", masks) == b"*** ***"


def test_literal_probe_header_values_leave_the_stored_config_for_the_env() -> None:
    text = (
        "type: service\nimage: busybox\nport: 8000\ncommands: [x]\nenv: [TOKEN]\n"
        "probes:\n  - type: http\n    url: /health\n    headers:\n      - {name: X-Key, value: k-123}\n"
        "      - {name: Authorization, value: 'Bearer ${{ env.TOKEN }}'}\n"
    )
    release = Release.of(parse_service(text), {"TOKEN": "t"})
    headers = release.config["probes"][0]["headers"]
    assert headers[0]["value"] == "${{ env.DSTACKCTL_PROBE_0_HEADER_0 }}"
    assert headers[1]["value"] == "Bearer ${{ env.TOKEN }}"  # the secret part is a reference already
    assert release.env == {"TOKEN": "t", "DSTACKCTL_PROBE_0_HEADER_0": "k-123"}
    assert "k-123" not in str(release.config)
    assert hide_probe_values({"probes": [{"url": "/"}]}) == {}
