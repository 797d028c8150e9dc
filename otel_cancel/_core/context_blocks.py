"""Blocks that narrow the run's context: ``labelled(...)`` and ``deadline(seconds)``.

They sit above the scope and the process state (a deadline block enforces itself with a
scope; a labelled block tells this process's live work its new labels), so the baggage
codecs below them (:mod:`otel_cancel._core.labels`, :mod:`otel_cancel._core.deadline`) import
neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

from opentelemetry import context as otel_context

from .deadline import MAX_AHEAD_SECONDS, now_ms, with_deadline
from .labels import validate_labels, with_labels
from .process_state import get_process_state
from .root import current_root
from .scope import CancelScope


class labelled:  # used like a function: ``with otel_cancel.labelled(tenant="acme"):``
    """Label the current run for the duration of a ``with`` block.

    The labels go into the context (so outgoing calls carry them to every later
    hop) and onto this process's live work for the run, so ``otel-cancel ps``
    shows them and ``cancel --all --label`` selects them. Use it where a run starts,
    before or inside its scope::

        with otel_cancel.labelled(tenant="acme", user_id="u-42"):
            async with otel_cancel.scope():
                ...

    Args:
        labels: labels as a mapping (for keys that are not Python names).
        **more: more labels as keywords.

    Raises:
        InvalidLabelError: a label is not allowed, or the run would carry more than 16.
    """

    def __init__(self, labels: Mapping[str, str] | None = None, /, **more: str) -> None:
        self.labels = validate_labels({**(labels or {}), **more})
        self._token: object | None = None

    def __enter__(self) -> labelled:
        context = with_labels(self.labels)
        self._token = otel_context.attach(context)
        root = current_root(context)
        if root is not None:
            get_process_state().registry.add_labels(root, self.labels)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None


class Deadline:
    """Narrow the current deadline for a block; see :func:`deadline`."""

    def __init__(self, seconds: float) -> None:
        if not 0 < seconds <= MAX_AHEAD_SECONDS:
            raise ValueError(f"deadline seconds must be more than 0 and at most {MAX_AHEAD_SECONDS}, got {seconds}")
        self.seconds = seconds
        self._token: object | None = None
        self._scope: CancelScope | None = None

    def _enter(self) -> None:
        deadline_ms = now_ms() + int(self.seconds * 1000)
        self._token = otel_context.attach(with_deadline(deadline_ms))

    def _exit(self) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None

    def __enter__(self) -> Deadline:
        self._enter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._exit()

    async def __aenter__(self) -> Deadline:
        self._enter()
        self._scope = CancelScope(name="deadline")
        try:
            await self._scope.__aenter__()
        except BaseException:
            self._exit()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        assert self._scope is not None
        try:
            await self._scope.__aexit__(exc_type, exc, traceback)
        finally:
            self._exit()


def deadline(seconds: float) -> Deadline:
    """Narrow the run's deadline to at most ``seconds`` from now, for the block.

    ``async with otel_cancel.deadline(2):`` also enforces it on the block (a scope
    that raises :class:`~otel_cancel.Cancelled` with reason ``deadline``);
    ``with otel_cancel.deadline(2):`` narrows the deadline carried to downstream
    calls and seen by :func:`otel_cancel.check` and :func:`time_left`. An outer,
    shorter deadline always wins: a deadline narrows, never widens.
    """
    return Deadline(seconds)


__all__ = ("Deadline", "deadline", "labelled")
