"""Typed broker settings, layered from default.yaml, a config file, TQ_* env vars and overrides.

Why this shape: every consumer gets one frozen, validated `Settings` object (frozen because actors share
it without copying), and every error a user can make is reported on one line naming the dotted key and
where the bad value came from, instead of surfacing later as an obscure crash in some actor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

__all__ = [
    "ApiSettings",
    "AuthSettings",
    "BrokerSettings",
    "ConfigError",
    "MonitoringSettings",
    "PersistenceSettings",
    "RaftSettings",
    "Settings",
    "WorkerSettings",
    "load_settings",
    "settings_summary",
]

DEFAULT_CONFIG_PATH = Path(__file__).parent / "default.yaml"
ENV_PREFIX = "TQ_"

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]  # 0 = let the OS pick (tests) or "disabled"
PosInt = Annotated[int, msgspec.Meta(ge=1)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Base of every section: a typo'd key must fail loudly, and shared settings must not be mutated."""


class BrokerSettings(_Section):
    host: NonEmptyStr = "0.0.0.0"
    port: Port = 6379
    max_connections: PosInt = 1000
    queue_depth_threshold: PosInt = 100000
    max_pending_bytes: PosInt = 1073741824  # payload bytes of live tasks; past it SUBMIT gets QUEUE_FULL
    worker_lease_timeout_secs: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 30  # lease_ms ≤ 86,400,000
    max_batch_claim: PosInt = 10
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=1024, le=2**32 - 1)] = 16777216  # u32 length field
    connection_timeout_secs: PosInt = 30
    # bytes of partially received frames held at once, all connections together (a frame's header reserves
    # its length); must hold one frame of max_frame_bytes
    max_inflight_frame_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 268435456
    frame_timeout_secs: PosFloat = 30.0  # a frame whose first byte arrived must be complete within this
    default_max_retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3  # TaskSpec.max_retries range
    retry_backoff_base_ms: PosInt = 1000
    retry_backoff_max_ms: PosInt = 300000
    lease_check_interval_secs: PosFloat = 10.0
    maintenance_interval_secs: PosFloat = 15.0


class PersistenceSettings(_Section):
    data_dir: NonEmptyStr = "./data"
    fsync: Literal["interval", "always"] = "interval"
    wal_sync_interval_ms: PosInt = 100
    completed_task_retention_days: NonNegFloat = 7.0
    auto_compact: bool = True
    compact_interval_secs: PosFloat = 3600.0
    snapshot_interval_secs: PosFloat = 60.0
    wal_segment_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 67108864
    dead_set_max: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 10_000  # failed-for-good tasks kept; 0 = none
    dead_set_retention_days: NonNegFloat = 7.0  # dead tasks older than this fall out of the dead set
    recent_results_bytes: Annotated[int, msgspec.Meta(ge=0)] = 64 << 20  # finished tasks kept in memory for STATUS


class RaftSettings(_Section):
    enabled: bool = False
    node_id: NonEmptyStr = "node1"
    peers: tuple[NonEmptyStr, ...] = ()  # a tuple, not a list, so the frozen Struct is really immutable
    election_timeout_ms: PosInt = 1000
    heartbeat_interval_ms: PosInt = 300
    snapshot_interval_secs: PosInt = 300


class ApiSettings(_Section):
    rest_port: Port = 8080  # 0 turns the REST API and dashboard off
    rest_host: NonEmptyStr = "0.0.0.0"
    enable_tls: bool = False
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    query_timeout_secs: PosFloat = 30.0
    max_queries_per_connection: PosInt = 2  # QUERYs in flight on one connection; more get QUEUE_FULL
    max_concurrent_queries: PosInt = 2  # QUERYs running in the database at once (it has two reader threads)


class AuthSettings(_Section):
    enabled: bool = False
    api_keys: tuple[NonEmptyStr, ...] = ()
    allow_unauthenticated_remote: bool = False
    read_only_api_keys: tuple[NonEmptyStr, ...] = ()  # REST API and dashboard only; GET and query
    hello_timeout_secs: PosFloat = 5.0  # with auth on, a connection not authenticated by then is closed
    max_hello_bytes: Annotated[int, msgspec.Meta(ge=64, le=1048576)] = 1024  # first-frame limit with auth on


class MonitoringSettings(_Section):
    prometheus_port: Port = 9091  # 0 disables the metrics HTTP server
    prometheus_host: NonEmptyStr = "0.0.0.0"
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    json_logging: bool = True
    max_queue_labels: PosInt = 1000  # distinct queue label values in /metrics; more count as queue="_other"


class WorkerSettings(_Section):
    concurrency: PosInt = 4
    heartbeat_interval_secs: PosFloat = 15.0
    graceful_shutdown_timeout_secs: NonNegFloat = 60.0
    max_inactivity_secs: PosFloat = 60.0


