"""ClientSettings: the one place a client (SDK, CLI, worker runner) resolves where the broker is."""

from __future__ import annotations

import pytest

from transport.backoff import backoff_delay
from transport.client_settings import ClientSettings, ClientSettingsError

ENV = {"TQ_BROKER__HOST": "env-host", "TQ_BROKER__PORT": "7001", "TQ_API_KEY": "env-key", "TQ_TLS_CA": "/env/ca.pem"}


def test_nothing_set_means_loopback_6379_without_key_or_tls() -> None:
    s = ClientSettings.resolve(env={})
    assert (s.host, s.port, s.api_key, s.tls, s.ca_file) == ("127.0.0.1", 6379, None, False, None)


def test_explicit_values_win_over_the_environment_and_the_config() -> None:
    s = ClientSettings.resolve("flag-host", 7002, "flag-key", ca_file="/flag/ca.pem", env=ENV,
                               config_host="cfg-host", config_port=7003)
    assert (s.host, s.port, s.api_key, s.ca_file, s.tls) == ("flag-host", 7002, "flag-key", "/flag/ca.pem", True)


def test_the_environment_wins_over_the_config() -> None:
    s = ClientSettings.resolve(env=ENV, config_host="cfg-host", config_port=7003)
    assert (s.host, s.port, s.api_key, s.ca_file, s.tls) == ("env-host", 7001, "env-key", "/env/ca.pem", True)


def test_the_config_wins_over_the_defaults() -> None:
    s = ClientSettings.resolve(env={}, config_host="cfg-host", config_port=7003)
    assert (s.host, s.port) == ("cfg-host", 7003)


@pytest.mark.parametrize("listen_all", ["0.0.0.0", "::", ""])
def test_a_listen_on_all_address_is_dialed_as_loopback_from_any_layer(listen_all: str) -> None:
    assert ClientSettings.resolve(env={}, config_host=listen_all).host == "127.0.0.1"
    assert ClientSettings.resolve(env={"TQ_BROKER__HOST": listen_all}).host == "127.0.0.1"
    assert ClientSettings.resolve(listen_all or "0.0.0.0", env={}).host == "127.0.0.1"


def test_tls_is_on_when_asked_for_even_without_a_ca_file() -> None:
    s = ClientSettings.resolve(tls=True, env={})
    assert (s.tls, s.ca_file) == (True, None)


def test_an_empty_api_key_in_the_environment_means_no_key() -> None:
    assert ClientSettings.resolve(env={"TQ_API_KEY": ""}).api_key is None


@pytest.mark.parametrize(("env", "port", "named"), [
    ({"TQ_BROKER__PORT": "http"}, None, "TQ_BROKER__PORT"),
    ({"TQ_BROKER__PORT": "70000"}, None, "TQ_BROKER__PORT"),
    ({}, 0, r"port \(--port\)"),
])
def test_a_bad_port_is_refused_naming_where_it_came_from(env: dict[str, str], port: int | None, named: str) -> None:
    with pytest.raises(ClientSettingsError, match=f"{named} must be a port number 1-65535"):
        ClientSettings.resolve(port=port, env=env)


def test_the_api_key_never_appears_in_the_repr() -> None:
    s = ClientSettings.resolve(env=ENV)
    assert "env-key" not in repr(s) and "env-host" in repr(s)


def test_the_client_it_builds_carries_every_setting() -> None:
    client = ClientSettings.resolve(env=ENV).client(connect=False, client_name="t")
    assert (client.host, client.port, client.api_key, client.tls, client.ca_file, client.client_name) == (
        "env-host", 7001, "env-key", True, "/env/ca.pem", "t")


# ---------------------------------------------------------------- the shared backoff


def test_backoff_doubles_from_the_first_wait_up_to_the_cap() -> None:
    assert [backoff_delay(n, 0.1, 1.0) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_backoff_treats_attempts_below_one_as_the_first_and_never_overflows() -> None:
    assert backoff_delay(0, 1000, 300_000) == 1000
    assert backoff_delay(10_000, 1000, 300_000) == 300_000
