"""rlhf_cli/hub.py: where the Hugging Face Hub cannot be reached, the libraries use their caches only, so a
name the cache lacks fails at once instead of after ~25 s of retries per file; where it can (or a proxy
decides), nothing changes."""

import logging
import os
import socket

import datasets.config
import huggingface_hub.constants
import pytest

from rlhf_cli import hub
from rlhf_cli.errors import UserError
from rlhf_cli.models.loading import load_model


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def online(monkeypatch):
    """The process as a user's starts: not offline, no proxy, the probe not yet made (tests/conftest.py sets
    HF_HUB_OFFLINE for the suite); `endpoint(url)` points the Hub elsewhere."""
    for name in ("HF_HUB_OFFLINE", *hub.PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    hub.cache_only_if_unreachable.cache_clear()
    yield lambda url: monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    hub.cache_only_if_unreachable.cache_clear()


def test_reachable_means_a_connection_opens():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub.reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    assert not hub.reachable(f"http://127.0.0.1:{closed_port()}")
    assert not hub.reachable("https://hub.invalid")  # a name that never resolves (RFC 2606)


def test_an_unreachable_hub_turns_the_libraries_offline_once(online, caplog):
    online(f"http://127.0.0.1:{closed_port()}")
    with caplog.at_level(logging.INFO, logger="rlhf_cli.hub"):
        assert hub.cache_only_if_unreachable() is True
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # processes started from here inherit it
    assert "cannot be reached from here" in caplog.text and "local cache only" in caplog.text


def test_a_name_the_cache_lacks_then_fails_at_once_with_the_one_line_error(online):
    online(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(UserError, match=r"'someone/missing-model' is neither a local folder nor reachable"):
        load_model("someone/missing-model", task="causal-lm")
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # the lookup was made offline: no retries


def test_a_reachable_hub_changes_nothing(online):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        online(f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.cache_only_if_unreachable() is False
    assert not huggingface_hub.constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ


def test_behind_a_proxy_there_is_no_probe(online, monkeypatch):
    online(f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("probed although a proxy decides"))
    assert hub.cache_only_if_unreachable() is False
    assert not huggingface_hub.constants.HF_HUB_OFFLINE


def test_local_paths_never_probe(online, monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("probed for a local path"))
    hub.before_lookup(str(tmp_path))
