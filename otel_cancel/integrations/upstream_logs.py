"""Rate-limit what OpenTelemetry itself logs about what clients send.

OpenTelemetry's W3C baggage propagator logs a warning for every bad entry of an
incoming ``baggage`` header, with the entry (or the whole header) in it: hostile
clients would write a service's log for it, thousands of lines, some as long as the
header. :func:`limit_client_input_logs` puts a filter on those loggers: one line per
kind of message per interval, each argument cut short, and the next line let
through says how many were held back.
"""

from __future__ import annotations

import logging
import threading
import time

from .._core.rate_limited_log import LOG_INTERVAL_SECONDS

CLIENT_INPUT_LOGGERS = ("opentelemetry.baggage.propagation", "opentelemetry.baggage")
"""Loggers whose warnings are caused by what clients send (entries of their ``baggage`` headers)."""
MAX_ARGUMENT_CHARS = 200


def _shortened(value: object) -> object:
    if isinstance(value, str) and len(value) > MAX_ARGUMENT_CHARS:
        return f"{value[:MAX_ARGUMENT_CHARS]}... ({len(value)} characters)"
    return value


class ClientInputLogFilter(logging.Filter):
    """Lets one record per logger and message template through per ``interval`` seconds.

    Args:
        interval: seconds between two lines of the same kind.
    """

    def __init__(self, interval: float = LOG_INTERVAL_SECONDS) -> None:
        super().__init__()
        self.interval = interval
        self._lock = threading.Lock()
        # Keyed by message template: the propagator has a handful, so this stays small.
        self._last: dict[tuple[str, str], float] = {}
        self._held_back: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._held_back[kind] = self._held_back.get(kind, 0) + 1
                return False
            self._last[kind] = now
            held_back = self._held_back.pop(kind, 0)
        if isinstance(record.args, tuple):
            record.args = tuple(_shortened(arg) for arg in record.args)
        if held_back:
            record.msg = f"{record.msg} (and {held_back} more like it since the last such line)"
        return True


_installed = threading.Lock()


def limit_client_input_logs() -> None:
    """Install :class:`ClientInputLogFilter` on :data:`CLIENT_INPUT_LOGGERS` (idempotent)."""
    with _installed:
        for name in CLIENT_INPUT_LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, ClientInputLogFilter) for f in logger.filters):
                logger.addFilter(ClientInputLogFilter())
