"""Parse etcd endpoints (``host:port``) and check a client's connection options, without importing the etcd client.

Settings validate ``OTEL_CANCEL_ETCD_ENDPOINTS`` with it at start-up; the etcd
store and the CLI's gateway client check their options with it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..exceptions import ConfigurationError

# Host names, IPv4 and (bracketed) IPv6 addresses, with an IPv6 zone (%eth0).
_HOST = re.compile(r"[A-Za-z0-9._%:-]{1,253}")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split ``host:port`` (scheme ignored, IPv6 in brackets) into its parts.

    Raises:
        ConfigurationError: the endpoint is not ``host:port``, or the host holds
            characters no host name or address has (spaces, non-ASCII: write an
            internationalised name in its ``xn--`` form).
    """
    text = endpoint.strip()
    for scheme in ("http://", "https://", "grpc://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    text = text.rstrip("/")
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    # isascii(): str.isdigit() also accepts digits int() refuses (superscripts).
    port_ok = port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536
    if not sep or not _HOST.fullmatch(host) or not port_ok:
        raise ConfigurationError(f"an etcd endpoint is host:port (like 127.0.0.1:2379), got {endpoint!r}")
    return host, int(port_text)


def grpc_target(host: str, port: int) -> str:
    """The gRPC target of ``host`` and ``port``: an IPv6 address goes back into brackets.

    :func:`parse_endpoint` strips them; ``::1:2379`` is no address gRPC can dial.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_connection(
    endpoints: Sequence[str],
    *,
    timeout: float,
    username: str | None,
    password: str | None,
    cert: str | None,
    key: str | None,
) -> tuple[tuple[str, int], ...]:
    """Check the connection options every etcd client of otel-cancel takes; the endpoints parsed.

    Raises:
        ConfigurationError: no endpoint, a malformed one, a deadline that is not
            positive, a user without a password (or the reverse), a certificate
            without its key (or the reverse).
    """
    if not endpoints:
        raise ConfigurationError("at least one etcd endpoint is needed (OTEL_CANCEL_ETCD_ENDPOINTS)")
    parsed = tuple(parse_endpoint(e) for e in endpoints)
    if timeout <= 0:
        raise ConfigurationError(f"the etcd timeout must be positive, got {timeout}")
    if bool(username) != bool(password):
        raise ConfigurationError("set both OTEL_CANCEL_ETCD_USERNAME and OTEL_CANCEL_ETCD_PASSWORD, or neither")
    if (cert is None) != (key is None):
        raise ConfigurationError("set both OTEL_CANCEL_ETCD_CERT and OTEL_CANCEL_ETCD_KEY, or neither")
    return parsed