class Settings(_Section):
    """The whole configuration; `Settings()` equals default.yaml (tests enforce it)."""

    broker: BrokerSettings = msgspec.field(default_factory=BrokerSettings)
    persistence: PersistenceSettings = msgspec.field(default_factory=PersistenceSettings)
    raft: RaftSettings = msgspec.field(default_factory=RaftSettings)
    api: ApiSettings = msgspec.field(default_factory=ApiSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    monitoring: MonitoringSettings = msgspec.field(default_factory=MonitoringSettings)
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)


class ConfigError(Exception):
    """A configuration problem, as one line naming the key (when known) and what is wrong with it."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(" ".join(message.splitlines()))
        self.key = key


def _field_types() -> dict[str, dict[str, msgspec.inspect.Type]]:
    """Section -> key -> type, so env strings can be parsed per type and unknown keys named early."""
    root = msgspec.inspect.type_info(Settings)
    assert isinstance(root, msgspec.inspect.StructType)
    out: dict[str, dict[str, msgspec.inspect.Type]] = {}
    for section in root.fields:
        assert isinstance(section.type, msgspec.inspect.StructType)
        out[section.name] = {f.name: f.type for f in section.type.fields}
    return out


_TYPES = _field_types()
_LIST_TYPES = (msgspec.inspect.ListType, msgspec.inspect.VarTupleType)


def _accepts(t: msgspec.inspect.Type, kind: type[msgspec.inspect.Type]) -> bool:
    """Whether a field's type is `kind` or a union containing it (e.g. `str | None` accepts StrType)."""
    if isinstance(t, msgspec.inspect.UnionType):
        return any(isinstance(member, kind) for member in t.types)
    return isinstance(t, kind)


# Keys that once existed: a config still setting one is told what replaces it.
REMOVED_KEYS = {
    "api.grpc_port": "api.grpc_port was removed: tqbroker serves no gRPC; other languages use the REST API on "
                     "api.rest_port, fast clients the TCP protocol on broker.port; delete the key",
}


def _check_known(layer: Mapping[str, Any], origin: str) -> None:
    """Reject unknown sections/keys up front, naming the dotted key and the layer it came from."""
    for section, values in layer.items():
        if section not in _TYPES:
            raise ConfigError(f"unknown config section {section} ({origin})", key=str(section))
        if isinstance(values, Mapping):
            for key in values:
                if key not in _TYPES[section]:
                    dotted = f"{section}.{key}"
                    if dotted in REMOVED_KEYS:
                        raise ConfigError(f"{REMOVED_KEYS[dotted]} ({origin})", key=dotted)
                    raise ConfigError(f"unknown config key {dotted} ({origin})", key=dotted)


def _read_yaml(path: Path) -> dict[str, Any]:
    """Parse one YAML mapping; an empty file is an empty layer, anything else is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        start = getattr(exc, "context_mark", None)
        if start is not None and mark is not None and start.line != mark.line:
            where += f" (in what starts at line {start.line + 1})"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _parse_env_value(raw: str, t: msgspec.inspect.Type) -> Any:
    """Turn one env string into a typed value: YAML scalars ("7000", "true", "null"), and for list keys
    a YAML list or comma-separated text; str keys keep the raw text when YAML would change its type."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(t, _LIST_TYPES):
        if isinstance(value, list):
            return value
        return [part.strip() for part in raw.split(",") if part.strip()]
    if _accepts(t, msgspec.inspect.StrType) and not isinstance(value, str):
        if value is None and _accepts(t, msgspec.inspect.NoneType):
            return None
        return raw
    return value


