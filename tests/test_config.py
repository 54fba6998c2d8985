"""Tests for config.settings: layering, precedence, and one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from config.settings import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Settings,
    _validation_error,
    load_settings,
    settings_summary,
)


def write_config(tmp_path: Path, text: str) -> Path:
    """A config file in the test's own directory, so tests never share state."""
    path = tmp_path / "tq.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(**kwargs: object) -> ConfigError:
    """Load with an empty environment unless given one, and return the ConfigError it must raise."""
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    return info.value


def test_defaults_load_without_a_file_or_environment() -> None:
    settings = load_settings(env={})
    assert settings.broker.port == 6379
    assert settings.persistence.fsync == "interval"
    assert settings.auth.api_keys == ()
    assert settings.monitoring.prometheus_port == 9091


def test_struct_defaults_equal_the_decoded_default_yaml() -> None:
    decoded = msgspec.yaml.decode(DEFAULT_CONFIG_PATH.read_bytes(), type=Settings)
    assert Settings() == decoded
    assert load_settings(env={}) == Settings()


def test_default_yaml_names_every_setting_so_no_default_lives_only_in_code() -> None:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    expected = msgspec.to_builtins(Settings())
    assert set(raw) == set(expected)
    for section, values in expected.items():
        assert set(raw[section]) == set(values), section


def test_a_partial_config_file_is_deep_merged_over_the_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, "broker:\n  port: 7000\npersistence:\n  data_dir: /srv/tq\n")
    settings = load_settings(path, env={})
    assert settings.broker.port == 7000
    assert settings.broker.host == "0.0.0.0"
    assert settings.persistence.data_dir == "/srv/tq"
    assert settings.persistence.fsync == "interval"


def test_an_empty_config_file_means_all_defaults(tmp_path: Path) -> None:
    assert load_settings(write_config(tmp_path, "# nothing\n"), env={}) == Settings()


@pytest.mark.parametrize("keys", ["a,b", " a , b ", '["a", "b"]', "[a, b]"])
def test_environment_overrides_ints_bools_and_lists(keys: str) -> None:
    env = {
        "TQ_BROKER__PORT": "7000",
        "TQ_AUTH__ENABLED": "true",
        "TQ_AUTH__API_KEYS": keys,
        "TQ_API__TLS_CERT_PATH": "null",
        "TQ_BROKER__LEASE_CHECK_INTERVAL_SECS": "0.5",
    }
    settings = load_settings(env=env)
    assert settings.broker.port == 7000
    assert settings.auth.enabled is True
    assert settings.auth.api_keys == ("a", "b")
    assert settings.api.tls_cert_path is None
    assert settings.broker.lease_check_interval_secs == 0.5


def test_environment_strings_keep_their_text_for_string_keys() -> None:
    env = {"TQ_RAFT__NODE_ID": "123", "TQ_PERSISTENCE__DATA_DIR": "/tmp/x", "TQ_AUTH__API_KEYS": "007"}
    settings = load_settings(env=env)
    assert settings.raft.node_id == "123"
    assert settings.persistence.data_dir == "/tmp/x"
    assert settings.auth.api_keys == ("007",)


def test_client_tq_variables_without_a_section_are_ignored() -> None:
    env = {"TQ_API_KEY": "secret", "TQ_TLS_CA": "/ca.pem", "HOME": "/root"}
    assert load_settings(env=env) == Settings()


def test_os_environ_is_read_when_env_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TQ_WORKER__CONCURRENCY", "9")
    assert load_settings().worker.concurrency == 9


def test_precedence_rises_from_file_to_environment_to_overrides(tmp_path: Path) -> None:
    path = write_config(tmp_path, "broker:\n  port: 7001\n  host: 127.0.0.1\n  max_batch_claim: 5\n")
    env = {"TQ_BROKER__PORT": "7002", "TQ_BROKER__HOST": "10.0.0.1"}
    settings = load_settings(path, env=env, overrides={"broker.port": 7003})
    assert settings.broker.max_batch_claim == 5  # file only
    assert settings.broker.host == "10.0.0.1"  # env beats file
    assert settings.broker.port == 7003  # overrides beat env


def test_none_overrides_mean_not_given() -> None:
    settings = load_settings(env={"TQ_BROKER__PORT": "7002"}, overrides={"broker.port": None})
    assert settings.broker.port == 7002


def test_unknown_key_in_the_file_names_the_dotted_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "broker:\n  prot: 7000\n")
    error = config_error(config_file=path)
    assert "unknown config key broker.prot" in str(error)
    assert str(path) in str(error)
    assert error.key == "broker.prot"


def test_unknown_section_in_the_file_is_named(tmp_path: Path) -> None:
    assert "borker" in str(config_error(config_file=write_config(tmp_path, "borker:\n  port: 1\n")))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("TQ_BROKER__PROT", "unknown config key broker.prot"),
        ("TQ_BORKER__PORT", "unknown config section borker"),
    ],
)
def test_unknown_environment_section_or_key_names_the_variable(name: str, expected: str) -> None:
    message = str(config_error(env={name: "1"}))
    assert expected in message
    assert name in message


