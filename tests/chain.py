"""Start a chain of real uvicorn services on loopback (levels x replicas) for tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from otel_cancel.testing import ManagedProcess, free_port

SERVICES = os.path.join(os.path.dirname(__file__), "services")


class Chain:
    """Levels of replicas; level 0 is the edge. Every process is stopped by :meth:`stop`."""

    def __init__(self) -> None:
        self.levels: list[list[tuple[str, ManagedProcess]]] = []

    def start(
        self,
        env: dict[str, str],
        *,
        levels: Sequence[str] = ("A", "B", "C"),
        replicas: int = 2,
        module: str = "explicit_app",
        auto_instrument: bool = False,
        level_env: dict[str, dict[str, str]] | None = None,
        python: str = sys.executable,
    ) -> Chain:
        ports = [[free_port() for _ in range(replicas)] for _ in levels]
        for index, level in enumerate(levels):
            next_urls = ",".join(f"http://127.0.0.1:{p}" for p in ports[index + 1]) if index + 1 < len(levels) else ""
            replicas_here = []
            for replica, port in enumerate(ports[index]):
                command = [
                    python,
                    "-m",
                    "uvicorn",
                    f"{module}:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--app-dir",
                    SERVICES,
                    "--no-access-log",
                ]
                if auto_instrument:
                    command = [os.path.join(os.path.dirname(python), "opentelemetry-instrument"), *command]
                process_env = {
                    **env,
                    "LEVEL": level,
                    "NEXT_URLS": next_urls,
                    "OTEL_SERVICE_NAME": f"service-{level}",
                    "OTEL_CANCEL_INSTANCE": f"{level}{replica}",
                    "OTEL_CANCEL_TRUST_INCOMING": "false" if index == 0 else "true",
                    "OTEL_TRACES_EXPORTER": env.get("OTEL_TRACES_EXPORTER", "none"),
                    "OTEL_METRICS_EXPORTER": env.get("OTEL_METRICS_EXPORTER", "none"),
                    "OTEL_LOGS_EXPORTER": "none",
                    "PYTHONPATH": os.pathsep.join([SERVICES, os.environ.get("PYTHONPATH", "")]),
                    **(level_env or {}).get(level, {}),
                }
                process = ManagedProcess(command, env=process_env, name=f"{level}{replica}")
                replicas_here.append((f"http://127.0.0.1:{port}", process))
            self.levels.append(replicas_here)
        for level in self.levels:
            for _, process in level:
                process.wait_for_line(lambda line: "Uvicorn running on" in line, timeout=60)
        return self

    def urls(self, level: int = 0) -> list[str]:
        return [url for url, _ in self.levels[level]]

    def processes(self) -> list[ManagedProcess]:
        return [process for level in self.levels for _, process in level]

    def lines(self, event: str, root: str) -> list[str]:
        """Every ``EVENT root LEVEL`` line printed so far by any process."""
        prefix = f"{event} {root} "
        return [line for process in self.processes() for line in process.lines if line.startswith(prefix)]

    def stop(self) -> None:
        for process in self.processes():
            process.stop()