def _env_layer(env: Mapping[str, str], sources: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Collect TQ_<SECTION>__<KEY> vars; TQ_ names without `__` belong to clients and are skipped."""
    layer: dict[str, dict[str, Any]] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX) :]:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        _check_known({section: {key: None}}, f"from {name}")
        layer.setdefault(section, {})[key] = _parse_env_value(env[name], _TYPES[section][key])
        sources[f"{section}.{key}"] = name
    return layer


def _overrides_layer(overrides: Mapping[str, object], sources: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Dotted `section.key` overrides (command-line flags); None means the flag was not given."""
    layer: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, dot, key = dotted.partition(".")
        if not dot or "." in key:
            raise ConfigError(f"override key must look like section.key, got {dotted!r}", key=dotted)
        _check_known({section: {key: None}}, "from overrides")
        layer.setdefault(section, {})[key] = value
        sources[dotted] = f"override {dotted}"
    return layer


def _merge(base: dict[str, Any], layer: Mapping[str, Any], origin: str, sources: dict[str, str]) -> None:
    """Deep-merge one file layer into `base` in place (sections merge, values and lists replace),
    remembering which file set each key so a later validation error can name it."""
    for section, values in layer.items():
        if isinstance(values, Mapping) and isinstance(base.get(section), dict):
            base[section].update(values)
            sources.update({f"{section}.{key}": origin for key in values})
        else:
            base[section] = dict(values) if isinstance(values, Mapping) else values
            sources[section] = origin


_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `([^`]*)`(?: - at `\$\.?([^`]*)`)?")
_AT_PATH = re.compile(r"at `?\$\.([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_]+))?")


def _validation_error(exc: msgspec.ValidationError, sources: Mapping[str, str]) -> ConfigError:
    """Rewrite msgspec's message into ours, adding which layer the offending value came from."""
    message = str(exc)
    unknown = _UNKNOWN_FIELD.match(message)
    if unknown:
        unknown_key = ".".join(part for part in (unknown.group(2), unknown.group(1)) if part)
        return ConfigError(f"unknown config key {unknown_key}", key=unknown_key)
    at = _AT_PATH.search(message)
    dotted = ".".join(part for part in at.groups() if part) if at else None
    origin = sources.get(dotted or "") or sources.get(dotted.split(".")[0] if dotted else "")
    suffix = f" (from {origin})" if origin else ""
    return ConfigError(f"bad config value: {message.replace('`', '')}{suffix}", key=dotted)


def _check_consistency(settings: Settings) -> None:
    """Rules spanning two keys, which msgspec.Meta cannot express on a single field."""
    broker, api, auth = settings.broker, settings.api, settings.auth
    if broker.retry_backoff_max_ms < broker.retry_backoff_base_ms:
        key = "broker.retry_backoff_max_ms"
        raise ConfigError(f"{key} must be >= broker.retry_backoff_base_ms", key=key)
    if api.enable_tls and not (api.tls_cert_path and api.tls_key_path):
        raise ConfigError("api.enable_tls needs api.tls_cert_path and api.tls_key_path", key="api.enable_tls")
    if broker.max_inflight_frame_bytes < broker.max_frame_bytes + 4:
        key = "broker.max_inflight_frame_bytes"
        raise ConfigError(f"{key} must be >= broker.max_frame_bytes + 4, so one frame of the largest size fits",
                          key=key)
    if auth.enabled and not auth.api_keys:
        raise ConfigError("auth.enabled is true but auth.api_keys is empty", key="auth.api_keys")
    for name, entries in (("api_keys", auth.api_keys), ("read_only_api_keys", auth.read_only_api_keys)):
        _check_key_entries(name, entries)


def _check_key_entries(name: str, entries: tuple[str, ...]) -> None:
    for i, entry in enumerate(entries):
        if entry.lower().startswith("sha256:") and not re.fullmatch(r"[0-9a-fA-F]{64}", entry[7:]):
            raise ConfigError(f"auth.{name}[{i}] starts with sha256: but is not followed by 64 hex digits "
                              "(write the SHA-256 of the key, e.g. `printf %s KEY | sha256sum`)",
                              key=f"auth.{name}")


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Build Settings from, in rising precedence: default.yaml, `config_file`, TQ_* env, `overrides`.

    `env=None` reads os.environ; pass `{}` in tests to keep the caller's environment out.
    Raises ConfigError (one line, naming the key and its source) on any invalid input.
    """
    sources: dict[str, str] = {}
    merged: dict[str, Any] = {}
    layers = [(DEFAULT_CONFIG_PATH, _read_yaml(DEFAULT_CONFIG_PATH))]
    if config_file is not None:
        layers.append((Path(config_file), _read_yaml(Path(config_file))))
    for path, layer in layers:
        _check_known(layer, f"in {path}")
        _merge(merged, layer, str(path), sources)
    # Env and override keys are checked and recorded in `sources` per key as they are collected.
    _merge(merged, _env_layer(os.environ if env is None else env, sources), "", {})
    _merge(merged, _overrides_layer(overrides or {}, sources), "", {})

    monitoring = merged.get("monitoring")
    if isinstance(monitoring, dict) and isinstance(monitoring.get("log_level"), str):
        monitoring["log_level"] = monitoring["log_level"].strip().lower()
    try:
        settings = msgspec.convert(merged, Settings)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc, sources) from None
    _check_consistency(settings)
    return settings


def settings_summary(settings: Settings) -> dict[str, Any]:
    """Settings as plain builtins for startup logs, with auth.api_keys replaced by their count."""
    summary: dict[str, Any] = msgspec.to_builtins(settings)
    summary["auth"]["api_keys"] = len(settings.auth.api_keys)
    summary["auth"]["read_only_api_keys"] = len(settings.auth.read_only_api_keys)
    return summary
