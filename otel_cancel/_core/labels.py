"""Run labels: short ``key=value`` pairs that travel with a root (a tenant, a user, a thread id).

A run is labelled where it starts (:func:`labelled`, ``scope(labels=...)``, or the
ASGI middleware's ``label_headers`` where a request starts a run: at an edge, never on
an adopted root) and the labels travel next to the
root as the baggage entry ``otel_cancel.labels``, so every hop knows them;
integrations add their own ids (LangGraph ``thread_id``, A2A ``task_id``). ``ps``
shows them and ``cancel --all --label KEY=VALUE`` selects runs by them. Keys and
values are validated and bounded like roots: what comes off the wire and does not
fit is dropped (one rate-limited log line), what the application passes in raises.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from types import MappingProxyType

from opentelemetry import baggage
from opentelemetry.context import Context, get_current

from .. import attributes
from ..exceptions import InvalidLabelError
from .baggage_entries import entries_of
from .rate_limited_log import RateLimitedLogger
from .root import is_valid_root, parse_depth, parse_started

MAX_LABELS = 16
"""Labels one run carries at most."""
MAX_KEY_LENGTH = 64
MAX_VALUE_LENGTH = 128
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_VALUE = re.compile(r"[A-Za-z0-9._:@/+-]{1,128}")
_log = RateLimitedLogger(logging.getLogger("otel_cancel.labels"))


def validate_label(key: object, value: object) -> tuple[str, str]:
    """Return ``(key, value)`` if both are allowed, else raise.

    Keys: a letter, then up to 63 of ``A-Z a-z 0-9 _ . -``. Values: 1 to 128 of
    ``A-Z a-z 0-9 . _ : @ / + -`` (ids, UUIDs, slugs, e-mail-like names).

    Raises:
        InvalidLabelError: the key or the value is not allowed.
    """
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidLabelError(f"a label key is a letter then up to 63 of A-Z a-z 0-9 _ . -, got {_shown(key)}")
    if not isinstance(value, str) or not _VALUE.fullmatch(value):
        raise InvalidLabelError(
            f"the value of label {key!r} must be 1-128 of A-Z a-z 0-9 . _ : @ / + -, got {_shown(value)}"
        )
    return key, value


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Return ``labels`` as a dict if every pair is allowed and there are at most 16.

    Raises:
        InvalidLabelError: a key or value is not allowed, or there are too many.
    """
    checked = dict(validate_label(key, value) for key, value in labels.items())
    if len(checked) > MAX_LABELS:
        raise InvalidLabelError(f"a run carries at most {MAX_LABELS} labels, got {len(checked)}")
    return checked


def usable_labels(candidates: Mapping[str, object]) -> dict[str, str]:
    """The pairs of ``candidates`` that are allowed labels; the others are dropped (one rate-limited line).

    For ids the integrations take from requests (thread ids, task ids): a value that
    does not fit never fails the run. ``None`` values are skipped silently; others
    are turned into text first (UUID objects).
    """
    kept: dict[str, str] = {}
    for key, value in candidates.items():
        if value is None or value == "":
            continue
        try:
            validate_label(key, str(value))
        except InvalidLabelError as error:
            _log.warning("label", "otel-cancel: not labelling the run: %s", error)
            continue
        if len(kept) < MAX_LABELS:
            kept[key] = str(value)
    return kept


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def encode_labels(labels: Mapping[str, str]) -> str:
    """The baggage value of ``labels`` (already validated): ``key=value`` pairs joined by ``;``."""
    return ";".join(f"{key}={value}" for key, value in labels.items())


@functools.lru_cache(maxsize=512)
def decode_labels(raw: str) -> tuple[tuple[str, str], ...]:
    """The labels in a baggage value; pairs that are not allowed are dropped (logged, rate-limited).

    Cached: the same value arrives with every hop of a run.
    """
    pairs: dict[str, str] = {}
    dropped = 0
    for item in raw.split(";")[: MAX_LABELS * 2]:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise InvalidLabelError("no '='")
            validate_label(key, value)
        except InvalidLabelError:
            dropped += 1
            continue
        if key in pairs or len(pairs) < MAX_LABELS:
            pairs[key] = value
        else:
            dropped += 1
    if dropped:
        _log.warning("labels", "otel-cancel: dropped %d malformed or excess run label(s) from baggage", dropped)
    return tuple(pairs.items())


_NO_LABELS: Mapping[str, str] = MappingProxyType({})


@functools.lru_cache(maxsize=512)
def _shared_labels(raw: str) -> Mapping[str, str]:
    return MappingProxyType(dict(decode_labels(raw)))


def run_facts(context: Context | None = None) -> tuple[int | None, Mapping[str, str]]:
    """The run's start (epoch ms, ``None`` when unknown) and labels, read from baggage in one pass.

    What every scope entry records for live work; kept cheap (one baggage read, the
    labels decoded once per distinct value and shared, read-only).
    """
    return _facts_of(entries_of(context if context is not None else get_current()))


def scope_facts(context: Context | None = None) -> tuple[str | None, int, int | None, Mapping[str, str]]:
    """The root (``None`` when absent or malformed), depth, run start and labels of ``context``.

    One read of the baggage for everything a scope entry needs (the hot path of every hop).
    """
    entries = entries_of(context if context is not None else get_current())
    root = entries.get(attributes.BAGGAGE_ROOT)
    depth = parse_depth(entries.get(attributes.BAGGAGE_DEPTH)) or 0
    started, labels = _facts_of(entries)
    return (root if isinstance(root, str) and is_valid_root(root) else None), depth, started, labels


def _facts_of(entries: Mapping[str, object]) -> tuple[int | None, Mapping[str, str]]:
    started = parse_started(entries.get(attributes.BAGGAGE_STARTED))
    raw = entries.get(attributes.BAGGAGE_LABELS)
    if not isinstance(raw, str) or not raw:
        return started, _NO_LABELS
    return started, _shared_labels(raw[:4096])


def current_labels(context: Context | None = None) -> dict[str, str]:
    """The labels of the run in ``context`` (default: the current context)."""
    raw = baggage.get_baggage(attributes.BAGGAGE_LABELS, context)
    if not isinstance(raw, str) or not raw:
        return {}
    return dict(decode_labels(raw[:4096]))


def with_labels(labels: Mapping[str, str], context: Context | None = None) -> Context:
    """A copy of ``context`` whose run also carries ``labels`` (a key given again takes the new value).

    Raises:
        InvalidLabelError: a label is not allowed, or the run would carry more than 16.
    """
    context = context if context is not None else get_current()
    merged = current_labels(context)
    merged.update(validate_labels(labels))
    if len(merged) > MAX_LABELS:
        raise InvalidLabelError(f"a run carries at most {MAX_LABELS} labels; this would make {len(merged)}")
    return baggage.set_baggage(attributes.BAGGAGE_LABELS, encode_labels(merged), context)


__all__ = ("MAX_LABELS", "current_labels", "validate_label", "validate_labels", "with_labels")
