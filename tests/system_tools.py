"""Where the suite finds the system tools that pip cannot provide (``promtool``, ``prometheus``).

``.ci/install-system-deps`` unpacks Debian's prometheus package into the project's
``.tools/prometheus/``; that copy is preferred, then the ``PATH``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

UNPACKED = Path(__file__).resolve().parent.parent / ".tools" / "prometheus" / "usr" / "bin"


def system_tool(name: str) -> str:
    """The path of ``name`` (``promtool``, ``prometheus``); the test fails with what to run when it is missing."""
    candidate = UNPACKED / name
    if candidate.is_file():
        return str(candidate)
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run .ci/install-system-deps (it unpacks Debian's prometheus into .tools/)")
    return path
