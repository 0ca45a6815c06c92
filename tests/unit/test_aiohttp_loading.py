"""aiohttp imported for the agent: no CA certificates loaded for its unused TLS client contexts
(they fail closed), and ssl left as it was for everything else."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys

CHECK = """
import json, ssl
from dstackctl.aiohttp_loading import load_aiohttp
load_aiohttp()
load_aiohttp()  # a second call does nothing
import aiohttp.connector as connector
verified = connector._SSL_CONTEXT_VERIFIED
after = ssl.create_default_context()
print(json.dumps({
    "verified_cas": verified.cert_store_stats()["x509_ca"],
    "verifies": verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname,
    "default_cas_after": after.cert_store_stats()["x509_ca"],
    "paths_restored": "set_default_verify_paths" not in vars(ssl.SSLContext),
}))
"""


def test_aiohttp_contexts_load_no_certificates_and_ssl_is_restored() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=60
    )
    seen = json.loads(done.stdout)
    assert seen["verified_cas"] == 0
    assert seen["verifies"] is True  # used for TLS, it would refuse every server: fail closed
    assert seen["paths_restored"] is True
    assert seen["default_cas_after"] == ssl.create_default_context().cert_store_stats()["x509_ca"]