def test_unknown_or_malformed_override_keys_are_errors() -> None:
    assert "broker.prot" in str(config_error(overrides={"broker.prot": 1}))
    assert "section.key" in str(config_error(overrides={"port": 1}))


def test_wrong_type_names_the_path_and_the_file_it_came_from(tmp_path: Path) -> None:
    path = write_config(tmp_path, "broker:\n  port: seven\n")
    message = str(config_error(config_file=path))
    assert "Expected int, got str" in message
    assert "$.broker.port" in message
    assert str(path) in message


def test_wrong_type_from_the_environment_names_the_variable() -> None:
    message = str(config_error(env={"TQ_BROKER__PORT": "seven"}))
    assert message == "bad config value: Expected int, got str - at $.broker.port (from TQ_BROKER__PORT)"


def test_a_section_that_is_not_a_mapping_is_reported(tmp_path: Path) -> None:
    message = str(config_error(config_file=write_config(tmp_path, "broker: 5\n")))
    assert "$.broker" in message and "tq.yaml" in message


def test_msgspec_unknown_field_messages_are_rewritten_to_dotted_keys() -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert({"broker": {"prot": 1}}, Settings)
    assert str(_validation_error(info.value, {})) == "unknown config key broker.prot"


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    assert str(config_error(config_file=missing)) == f"config file not found: {missing}"


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "broker:\n  port: 1\n  host: [unclosed\n")
    message = str(config_error(config_file=path))
    assert str(path) in message
    assert "line 4" in message


def test_a_file_that_is_not_a_mapping_is_reported(tmp_path: Path) -> None:
    assert "mapping" in str(config_error(config_file=write_config(tmp_path, "- a\n- b\n")))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("broker.port", -1, "Expected int >= 0 - at $.broker.port"),
        ("broker.port", 65536, "Expected int <= 65535 - at $.broker.port"),
        ("broker.max_frame_bytes", 100, "$.broker.max_frame_bytes"),
        ("broker.lease_check_interval_secs", 0, "$.broker.lease_check_interval_secs"),
        ("persistence.fsync", "sometimes", "$.persistence.fsync"),
        ("broker.max_pending_bytes", 0, "$.broker.max_pending_bytes"),
        ("broker.max_inflight_frame_bytes", 10, "$.broker.max_inflight_frame_bytes"),
        ("broker.frame_timeout_secs", 0, "$.broker.frame_timeout_secs"),
        ("persistence.dead_set_max", -1, "$.persistence.dead_set_max"),
        ("persistence.dead_set_retention_days", -1, "$.persistence.dead_set_retention_days"),
        ("persistence.recent_results_bytes", -1, "$.persistence.recent_results_bytes"),
        ("api.rest_port", 70000, "$.api.rest_port"),
        ("api.rest_host", "", "$.api.rest_host"),
        ("api.max_queries_per_connection", 0, "$.api.max_queries_per_connection"),
        ("api.max_concurrent_queries", 0, "$.api.max_concurrent_queries"),
        ("auth.read_only_api_keys", [""], "$.auth.read_only_api_keys"),
        ("auth.hello_timeout_secs", 0, "$.auth.hello_timeout_secs"),
        ("auth.max_hello_bytes", 10, "$.auth.max_hello_bytes"),
        ("monitoring.max_queue_labels", 0, "$.monitoring.max_queue_labels"),
    ],
)
def test_values_out_of_range_are_rejected(key: str, value: object, expected: str) -> None:
    assert expected in str(config_error(overrides={key: value}))


@given(st.integers(min_value=0, max_value=65535))
def test_any_valid_port_round_trips_through_the_environment(port: int) -> None:
    assert load_settings(env={"TQ_MONITORING__PROMETHEUS_PORT": str(port)}).monitoring.prometheus_port == port


def test_log_level_is_accepted_in_any_case() -> None:
    assert load_settings(env={"TQ_MONITORING__LOG_LEVEL": "WARNING"}).monitoring.log_level == "warning"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"broker.retry_backoff_base_ms": 5000, "broker.retry_backoff_max_ms": 10}, "retry_backoff_max_ms"),
        ({"api.enable_tls": True}, "api.tls_cert_path"),
        ({"auth.enabled": True}, "auth.api_keys is empty"),
    ],
)
def test_rules_spanning_two_keys_are_checked(overrides: dict[str, object], expected: str) -> None:
    assert expected in str(config_error(overrides=overrides))


def test_settings_are_frozen_so_actors_can_share_them() -> None:
    settings = load_settings(env={})
    with pytest.raises(AttributeError):
        settings.broker.port = 1  # type: ignore[misc]


def test_summary_hides_api_keys_but_keeps_everything_else() -> None:
    settings = load_settings(env={"TQ_AUTH__ENABLED": "true", "TQ_AUTH__API_KEYS": "s3cret-1,s3cret-2"})
    summary = settings_summary(settings)
    assert summary["auth"]["api_keys"] == 2
    assert "s3cret" not in repr(summary)
    assert summary["broker"]["port"] == 6379
    assert settings.auth.api_keys == ("s3cret-1", "s3cret-2")
