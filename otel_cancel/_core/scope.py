"""The scope: bind work to its root, stop it when the root is cancelled.

Entering a scope registers the current task (or thread) under the root of the
current context, then checks the process's set of cancelled roots; both happen
under the registry's lock, so no flag slips between them. Neither touches the
store. When a flag arrives, the watcher cancels every registered task of that
root with a tagged ``task.cancel()``; the scope that owns that cancellation
uncancels the task and raises :class:`~otel_cancel.Cancelled` instead. A
cancellation that someone else delivered (a client disconnect, a timeout) is
left alone and propagates as ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from types import TracebackType

from opentelemetry import context as otel_context
from opentelemetry import trace

from .. import attributes
from ..exceptions import Cancelled, StoreError
from . import telemetry
from .cancel_request import CancelRequest
from .deadline import DEADLINE_REASON, current_deadline, now_ms
from .labels import run_facts, scope_facts, validate_labels, with_labels
from .outcome import Outcome
from .process_state import ProcessState, get_process_state
from .registry import Registration
from .root import current_root, new_root, validate_root, with_root
from .signing import sign_root
from .startup_wait import wait_for_listing, wait_for_listing_blocking

# Read on every scope's exit: module globals are read faster than an enum's members.
_COMPLETED = Outcome.COMPLETED
_DEADLINE = Outcome.DEADLINE
_STOPPED = Outcome.STOPPED


def _record_stop(
    request: CancelRequest,
    *,
    depth: int,
    node: str | None,
    stopped_at: int,
    context: otel_context.Context | None = None,
    before_flag: bool = False,
) -> None:
    """Record work stopped by ``request`` at ``stopped_at`` (metrics and its ``otel_cancel.cancelled`` span)."""
    latency_ms = (stopped_at - request.requested_at) / 1e6 if request.requested_at else None
    telemetry.work_cancelled(
        root=request.root,
        reason=request.reason,
        kind=request.kind,
        depth=depth,
        node=node,
        start_ns=stopped_at,
        latency_ms=latency_ms,
        context=context,
        # Recorded late (the flag came after the stop): the span ends where the work stopped.
        end_ns=stopped_at if before_flag else None,
        before_flag=before_flag,
    )


def _deadline_request(root: str, deadline_ms: int) -> CancelRequest:
    """The local stop of ``root``'s work when its deadline (epoch ms) passes: no flag is written."""
    return CancelRequest(root, DEADLINE_REASON, deadline_ms * 1_000_000, "deadline", attributes.KIND_DEADLINE)


