"""HTTP sessions for every client: keep-alive pools and a CA bundle that really applies."""

from __future__ import annotations

from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

# Connections kept per host; a worker with 100 threads shares one session per client.
DEFAULT_POOL_SIZE = 32


def make_session(ca_bundle: Path | None = None, *, pool_size: int = DEFAULT_POOL_SIZE) -> requests.Session:
    """A ``requests.Session`` for one client.

    With ``ca_bundle`` set, ``trust_env`` is turned off: requests otherwise lets
    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` from the environment override
    ``Session.verify``, and the configured bundle would silently not be used.
    (Proxy variables are then ignored too, which the loopback sandbox wants.)
    """
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    if ca_bundle is not None:
        session.trust_env = False
        session.verify = str(ca_bundle)
    return session
