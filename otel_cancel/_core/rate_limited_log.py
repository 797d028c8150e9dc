"""Log lines for bad input, rate-limited: hostile traffic must not flood the log."""

from __future__ import annotations

import logging
import threading
import time

LOG_INTERVAL_SECONDS = 60.0


class RateLimitedLogger:
    """Logs a warning once per ``kind`` of bad input per interval.

    Args:
        logger: where the lines go.
        interval: seconds between two lines of the same kind.
    """

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL_SECONDS) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str, *args: object, exc_info: BaseException | None = None) -> None:
        """Log ``message`` unless a line of this ``kind`` was logged within the interval.

        ``exc_info``, when given, adds that error's traceback to the line.
        """
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self._interval) < self._interval:
                return
            self._last[kind] = now
        self._logger.warning(message, *args, exc_info=exc_info)
