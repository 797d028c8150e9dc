"""Virtual environments with the built otel-cancel wheel installed beside a chosen OpenTelemetry release set.

A venv is slow to build (it downloads its packages), so each one is kept under
``.venv/compat/`` and reused while its key (pyproject.toml's dependencies and the
pinned release set) stays the same; the freshly built wheel is reinstalled into it
every run, without touching its dependencies.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".venv" / "compat"

# The instrumentations (0.Nb) go with one API/SDK release (1.M): 0.60b0 with 1.39.0.
OLDEST = {"api": "1.39.0", "contrib": "0.60b0"}
# Other dependencies the oldest venv pins at the oldest release pyproject.toml claims for them.
OLDEST_OTHERS = {"tenacity": "8.3.0"}
_CORE = ("opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-grpc")
_CONTRIB = (
    "opentelemetry-instrumentation",
    "opentelemetry-instrumentation-asgi",
    "opentelemetry-instrumentation-starlette",
    "opentelemetry-instrumentation-fastapi",
    "opentelemetry-instrumentation-httpx",
    "opentelemetry-util-http",
    "opentelemetry-distro",
    "opentelemetry-semantic-conventions",
)


def newest_python() -> str:
    """The newest Python 3 on this machine's PATH that otel-cancel supports (else the one running the tests)."""
    running = sys.version_info[:2]
    for minor in range(20, running[1], -1):
        found = shutil.which(f"python3.{minor}")
        if found is None:
            continue
        probe = subprocess.run([found, "-c", "import sys, venv"], capture_output=True, timeout=60)
        if probe.returncode == 0:  # a pyenv shim of a version not installed fails here
            return found
    return sys.executable


def newest_release_set() -> dict[str, str] | None:
    """The newest SDK release on the package index (``None`` when it cannot be asked)."""
    found = {}
    for key, package, pre in (("api", "opentelemetry-sdk", []),):
        result = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", package, *pre],
            capture_output=True,
            text=True,
            timeout=120,
        )
        match = re.search(rf"^{re.escape(package)} \(([^)]+)\)", result.stdout, re.M)
        if match is None:
            return None
        found[key] = match.group(1)
    return found


def pins(release_set: dict[str, str], every_package: bool) -> list[str]:
    """Requirement pins at ``release_set``: the SDK and the instrumentation core, or every package of a service.

    Patch releases (1.45.2, 0.66b2) cover only some packages and may not combine
    with the rest of the set (the distro lags behind), so the newest set pins
    nothing: pip picks the newest releases that install together.
    """
    if not every_package:
        return []
    return [f"{name}=={release_set['api']}" for name in _CORE] + [
        f"{name}=={release_set['contrib']}" for name in _CONTRIB
    ]


def build_wheel(directory: Path) -> Path:
    """Build the otel-cancel wheel into ``directory`` and return its path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(directory), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return next(directory.glob("otel_cancel-*.whl"))


def venv_with(wheel: Path, extras: str, requirements: list[str], interpreter: str = sys.executable) -> Path:
    """A venv (cached) on ``interpreter`` with ``wheel[extras]`` beside ``requirements``; returns its python."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    # The interpreter is part of the key: a venv runs on the Python that made it.
    version = subprocess.run(
        [interpreter, "-c", "import sys; print(sys.version)"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    key = hashlib.sha256("\n".join([version, pyproject, extras, *requirements]).encode()).hexdigest()[:16]
    home = CACHE / key
    python = home / "bin" / "python"
    marker = home / ".complete"
    if not marker.exists():
        subprocess.run([interpreter, "-m", "venv", "--clear", str(home)], check=True, timeout=300)
        # Python's bundled pip (23.x) gives up on OpenTelemetry's partial patch releases; a current pip resolves them.
        upgrade = [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip>=24"]
        subprocess.run(upgrade, check=True, capture_output=True, timeout=300)
        install = [str(python), "-m", "pip", "install", "--quiet", f"{wheel}[{extras}]", *requirements]
        subprocess.run(install, check=True, capture_output=True, timeout=900)
        marker.write_text(" ".join(requirements))
    else:
        # Only the wheel changes between runs: reinstall it, keep the dependencies.
        reinstall = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)]
        subprocess.run(reinstall, check=True, capture_output=True, timeout=300)
    return python


def installed_version(python: Path, package: str) -> str:
    """The version of ``package`` in the venv of ``python``."""
    code = f"from importlib.metadata import version; print(version({package!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def temporary_directory() -> tempfile.TemporaryDirectory[str]:
    """A temporary directory for built wheels (removed by the caller)."""
    os.makedirs(CACHE, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=CACHE)