class CancelScope:
    """Binds the current task (or thread) to the current root. Use :func:`scope` to build one.

    Usable as ``async with`` (tasks: interrupted by ``task.cancel()``) and as plain
    ``with`` (threads and sync code: stop cooperatively at :func:`check`).
    """

    # The state a scope starts with, as class attributes: a new scope (one per request)
    # sets only what its caller chose, and each field is set on the instance when it changes.
    root: str | None = None
    """The root this scope is bound to (set on entry)."""
    depth = 0
    _runtime: ProcessState | None = None
    _registration: Registration | None = None
    _token: object | None = None
    _entered = False
    _exited = False
    _deadline_ms: int | None = None
    _deadline_handle: asyncio.TimerHandle | None = None
    _owns_deadline_timer = False
    _cancelling_at_enter = 0
    """How many cancellations of its task were pending at entry: not this scope's to undo."""
    _known: tuple[str, int, int | None, Mapping[str, str], int | None] | None = None
    """Root, depth, run start, labels and deadline of the current context, when the caller read them already."""

    def __init__(
        self,
        *,
        name: str | None = None,
        root: str | None = None,
        convert: bool = True,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self._convert = convert
        self._explicit_root = validate_root(root) if root is not None else None
        self._labels = validate_labels(labels) if labels else None

    # -- entry ---------------------------------------------------------------------

    def _bind(self, runtime: ProcessState, task_mode: bool) -> None:
        if self._entered:
            raise RuntimeError("a CancelScope can be entered only once; create a new one with otel_cancel.scope()")
        self._entered = True
        self._runtime = runtime
        known = self._known
        if known is not None:
            # The request path read the context's baggage already (see request_scope).
            root, depth, run_started_ms, labels, deadline_ms = known
        else:
            root, depth, run_started_ms, labels = self._enter_context(runtime)
            deadline_ms = current_deadline()
        self.root = root
        self.depth = depth
        registration, request = runtime.registry.enter(
            root, depth, self.name, task_mode=task_mode, run_started_ms=run_started_ms, labels=labels
        )
        if request is None and runtime.settings.unlisted == "refuse":
            request = runtime.unlisted_refusal(root)
        self._registration = registration
        task = registration.task
        if task is not None:
            cancelling = task.cancelling()
            if cancelling:
                self._cancelling_at_enter = cancelling
        if request is not None:
            # A late arrival: the root was cancelled before this work started.
            self._refuse(request)
        if deadline_ms is not None:
            self._arm_deadline(registration, deadline_ms)

    def _enter_context(self, runtime: ProcessState) -> tuple[str, int, int | None, Mapping[str, str]]:
        """The root, depth, run start and labels to enter with; attaches the context a new root or labels need."""
        current = otel_context.get_current()
        # One read of the baggage for the root, the depth, the run's start and its labels
        # (entering a scope is the hot path).
        context_root, depth, run_started_ms, labels = scope_facts(current)
        # A scope with no root starts the run here: this process is the run's root.
        root = self._explicit_root or context_root or new_root(current)
        context = current
        if root != context_root:
            key = runtime.settings.signing_key
            extra = {attributes.BAGGAGE_SIGNATURE: sign_root(key, root)} if key else None
            context = with_root(root, depth, current, extra=extra)
        if self._labels:
            context = with_labels(self._labels, context)
        if context is not current:
            self._token = otel_context.attach(context)
            # Only a run started here or a labelled scope changes the baggage: read it again then.
            run_started_ms, labels = run_facts(context)
        return root, depth, run_started_ms, labels

    def _refuse(self, request: CancelRequest) -> None:
        """Leave at once, before the body runs: ``request`` stopped this work before it started."""
        assert self._runtime is not None and self._registration is not None
        self._runtime.registry.exit(self._registration, Outcome.COMPLETED)
        telemetry.late_arrival(request.root, request.reason, request.kind)
        self._detach()
        raise request.error()

    def _arm_deadline(self, registration: Registration, deadline_ms: int) -> None:
        """Stop this scope's work locally when the run's deadline (epoch ms) passes (no etcd involved)."""
        assert self._runtime is not None and self.root is not None
        self._deadline_ms = deadline_ms
        remaining = (deadline_ms - now_ms()) / 1000
        if remaining <= 0:
            # Arrived after its deadline: do no work.
            self._refuse(_deadline_request(self.root, deadline_ms))
        task = registration.task
        if task is None:
            return  # threads stop at check(), which reads the deadline too
        if registration.deadline_ms is not None and registration.deadline_ms <= deadline_ms:
            return  # an enclosing scope of this task already stops it at (or before) this deadline
        registration.deadline_ms = deadline_ms
        self._owns_deadline_timer = True
        self._deadline_handle = task.get_loop().call_later(remaining, self._deadline_passed)

    def _deadline_passed(self) -> None:
        registration = self._registration
        if (
            registration is None
            or registration.task is None
            or registration.count <= 0
            or registration.task.done()
            or self._exited
        ):
            return
        # On the registration, not this scope: the scope the task is in when the timer fires
        # (a node nested in this one) is the one that sees the stop first, and converts it.
        registration.deadline_fired = True
        assert self.root is not None and self._deadline_ms is not None
        registration.task.cancel(_deadline_request(self.root, self._deadline_ms).tag())

    async def __aenter__(self) -> CancelScope:
        runtime = get_process_state()
        if not runtime.watcher.listed.is_set():  # the hot path: no coroutine once listed
            await wait_for_listing(runtime)
        self._bind(runtime, task_mode=True)
        return self

    def __enter__(self) -> CancelScope:
        runtime = get_process_state()
        runtime.start()
        if not runtime.watcher.listed.is_set():
            wait_for_listing_blocking(runtime)
        self._bind(runtime, task_mode=False)
        return self

    # -- exit ----------------------------------------------------------------------

    def _detach(self) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None

    def _finish(self, exc: BaseException | None) -> Cancelled | None:
        """Leave the scope: decide how its work ended, book it, record it; what to raise instead."""
        registration, runtime = self._registration, self._runtime
        assert registration is not None and runtime is not None and self.root is not None
        self._exited = True
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
        if self._owns_deadline_timer:
            registration.deadline_ms = None
        task = registration.task
        # Our own tagged cancellation (the flag's) reached this task and no scope took it yet.
        ours = task is not None and registration.delivered and not registration.consumed
        # The deadline timer of a scope of this task (this one or one around it) stopped the
        # task and no scope took that stop yet.
        deadline_stop = task is not None and registration.deadline_fired and not registration.deadline_consumed
        # Stopped by the deadline (and the flag did not get there first).
        deadline = deadline_stop and not ours
        undone = False
        if task is not None and (ours or deadline) and self._convert:
            # Undo exactly the cancellation this scope's side delivered (anyio style); one
            # someone else delivered too (a caller leaving) is theirs: it propagates.
            # (A non-converting scope leaves the CancelledError to the scope outside it.)
            registration.consumed = registration.consumed or ours
            registration.deadline_consumed = registration.deadline_consumed or deadline_stop
            # The flag's stop and the deadline's timer can both reach the task in one turn
            # (a flag arriving as the deadline passes): two cancellations of ours, undo both.
            delivered = int(ours) + int(deadline_stop)
            for _ in range(delivered - 1):
                task.uncancel()
            undone = task.uncancel() <= self._cancelling_at_enter
        decide = (
            self._outcome_of_a_normal_end
            if exc is None and not ours and not deadline  # the common case: no partial to build
            else functools.partial(self._outcome, exc, ours, deadline)
        )
        outcome, request = runtime.registry.exit(registration, decide, self._early_recorder)
        to_raise: Cancelled | None = None
        if outcome is _DEADLINE:
            # A scope whose own context has no deadline can still be stopped by one (set inside
            # it, stopping a scope nested in it): timed from now then.
            stop = _deadline_request(self.root, self._deadline_ms if self._deadline_ms is not None else now_ms())
            self._record_deadline(stop)
            to_raise = stop.error() if undone else None
        elif outcome is _STOPPED and request is not None:
            self._record(request)
            to_raise = request.error() if ours and undone else None
        if self._token is not None:
            self._detach()
        return to_raise

    def _outcome(self, exc: BaseException | None, ours: bool, deadline: bool, request: CancelRequest | None) -> Outcome:
        """How this scope's work ended (called by the registry under its lock, with the root's
        cancel request as applied to this task: ``None`` when no flag reached it)."""
        if deadline:
            return Outcome.DEADLINE
        if ours:
            return Outcome.STOPPED
        if self._stopped_by_deadline(exc):
            return Outcome.DEADLINE
        stopped_for_root = isinstance(exc, Cancelled) and exc.root == self.root
        if request is not None:
            task = self._registration.task if self._registration is not None else None
            if stopped_for_root or (task is not None and task.cancelling() > self._cancelling_at_enter):
                # Stopped by this root's cancel all the same: downstream reported it, or the
                # caller (stopped by the same cancel) hung up and its cancellation got here
                # before ours. It counts for the receipt; one that finished normally does not.
                return Outcome.STOPPED
            return Outcome.COMPLETED
        if stopped_for_root or isinstance(exc, asyncio.CancelledError):
            # Before any flag for this root arrived: its caller left, or the agent it called
            # reported the cancel. The flag, once here, still owes it a receipt.
            return Outcome.STOPPED_EARLY
        return Outcome.COMPLETED

    def _stopped_by_deadline(self, exc: BaseException | None) -> bool:
        """Whether ``exc`` is the run's deadline stopping this scope's work, with no timer of its task involved.

        ``check()`` in a thread (which no timer reaches), a scope nested in this one that
        converted the deadline's stop, or a hop downstream all raise ``Cancelled`` of kind
        ``deadline`` for this root; a cancellation that came once this scope's deadline had
        passed (its caller, out of budget too, left) is the deadline's as well.
        """
        if isinstance(exc, Cancelled):
            return exc.root == self.root and exc.kind == attributes.KIND_DEADLINE
        deadline_ms = self._deadline_ms
        return isinstance(exc, asyncio.CancelledError) and deadline_ms is not None and deadline_ms <= now_ms()

    def _outcome_of_a_normal_end(self, request: CancelRequest | None) -> Outcome:
        """:meth:`_outcome` for a body that returned, stopped by neither our flag nor our deadline."""
        if request is None:  # no flag reached this task: it completed
            return _COMPLETED
        return self._outcome(None, False, False, request)

    def _record_deadline(self, stop: CancelRequest) -> None:
        late_ms = now_ms() - stop.requested_at // 1_000_000
        telemetry.mark_span_cancelled(trace.get_current_span(), stop.reason)
        self._record_after_the_stop(
            functools.partial(
                telemetry.work_cancelled,
                root=stop.root,
                reason=stop.reason,
                kind=stop.kind,
                depth=self.depth,
                node=self.name,
                start_ns=time.time_ns(),
                latency_ms=float(late_ms),
            )
        )

    def _early_recorder(self) -> Callable[[CancelRequest], None]:
        """What to record if this root's flag arrives after this scope already stopped."""
        # The work span will have ended by then; the stop's span still lands under it,
        # at the moment the work stopped, so the trace shows this hop stopping too.
        return functools.partial(
            _record_stop,
            depth=self.depth,
            node=self.name,
            stopped_at=time.time_ns(),
            context=otel_context.get_current(),
            before_flag=True,
        )

    def _record(self, request: CancelRequest) -> None:
        telemetry.mark_span_cancelled(trace.get_current_span(), request.reason)
        self._record_after_the_stop(
            functools.partial(_record_stop, request, depth=self.depth, node=self.name, stopped_at=time.time_ns())
        )

    def _record_after_the_stop(self, record: Callable[[], None]) -> None:
        """Record a stop (its span and metrics, timed already): in a task, a loop turn later.

        The stopped work's caller (the middleware's 409, the handler's ``except``) gets
        control back first: recording costs more than the stop itself. ``call_soon``
        carries the current context, with the interrupted work's span, so the stop's
        span still lands under it.
        """
        task = self._registration.task if self._registration is not None else None
        if task is None:
            record()
        else:
            task.get_loop().call_soon(record)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.leave_task(exc)

    def enter_task(self, runtime: ProcessState) -> None:
        """``async with`` entry without its coroutine, for a caller that awaited the listing already.

        The request path runs every request in a scope: two coroutines less per request.
        """
        self._bind(runtime, task_mode=True)

    def leave_task(self, exc: BaseException | None) -> None:
        """``async with`` exit without its coroutine: leave, ended by ``exc`` (or normally).

        Raises:
            Cancelled: this scope's root was cancelled (or its deadline passed) while the body ran.
        """
        to_raise = self._finish(exc)
        if to_raise is not None:
            raise to_raise from (None if isinstance(exc, asyncio.CancelledError) else exc)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._finish(exc)


def request_scope(
    name: str,
    root: str,
    depth: int,
    run_started_ms: int | None,
    labels: Mapping[str, str],
    deadline_ms: int | None,
) -> CancelScope:
    """A scope for a request whose context (already current) carries these facts, read by the caller.

    For the request path (``CancelMiddleware``), which has read the root, depth, run
    start, labels and deadline from the baggage it established: the scope enters
    without reading the baggage again. Not public API.
    """
    # What CancelScope(name=name) builds, without its keyword call and checks (nothing to check).
    entered = CancelScope.__new__(CancelScope)
    entered.name = name
    entered._convert = True
    entered._explicit_root = None
    entered._labels = None
    entered._known = (root, depth, run_started_ms, labels, deadline_ms)
    return entered


def scope(*, name: str | None = None, root: str | None = None, labels: Mapping[str, str] | None = None) -> CancelScope:
    """A scope binding the current task to the current root.

    ``async with otel_cancel.scope():`` in coroutines; ``with otel_cancel.scope():``
    in threads and sync code (which stop at :func:`check`). With no root in the
    context the scope starts a new one (this process is the run's root) and puts it
    in the context for everything inside, outgoing HTTP calls included.

    Args:
        name: what is running (a LangGraph node, a handler); receipts and spans
            report it when it is interrupted.
        root: bind to this root instead of the context's.
        labels: labels to add to the run (see :func:`otel_cancel.labelled`); they travel
            with every outgoing call made inside.

    Raises:
        InvalidLabelError: a label is not allowed.
        Cancelled: on entry when the root is already cancelled (the body does not
            run), and on exit when the root was cancelled while the body ran.
    """
    return CancelScope(name=name, root=root, labels=labels)


# -- cooperative checks ------------------------------------------------------------------


def _cancel_request_for_current() -> CancelRequest | None:
    root = current_root()
    if root is None:
        return None
    runtime = get_process_state()
    runtime.start()
    request = runtime.registry.is_cancelled(root)
    if request is None:
        deadline_ms = current_deadline()
        if deadline_ms is not None and deadline_ms <= now_ms():
            return _deadline_request(root, deadline_ms)
    return request


def is_cancelled() -> bool:
    """Whether the root of the current context is cancelled (or its deadline passed). Safe from any thread."""
    return _cancel_request_for_current() is not None


def check() -> None:
    """Raise :class:`Cancelled` if the root of the current context is cancelled.

    For sync code and threads, which ``task.cancel()`` cannot interrupt: call it
    between units of work (tokens, rows, pages). It never touches the store.
    """
    request = _cancel_request_for_current()
    if request is not None:
        raise request.error()


# -- cancelling ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CancelResult:
    """What :func:`cancel` did.

    Attributes:
        request: the flag now in the store (the first one, if the root was already cancelled).
        created: whether this call wrote it.
    """

    request: CancelRequest
    created: bool


def parent_in_root_trace(root: str, context: otel_context.Context | None = None) -> otel_context.Context:
    """``context`` (the current one by default) with a parent span in the root's trace.

    Unless its current span already lies in that trace, a remote parent with the root as
    trace id is set, so a span started under it (the request span, the cancelled span of a
    run whose worker started from an empty context) joins the cancelled trace.
    """
    current = context if context is not None else otel_context.get_current()
    span_context = trace.get_current_span(current).get_span_context()
    if span_context.is_valid and trace.format_trace_id(span_context.trace_id) == root:
        return current
    parent = trace.SpanContext(
        trace_id=int(root, 16),
        span_id=int.from_bytes(os.urandom(8), "big") or 1,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent), current)


