"""Settings read once from the ``OTEL_CANCEL_*`` environment, validated at start-up."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from .. import environment_variables as env
from ..exceptions import ConfigurationError
from ..store import DEFAULT_PREFIX, DEFAULT_TTL_SECONDS, CancelStore
from ..store._endpoints import parse_endpoint
from ..store._keys import validate_prefix
from .identity import default_instance

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{name} must be true or false, got {raw!r}")


def _number(environ: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigurationError(f"{name} must be between {low:g} and {high:g}, got {raw!r}")
    return value


def _text(environ: Mapping[str, str], name: str) -> str | None:
    """The value of ``name`` (``None`` when unset or empty), refused when it is not valid UTF-8."""
    raw = environ.get(name) or None
    if raw is not None:
        try:
            # POSIX hands undecodable bytes over as lone surrogates; etcd and gRPC
            # would fail on them at the first call, long after start-up.
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigurationError(f"{name} must be valid UTF-8 text, got {raw!r}") from None
    return raw


def _choice(environ: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = environ.get(name, default).strip().lower() or default
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def startup_wait_for(timeout_seconds: float) -> float:
    """The default start-up wait for an etcd deadline of ``timeout_seconds``.

    A fresh process whose first endpoint hangs gives up on it after one deadline and
    lists through the next endpoint within another: the first scopes wait for both
    (and a second more) before they fail open, so a replica that never served still
    refuses a late hop.
    """
    return 2 * timeout_seconds + 1.0


def parse_label_headers(raw: str) -> tuple[tuple[str, str], ...]:
    """Parse ``header=label`` pairs (``OTEL_CANCEL_LABEL_HEADERS``).

    Raises:
        ConfigurationError: a pair is not ``header=label`` or the label key is not allowed.
    """
    if not raw.strip():
        return ()  # the usual case, without loading labels (and OpenTelemetry with them)
    from ..exceptions import InvalidLabelError
    from .labels import validate_label

    pairs = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        header, sep, label = (text.strip() for text in item.partition("="))
        try:
            if not sep or not header or not header.isascii():
                raise InvalidLabelError(f"{item!r} is not header=label")
            validate_label(label, "x")
        except InvalidLabelError as error:
            raise ConfigurationError(f"{env.OTEL_CANCEL_LABEL_HEADERS}: {error}") from None
        pairs.append((header.lower(), label))
    return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process talks to the cancel store and treats incoming requests.

    Build with :meth:`from_environment`; every field can be overridden there.
    """

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = DEFAULT_PREFIX
    ttl_seconds: int = DEFAULT_TTL_SECONDS
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout_seconds: float = 2.0
    trust_incoming: bool = False
    on_disconnect: str = "cancel"
    startup_wait_seconds: float = 5.0
    """See ``OTEL_CANCEL_STARTUP_WAIT_SECONDS``: by default :func:`startup_wait_for` the etcd deadline."""
    watchdog_seconds: float = 5.0
    unlisted: str = "run"
    """See ``OTEL_CANCEL_UNLISTED``: ``run`` or ``refuse`` work entered before the first listing."""
    signing_key: bytes | None = dataclasses.field(default=None, repr=False)
    service: str = "unknown_service"
    instance: str = ""
    store: str = "etcd"
    live_interval_ms: float = 250.0
    live_ttl_seconds: int = 10
    label_headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read the settings from ``environ`` (default ``os.environ``); ``overrides`` win.

        Raises:
            ConfigurationError: a value is invalid; the message names the variable.
        """
        environ = os.environ if environ is None else environ
        endpoints = tuple(
            e.strip() for e in environ.get(env.OTEL_CANCEL_ETCD_ENDPOINTS, "127.0.0.1:2379").split(",") if e.strip()
        )
        if not endpoints:
            raise ConfigurationError(f"{env.OTEL_CANCEL_ETCD_ENDPOINTS} is empty; give at least one host:port")
        signing_key: bytes | None = None
        if raw_key := environ.get(env.OTEL_CANCEL_SIGNING_KEY):
            try:
                # The key's bytes as the environment holds them (undecodable bytes included).
                signing_key = raw_key.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raise ConfigurationError(f"{env.OTEL_CANCEL_SIGNING_KEY} cannot be read as bytes") from None
        values: dict[str, object] = {
            "endpoints": endpoints,
            "prefix": environ.get(env.OTEL_CANCEL_PREFIX, DEFAULT_PREFIX) or DEFAULT_PREFIX,
            "ttl_seconds": int(_number(environ, env.OTEL_CANCEL_TTL_SECONDS, DEFAULT_TTL_SECONDS, 1, 7 * 86400)),
            "username": _text(environ, env.OTEL_CANCEL_ETCD_USERNAME),
            "password": _text(environ, env.OTEL_CANCEL_ETCD_PASSWORD),
            "ca_cert": environ.get(env.OTEL_CANCEL_ETCD_CA_CERT) or None,
            "cert": environ.get(env.OTEL_CANCEL_ETCD_CERT) or None,
            "key": environ.get(env.OTEL_CANCEL_ETCD_KEY) or None,
            "timeout_seconds": _number(environ, env.OTEL_CANCEL_ETCD_TIMEOUT_SECONDS, 2.0, 0.05, 60),
            "trust_incoming": _flag(environ, env.OTEL_CANCEL_TRUST_INCOMING, False),
            "on_disconnect": _choice(environ, env.OTEL_CANCEL_ON_DISCONNECT, "cancel", ("cancel", "continue")),
            "startup_wait_seconds": _number(environ, env.OTEL_CANCEL_STARTUP_WAIT_SECONDS, -1.0, 0, 60),
            "watchdog_seconds": _number(environ, env.OTEL_CANCEL_WATCHDOG_SECONDS, 5.0, 0.1, 3600),
            "unlisted": _choice(environ, env.OTEL_CANCEL_UNLISTED, "run", ("run", "refuse")),
            "signing_key": signing_key,
            "service": environ.get("OTEL_SERVICE_NAME") or "unknown_service",
            "instance": environ.get(env.OTEL_CANCEL_INSTANCE) or default_instance(environ),
            "store": _choice(environ, env.OTEL_CANCEL_STORE, "etcd", ("etcd", "memory")),
            "live_interval_ms": _number(environ, env.OTEL_CANCEL_LIVE_INTERVAL_MS, 250.0, 10, 60_000),
            "live_ttl_seconds": int(_number(environ, env.OTEL_CANCEL_LIVE_TTL_SECONDS, 10, 2, 3600)),
            "label_headers": parse_label_headers(environ.get(env.OTEL_CANCEL_LABEL_HEADERS, "")),
        }
        values.update(overrides)
        if values["startup_wait_seconds"] == -1.0:  # not set: follows the etcd deadline
            values["startup_wait_seconds"] = startup_wait_for(float(values["timeout_seconds"]))  # type: ignore[arg-type]
        settings = cls(**values)  # type: ignore[arg-type]
        validate_prefix(settings.prefix)
        if settings.store == "etcd":
            for endpoint in settings.endpoints:
                # Now, not when the watcher first connects on its own thread: fail fast.
                parse_endpoint(endpoint)
            # The TLS files too: a wrong one would otherwise surface as "etcd unavailable".
            from ..store._tls import read_tls_files

            read_tls_files(settings.ca_cert, settings.cert, settings.key)
        return settings

    def create_store(self) -> CancelStore:
        """A new store for these settings (etcd unless ``store='memory'``)."""
        if self.store == "memory":
            from ..store.memory import MemoryCancelStore

            return MemoryCancelStore(self.prefix)
        from ..store.etcd import EtcdCancelStore

        return EtcdCancelStore(self.endpoints, **self.etcd_options())

    def etcd_options(self) -> dict[str, Any]:
        """The keyword arguments of an etcd client for these settings (the gRPC store and the CLI's gateway client)."""
        return {
            "prefix": self.prefix,
            "timeout": self.timeout_seconds,
            "username": self.username,
            "password": self.password,
            "ca_cert": self.ca_cert,
            "cert": self.cert,
            "key": self.key,
        }
