"""Before the first Hugging Face Hub lookup: can the Hub be reached at all? Where it cannot, the local cache only.

huggingface_hub retries a request that cannot connect five times, 1+2+4+8+8 s apart: an offline run that named
a model, tokenizer or dataset the cache lacks (a mistyped path, an earlier stage's output not made yet) waited
~25 s per file, printing a dozen retry warnings, before rlhf's one-line error. `cache_only_if_unreachable` opens
one connection to the Hub first (3 s at most) and, where none opens, turns on the libraries' offline mode, as
HF_HUB_OFFLINE=1 does: what is cached still loads, anything else fails at once.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from urllib.parse import urlparse

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
# with a proxy the Hub is reached through it, and a direct connection proves nothing: no probe then
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def reachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `endpoint` (a URL) opens within `timeout` seconds."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:  # the name does not resolve, the connection is refused or times out
        return False


@functools.cache
def cache_only_if_unreachable() -> bool:
    """Once per process, before the first Hub lookup; True where the libraries now use their caches only."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return bool(hub.HF_HUB_OFFLINE)
    if reachable(hub.ENDPOINT):
        return False
    import datasets.config

    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True  # both read theirs at each lookup
    os.environ["HF_HUB_OFFLINE"] = "1"  # and the processes this one starts
    log.info("the Hugging Face Hub (%s) cannot be reached from here: models and datasets load from the local "
             "cache only (HF_HUB_OFFLINE=1)", hub.ENDPOINT)
    return True


def before_lookup(name: str) -> None:
    """Call before a library resolves `name`: one that is not a local path may be looked up on the Hub."""
    if not os.path.exists(name):
        cache_only_if_unreachable()
