"""Who may use a server (issue 17): an API key is required to listen beyond the loopback,
unless --insecure says so on purpose; the key comes from the config, --api-key or
$LEAPFROG_API_KEY."""

from __future__ import annotations

import pytest

from configs.schema import ConfigError, LeapfrogConfig, ServerConfig
from runtime.cli import main
from runtime.serving.servers import secure


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch):
    monkeypatch.delenv("LEAPFROG_API_KEY", raising=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.org"])
def test_listening_beyond_the_loopback_needs_a_key(host, monkeypatch):
    with pytest.raises(ConfigError, match="needs an API key"):
        secure(LeapfrogConfig(server=ServerConfig(host=host)))
    assert secure(LeapfrogConfig(server=ServerConfig(host=host, insecure=True))).server.api_key == ""
    assert secure(LeapfrogConfig(server=ServerConfig(host=host, api_key="k"))).server.api_key == "k"
    monkeypatch.setenv("LEAPFROG_API_KEY", "from-env")
    assert secure(LeapfrogConfig(server=ServerConfig(host=host))).server.api_key == "from-env"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_the_loopback_needs_none(host):
    assert secure(LeapfrogConfig(server=ServerConfig(host=host))).server.api_key == ""


def test_serve_refuses_an_open_host_before_loading_the_model(capsys):
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "needs an API key" in capsys.readouterr().err
