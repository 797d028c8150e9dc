"""Argument types of the ``otel-cancel`` command line: roots, label selectors, seconds, counts.

Each turns one command-line word into a validated value or raises
``argparse.ArgumentTypeError`` with a sentence saying what was wrong, which the parser
prints as one line before exiting 2. Every command's parser takes its types from here.
"""

from __future__ import annotations

import argparse

from .._core.root_id import validate_root
from ..exceptions import InvalidLabelError, InvalidRootError

MAX_WAIT_SECONDS = 86400
MAX_COUNT = 100_000


def root_argument(value: str) -> str:
    """A root: 32 lowercase hex digits, not all zeros."""
    try:
        return validate_root(value)
    except InvalidRootError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def label_argument(value: str) -> tuple[str, str]:
    """A label selector, ``KEY=VALUE``, validated like labels themselves."""
    from .._core.labels import validate_label  # here: labels load OpenTelemetry, which a plain cancel does without

    key, sep, label = value.partition("=")
    try:
        if not sep:
            raise InvalidLabelError(f"a label selector is KEY=VALUE, got {value!r}")
        return validate_label(key, label)
    except InvalidLabelError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def seconds_argument(value: str) -> float:
    """A number of seconds between 0 and a day."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not 0 <= seconds <= MAX_WAIT_SECONDS:
        raise argparse.ArgumentTypeError(f"seconds must be between 0 and {MAX_WAIT_SECONDS}, got {value!r}")
    return seconds


def count_argument(value: str) -> int:
    """A whole number between 0 and 100000."""
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if not 0 <= count <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_COUNT}, got {value!r}")
    return count
