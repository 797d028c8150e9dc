"""Environment variables that configure otel-cancel.

Each constant is named after the variable it holds. Explicit arguments to
:func:`otel_cancel.configure` override the environment. Invalid values fail
fast with :class:`otel_cancel.exceptions.ConfigurationError` when the process
configures otel-cancel, never later on a request.
"""

from __future__ import annotations

OTEL_CANCEL_ETCD_ENDPOINTS = "OTEL_CANCEL_ETCD_ENDPOINTS"
"""Comma-separated etcd endpoints; the client fails over between them.

Default: ``127.0.0.1:2379``. Example: ``etcd-0:2379,etcd-1:2379,etcd-2:2379``.
A scheme (``http://``) is accepted and ignored; use the ``_CA_CERT`` variables for TLS.
"""

OTEL_CANCEL_PREFIX = "OTEL_CANCEL_PREFIX"
"""Key prefix in etcd. Default: ``/otel-cancel/``. Must start and end with ``/``."""

OTEL_CANCEL_TTL_SECONDS = "OTEL_CANCEL_TTL_SECONDS"
"""Lifetime of a cancel flag and its receipts, in seconds. Default: ``3600``."""

OTEL_CANCEL_ETCD_USERNAME = "OTEL_CANCEL_ETCD_USERNAME"
"""etcd user name, when etcd authentication is on. Default: unset."""

OTEL_CANCEL_ETCD_PASSWORD = "OTEL_CANCEL_ETCD_PASSWORD"
"""etcd password, required with ``OTEL_CANCEL_ETCD_USERNAME``. Default: unset."""

OTEL_CANCEL_ETCD_CA_CERT = "OTEL_CANCEL_ETCD_CA_CERT"
"""Path of a PEM CA bundle; setting it turns TLS on. Default: unset (plain gRPC)."""

OTEL_CANCEL_ETCD_CERT = "OTEL_CANCEL_ETCD_CERT"
"""Path of a PEM client certificate for mutual TLS. Default: unset."""

OTEL_CANCEL_ETCD_KEY = "OTEL_CANCEL_ETCD_KEY"
"""Path of the PEM key of ``OTEL_CANCEL_ETCD_CERT``. Default: unset."""

OTEL_CANCEL_ETCD_TIMEOUT_SECONDS = "OTEL_CANCEL_ETCD_TIMEOUT_SECONDS"
"""Deadline of every etcd call, in seconds. Default: ``2``."""

OTEL_CANCEL_TRUST_INCOMING = "OTEL_CANCEL_TRUST_INCOMING"
"""Whether incoming ``otel_cancel.*`` baggage is adopted. Default: ``false``.

``false`` marks the service as an edge: every request starts its own root and a
client cannot attach itself to someone else's run. Set ``true`` on internal
services that are only reachable from other services of the same system.
"""

OTEL_CANCEL_ON_DISCONNECT = "OTEL_CANCEL_ON_DISCONNECT"
"""What an edge does when its client leaves an unfinished stream.

``cancel`` (default) writes the cancel flag for the root, so the whole chain
stops; ``continue`` lets the work outlive its caller.
"""

OTEL_CANCEL_STARTUP_WAIT_SECONDS = "OTEL_CANCEL_STARTUP_WAIT_SECONDS"
"""How long the scopes entered before the watcher's first listing wait for it, from the first of them.

Default: twice ``OTEL_CANCEL_ETCD_TIMEOUT_SECONDS`` plus one second (5 s with the
default 2 s deadline): time to give up on one endpoint that does not answer (one
deadline) and list through the next one (another). The wait is spent once per process:
after it, scopes fail open (run at once, without waiting again) and one line is logged,
unless ``OTEL_CANCEL_UNLISTED`` says ``refuse``.
"""

OTEL_CANCEL_UNLISTED = "OTEL_CANCEL_UNLISTED"
"""What a scope does when the start-up wait ran out before the first listing.

``run`` (default): run the work, fail open. ``refuse``: raise ``Cancelled`` with the
reason "the cancel store could not be listed" (a 409 over HTTP): work that cannot
be checked against the flags does not run.
"""

OTEL_CANCEL_WATCHDOG_SECONDS = "OTEL_CANCEL_WATCHDOG_SECONDS"
"""Interval of the watcher's liveness probe of etcd. Default: ``5``.

A probe that fails (for example a frozen etcd) makes the watcher reconnect.
"""

OTEL_CANCEL_SIGNING_KEY = "OTEL_CANCEL_SIGNING_KEY"
"""Shared secret to sign roots in baggage. Default: unset (roots are not signed)."""

OTEL_CANCEL_INSTANCE = "OTEL_CANCEL_INSTANCE"
"""Name of this process in receipts.

Default: the ``service.instance.id`` of the process's OpenTelemetry resource (the
SDK's, or the one ``OTEL_RESOURCE_ATTRIBUTES`` gives), so receipts, spans and
metrics name the process alike; ``{hostname}-{pid}`` without one. To choose the
name, set ``OTEL_RESOURCE_ATTRIBUTES=service.instance.id=NAME`` rather than this.
"""

OTEL_CANCEL_STORE = "OTEL_CANCEL_STORE"
"""``etcd`` (default) or ``memory`` (single process only, for tests and demos)."""

OTEL_CANCEL_LIVE_INTERVAL_MS = "OTEL_CANCEL_LIVE_INTERVAL_MS"
"""Least time between two publications of this process's live work, in ms. Default: ``250``.

A process writes its live work (``otel-cancel ps``) at most once per interval, and
only when it changed, whatever its request rate.
"""

OTEL_CANCEL_LIVE_TTL_SECONDS = "OTEL_CANCEL_LIVE_TTL_SECONDS"
"""Lease of this process's live-work key, in seconds. Default: ``10``.

A process that dies leaves ``otel-cancel ps`` within this time.
"""

OTEL_CANCEL_LABEL_HEADERS = "OTEL_CANCEL_LABEL_HEADERS"
"""Request headers the ASGI middleware turns into the labels of a run that starts at its hop (an edge,
or an internal request without a root). Default: unset.

``header=label`` pairs, comma-separated: ``x-tenant-id=tenant,x-user-id=user_id``.
"""
