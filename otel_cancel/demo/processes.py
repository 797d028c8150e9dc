"""Supervise the demo's child processes: start each in a session of its own, read its output, stop it.

Each child's output is read line by line on a thread of its own, so the demo can wait
for a line under a timeout instead of sleeping; stopping signals the child's whole
process group by pid (uvicorn and ``langgraph dev`` start children of their own).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

output_changed = threading.Condition()
"""Notified whenever a child process prints a line or ends its output (``lines`` change under it)."""


class ChildProcess:
    """A child process whose output is read line by line with timeouts.

    Args:
        args: the command.
        env: extra environment variables (added to this process's environment).
        name: a label for error messages.
    """

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None, name: str = "") -> None:
        self.name = name or os.path.basename(args[0])
        self.args = list(args)
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.process = subprocess.Popen(
            self.args,
            # A pipe, not the terminal: a child never reads the demo's keyboard (nor a Ctrl-D).
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        """Every line the child printed so far (stdout and stderr together)."""
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """The child's pid (also its process group's id)."""
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            with output_changed:
                self.lines.append(line)
                output_changed.notify_all()
            self._queue.put(line)
        self._queue.put(None)
        with output_changed:
            output_changed.notify_all()

    def wait_for_line(self, predicate: Callable[[str], bool] | str, timeout: float = 20.0) -> str:
        """The next output line matching ``predicate`` (a callable or a prefix).

        Raises:
            TimeoutError: no such line within ``timeout`` (the output so far is in the message).
            RuntimeError: the child exited first.
        """
        match = predicate if callable(predicate) else (lambda line: line.startswith(predicate))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.0, remaining))
            except queue.Empty:
                raise TimeoutError(self._describe(f"no matching line within {timeout}s")) from None
            if line is None:
                raise RuntimeError(self._describe(f"exited with {self.process.wait()} before a matching line"))
            if match(line):
                return line

    def _describe(self, what: str) -> str:
        tail = "\n".join(self.lines[-40:])
        return f"{self.name} (pid {self.pid}) {what}; output:\n{tail}"

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate the process group (SIGTERM, then SIGKILL) and return the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        with contextlib.suppress(Exception):
            if self.process.stdin:
                self.process.stdin.close()
        self._reader.join(timeout)
        with contextlib.suppress(Exception):
            if self.process.stdout:
                self.process.stdout.close()
        return self.process.returncode

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
