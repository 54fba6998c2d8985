"""Settings of the REST API: the removed gRPC port and the read-only keys."""

from __future__ import annotations

import pytest

from config.settings import ConfigError, load_settings, settings_summary


def test_a_config_that_still_sets_grpc_port_is_told_what_replaces_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"TQ_API__GRPC_PORT": "9090"})
    assert caught.value.key == "api.grpc_port"
    assert "REST API on api.rest_port" in str(caught.value) and "TQ_API__GRPC_PORT" in str(caught.value)


def test_read_only_keys_are_counted_not_shown_in_the_startup_summary() -> None:
    settings = load_settings(env={"TQ_AUTH__READ_ONLY_API_KEYS": "reader-secret,other"})
    assert settings.auth.read_only_api_keys == ("reader-secret", "other")
    assert settings_summary(settings)["auth"]["read_only_api_keys"] == 2


def test_a_malformed_sha256_read_only_key_names_its_setting() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"TQ_AUTH__READ_ONLY_API_KEYS": "sha256:abc"})
    assert caught.value.key == "auth.read_only_api_keys"