async def _write_flag(runtime: ProcessState, request: CancelRequest) -> CancelResult:
    store = await runtime.watcher.store()
    try:
        stored, created = await store.create_flag(request, runtime.settings.ttl_seconds)
    except StoreError:
        # Never lose the cancel here: stop local work at once, and report the failure.
        runtime.watcher.apply(request)
        raise
    # Counted here, on the IO loop, once the flag is written: a cancel_current() caller's
    # own scope stops it before the shielded write it awaits resolves, so code after that
    # await never runs for it.
    telemetry.cancel_requested(request.root, request.reason, created)
    # Apply locally without waiting for the watch round trip (a repeat is a no-op).
    runtime.watcher.apply(stored)
    return CancelResult(stored, created)


async def cancel(root: str, reason: str = "cancelled") -> CancelResult:
    """Cancel every piece of work of ``root``, in every process that watches the store.

    Writes the flag ``{prefix}flags/{root}`` (create-if-absent: a second cancel keeps
    the first flag) and records an ``otel_cancel.request`` span in the root's trace.

    Raises:
        InvalidRootError: ``root`` is not a valid root.
        StoreError: the flag could not be written (work in this process is still stopped).
    """
    validate_root(root)
    runtime = get_process_state()
    request = CancelRequest.new(root, reason, runtime.requester)
    span = telemetry.start_request_span(root, reason, parent_in_root_trace(root))
    try:
        # The write runs on the watcher's loop and is shielded: when it cancels the
        # caller's own scope (cancel_current), it still completes.
        future = runtime.watcher.submit(_write_flag(runtime, request))
        result = await asyncio.shield(asyncio.wrap_future(future))
    finally:
        span.end()
    return result


async def cancel_current(reason: str = "cancelled") -> CancelResult:
    """Cancel the root of the current context (a guardrail node calls this).

    The flag is written even though it cancels the caller's own scope; the caller's
    scope then raises :class:`Cancelled` as usual.

    Raises:
        RuntimeError: there is no root in the current context (call it inside a scope).
    """
    root = current_root()
    if root is None:
        raise RuntimeError("cancel_current() needs a root in the context; call it inside otel_cancel.scope()")
    return await cancel(root, reason)
