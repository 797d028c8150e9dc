"""LangGraph Server (``langgraph dev``, ``langgraph up``, LangGraph Platform): the root reaches every run.

LangGraph Server does not run a graph in the HTTP request that created the run: a
background worker picks the run up later (on any replica) and executes it in a
context that holds only the ``traceparent`` stored with the run. This module, the
one place that hooks into ``langgraph-api`` internals, closes that gap:

- **Run creation** (``create_valid_run``): the root, depth, deadline, signature,
  labels and the run's start at its root, as the middleware established them for the
  request (the trust rules of :mod:`otel_cancel.integrations.asgi` apply), are stored
  in the run's ``config.configurable`` under ``__otel_cancel__``; whatever a client put there (or under
  ``otel_cancel_root`` in the metadata) is dropped first. The root is also written
  to the run's metadata as ``otel_cancel_root``, where ``langgraph_sdk`` users can
  read it (``client.runs.get(...)["metadata"]``), and recorded under the run and
  thread ids in the store, for ``otel-cancel cancel --run/--thread``.
- **Run execution** (the worker's ``stream_run``): the run executes under that root
  (with those labels, plus its LangGraph ids, and that start),
  in one scope bound to the task that consumes the run for its whole life (not to
  the short-lived tasks LangGraph Server uses for each item of ``astream``). When
  the root is cancelled, the run ends the LangGraph way: ``interrupted`` (never
  ``error``, never retried), its checkpoint kept at the last completed step, the
  clients' streams ended by the server itself.
- **LangGraph's own cancel** (``runs.cancel`` with either action, ``cancel_many``, a
  stream dropped with ``on_disconnect="cancel"``, a ``multitask_strategy`` of
  ``interrupt`` or ``rollback``): the worker running the run, on whichever replica,
  is told through LangGraph's control channel; it then also writes the root's flag
  with the reason LangGraph gave, so every run the request reached in other
  deployments stops too. The top run keeps LangGraph's outcome (a ``rollback``
  deletes it); the runs below end ``interrupted``. Except a run that ``interrupt`` or
  ``rollback`` replaces with a run of the same root (below an edge, one caller sent
  both): it stops alone, since the new run carries on the same work.

The hooks are installed when the ``langgraph_api`` modules are imported (so the
server's configuration is read in its own order) and only for the ``langgraph-api``
releases in :data:`SUPPORTED_LANGGRAPH_API`: on any other release, or when a hooked
name is missing, one warning is logged and the server runs as it would without
otel-cancel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import importlib.metadata
import logging
import re
import secrets
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

import wrapt
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator

from .. import attributes
from .._core.deadline import validate_deadline
from .._core.labels import MAX_LABELS, current_labels, decode_labels, encode_labels, usable_labels
from .._core.process_state import ProcessState, get_process_state
from .._core.rate_limited_log import RateLimitedLogger
from .._core.records import CancelRequest, TaskRecord
from .._core.root import current_root, is_valid_root, parse_depth, parse_started, with_root, without_root
from .._core.scope import CancelScope, cancel, parent_in_root_trace
from .._core.signing import verify_root
from ..exceptions import Cancelled, InvalidTaskIdError, StoreError
from ..store._keys import LANGGRAPH_RUN_RECORD, LANGGRAPH_THREAD_RECORD, validate_task_id
from .langgraph import run_scope_bound
from .patching import Wrapper, unwrap, wrap

_log = logging.getLogger("otel_cancel.langgraph_server")
_rate_limited = RateLimitedLogger(_log)

SUPPORTED_LANGGRAPH_API = ((0, 16), (0, 17))
"""The ``langgraph-api`` releases these hooks know: from the first version (included)
to the second (excluded)."""

CONFIG_KEY = "__otel_cancel__"
"""Where a run's root, depth, deadline and signature are stored in ``config.configurable``."""

METADATA_ROOT = "otel_cancel_root"
"""The run metadata entry that shows the run's root to SDK users."""

_ABSENT = object()

# The names hooked or read, per module (the ones _WRAPPERS wraps, as it names them). The
# check at start-up and the test that pins the supported release both read this table.
HOOKED_NAMES: Mapping[str, tuple[str, ...]] = {
    "langgraph_api.asgi_transport": ("ASGITransport.handle_async_request",),
    "langgraph_api.models.run": ("create_valid_run", "inject_current_trace_context"),
    "langgraph_api.api.runs": ("create_valid_run",),
    "langgraph_api.cron_scheduler": ("create_valid_run",),
    "langgraph_api.worker": ("stream_run", "connect", "Runs"),
    "langgraph_api.errors": ("UserInterrupt", "UserRollback"),
}

_state: dict[str, Any] = {"enabled": False, "hooks_registered": False}
_patched: list[tuple[Any, str, Wrapper]] = []
"""What is wrapped here (owner, attribute, our wrapper), for :func:`uninstrument_langgraph_server`."""
_baggage_propagator = W3CBaggagePropagator()
_relays: set[asyncio.Task[None]] = set()


# -- the supported release -------------------------------------------------------------


def _parse_version(text: str) -> tuple[int, int] | None:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def unsupported_reason(version: str | None = None) -> str | None:
    """Why the installed (or given) ``langgraph-api`` release is not supported, or ``None`` when it is."""
    if version is None:
        try:
            version = importlib.metadata.version("langgraph-api")
        except importlib.metadata.PackageNotFoundError:
            return "langgraph-api is not installed"
    parsed = _parse_version(version)
    low, high = SUPPORTED_LANGGRAPH_API
    if parsed is None or not low <= parsed < high:
        shown = f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"
        return f"langgraph-api {version} is not a release otel-cancel knows ({shown})"
    return None


def missing_names(module: Any, names: tuple[str, ...]) -> list[str]:
    """The hooked names that ``module`` does not have (``Class.method`` names a class attribute)."""
    missing = []
    for name in names:
        owner = module
        for part in name.split("."):
            owner = getattr(owner, part, _ABSENT)
            if owner is _ABSENT:
                missing.append(name)
                break
    return missing


def _warn_unsupported(why: str) -> None:
    _log.warning(
        "otel-cancel: %s; LangGraph Server runs will not carry roots and its cancels stay local "
        "(the server itself works as without otel-cancel)",
        why,
    )


# -- run creation ----------------------------------------------------------------------


def _current_entries() -> dict[str, str] | None:
    """The ``otel_cancel.*`` entries of the current context, when it has a root."""
    root = current_root()
    if root is None:
        return None
    entries: dict[str, str] = {}
    for key in attributes.BAGGAGE_KEYS:
        value = baggage.get_baggage(key)
        if isinstance(value, str):
            entries[key] = value
    return entries


def _inject_current_trace_context(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """Store the request's root with the run (after dropping what a client put there)."""
    result = wrapped(*args, **kwargs)
    configurable = args[0] if args else kwargs.get("configurable")
    if isinstance(configurable, dict):
        # A client's value never survives: only the middleware's decision is stored.
        configurable.pop(CONFIG_KEY, None)
        entries = _current_entries()
        if entries is not None:
            configurable[CONFIG_KEY] = entries
    return result


async def _create_valid_run(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """Show the run's root in its metadata (and drop a client's ``otel_cancel_root``); record it.

    The run and thread records are written as soon as the run exists, so that
    ``otel-cancel cancel --run/--thread`` finds a run still queued (``pending``): its
    root's flag then refuses it when a worker picks it up.
    """
    root = current_root()
    payload = args[2] if len(args) > 2 else kwargs.get("payload")
    if isinstance(payload, dict):
        metadata = payload.get("metadata")
        metadata = dict(metadata) if isinstance(metadata, dict) else {}
        metadata.pop(METADATA_ROOT, None)
        if root is not None:
            metadata[METADATA_ROOT] = root
        # Always the cleaned copy: falling back to the original would keep a client's
        # otel_cancel_root when it was the only entry and no root is current (a cron run).
        payload["metadata"] = metadata
    run = await wrapped(*args, **kwargs)
    if root is not None and isinstance(run, Mapping):
        _record_run(root, run)
    return run


# -- run execution ---------------------------------------------------------------------


def run_context(configurable: Mapping[str, Any], context: otel_context.Context | None = None) -> otel_context.Context:
    """The context a run executes in: ``context`` with the root stored with the run (if valid).

    What travelled with the root when the run was created travels on with it: its depth,
    deadline, signature, labels and the run's start at its root (each only when valid).

    Args:
        configurable: the run's ``config.configurable``.
        context: the context to start from (default: the current one).
    """
    context = without_root(context if context is not None else otel_context.get_current())
    stored = configurable.get(CONFIG_KEY)
    if not isinstance(stored, Mapping):
        return context
    root = stored.get(attributes.BAGGAGE_ROOT)
    if not is_valid_root(root):
        return context
    assert isinstance(root, str)
    signing_key = get_process_state().settings.signing_key
    signature = stored.get(attributes.BAGGAGE_SIGNATURE)
    if signing_key is not None and not verify_root(signing_key, root, signature):
        # Per run, so rate-limited: replicas configured with different keys would flood the log.
        _rate_limited.warning(
            "signature",
            "otel-cancel: the root stored with a run is not signed with this key; the run starts its own",
        )
        return context
    depth = parse_depth(stored.get(attributes.BAGGAGE_DEPTH)) or 0
    extra: dict[str, str] = {}
    if isinstance(signature, str):
        extra[attributes.BAGGAGE_SIGNATURE] = signature
    deadline = stored.get(attributes.BAGGAGE_DEADLINE)
    if validate_deadline(deadline) is not None:
        assert isinstance(deadline, str)
        extra[attributes.BAGGAGE_DEADLINE] = deadline
    # Without these the run would look newer than it is (a `cancel --all` cut-off would miss
    # it) and unlabelled (`ps --label`, `cancel --all --label` would not find it).
    started = stored.get(attributes.BAGGAGE_STARTED)
    if parse_started(started) is not None:
        assert isinstance(started, str)
        extra[attributes.BAGGAGE_STARTED] = started
    labels = stored.get(attributes.BAGGAGE_LABELS)
    if isinstance(labels, str) and labels:
        valid = decode_labels(labels[:4096])
        if valid:
            extra[attributes.BAGGAGE_LABELS] = encode_labels(dict(valid))
    # The worker starts from an empty context: without a parent in the root's trace, what
    # the run records (its otel_cancel.cancelled span) would start traces of its own.
    return parent_in_root_trace(root, with_root(root, depth, context, extra=extra))


def _langgraph_stop(done: Any, interrupt_type: type[Exception]) -> Exception | None:
    """LangGraph's own stop of this run (``runs.cancel``), if it asked for one."""
    value = getattr(done, "_value", None)
    return value if isinstance(value, interrupt_type) else None


# LangGraph's reason when a run created with multitask_strategy="interrupt" or "rollback"
# stops the runs in flight on its thread (langgraph_api.models.run.create_valid_run).
_SUPERSEDED = re.compile(r"superseded by run ([0-9a-fA-F-]{32,36})\b")


async def _superseded_within_root(reason: str, root: str, thread_id: object) -> bool:
    """Whether LangGraph stopped this run for a newer run of the same root on its thread.

    That run carries on the same work: cancelling the root would refuse it too, and stop
    every process upstream that holds the root. The newer run's root is read from the
    run LangGraph stored before it stopped this one (its metadata, where
    :func:`_create_valid_run` shows the root), so it is known on any replica. Fails open:
    when it cannot be read, the stop is relayed as any other.
    """
    match = _SUPERSEDED.match(reason)
    worker = sys.modules.get("langgraph_api.worker")
    if match is None or thread_id is None or worker is None:
        return False
    try:
        async with worker.connect() as conn:
            async for newer in await worker.Runs.get(conn, match.group(1), thread_id=thread_id):
                metadata = newer.get("metadata")
                return isinstance(metadata, Mapping) and metadata.get(METADATA_ROOT) == root
    except Exception as error:  # any failure of LangGraph's store: relay, as before
        _rate_limited.warning(
            "superseded", "otel-cancel: could not read the run that superseded a run (%s); cancelling its root", error
        )
    return False


async def _relay_langgraph_cancel(done: Any, root: str, interrupt_type: type[Exception], thread_id: object) -> None:
    """When LangGraph stops this run (its control channel), cancel the root everywhere.

    Except when a newer run of the same root replaced it on its thread (``multitask_strategy``
    ``interrupt`` or ``rollback`` below an edge): only this run stops then.
    """
    value = await done.wait()
    if not isinstance(value, interrupt_type):
        return
    reason = str(value) or type(value).__name__
    if await _superseded_within_root(reason, root, thread_id):
        return
    try:
        await cancel(root, reason=reason)
    except StoreError as error:
        # Nobody awaits the relay: unhandled, asyncio would log a traceback per run while
        # etcd is down (or this process lacks the canceller role).
        _rate_limited.warning(
            "relay",
            "otel-cancel: LangGraph stopped a run, but its root's flag could not be written (%s); "
            "the runs it reached in other deployments go on",
            error,
        )


async def _put_records(runtime: ProcessState, records: list[TaskRecord]) -> None:
    store = await runtime.watcher.store()
    for record in records:
        await store.put_task(record, runtime.settings.ttl_seconds)


def _log_record_failure(future: concurrent.futures.Future[None]) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        _rate_limited.warning(
            "records",
            "otel-cancel: writing a LangGraph run's root record failed (%s); "
            "otel-cancel cancel --run/--thread will not find this run",
            error,
        )


def _run_ids(run: Mapping[str, Any]) -> tuple[str, str]:
    """The run's id and thread id as text; ``""`` for one it has not (a stateless run has no thread)."""
    # Never "None": that would be recorded as the context id of a run without a thread.
    run_id, thread_id = (
        str(value) if value not in (None, "", "None") else "" for value in (run.get("run_id"), run.get("thread_id"))
    )
    return run_id, thread_id


def _record_run(root: str, run: Mapping[str, Any]) -> None:
    """Map the run id and its thread id to ``root`` in the store (beside the run, never blocking it).

    The records (``{prefix}tasks/langgraph-run:{id}`` and ``langgraph-thread:{id}``, on the
    flags' lease) let ``otel-cancel cancel --run/--thread`` find the root from any machine,
    whichever replica or deployment runs the run; a thread names its latest run's root.
    """
    runtime = get_process_state()
    settings = runtime.settings
    run_id, thread_id = _run_ids(run)
    now = time.time_ns()
    records = []
    for name, value in ((LANGGRAPH_RUN_RECORD, run_id), (LANGGRAPH_THREAD_RECORD, thread_id)):
        if value:
            try:
                task_id = validate_task_id(name.format(value))
            except InvalidTaskIdError:
                continue
            records.append(TaskRecord(task_id, root, thread_id[:128], settings.service, settings.instance, now))
    if records:
        runtime.watcher.submit(_put_records(runtime, records)).add_done_callback(_log_record_failure)


FINAL_CHECK_SECONDS = 1.0
"""How long a finishing run waits for the store to say whether its root was cancelled."""


async def _get_flag(runtime: ProcessState, root: str) -> CancelRequest | None:
    store = await runtime.watcher.store()
    return await store.get_flag(root)


async def _cancelled_meanwhile(root: str) -> CancelRequest | None:
    """Whether ``root`` was cancelled while this run was finishing.

    A run that relays another deployment's run can see that run's stream end cleanly
    (it was interrupted) a moment before its own process applies the flag: asked once,
    at the end, the store tells it the run was cancelled, so it ends ``interrupted``
    too instead of ``success`` with a truncated result. Fails open (a store that does
    not answer in time, or is down, leaves the run's outcome alone).
    """
    runtime = get_process_state()
    request = runtime.registry.is_cancelled(root)
    if request is not None or not runtime.watcher.connected:
        return request
    try:
        future = runtime.watcher.submit(_get_flag(runtime, root))
        return await asyncio.wait_for(asyncio.wrap_future(future), FINAL_CHECK_SECONDS)
    except (TimeoutError, StoreError):
        return None


def _run_labels(run: Any, configurable: dict[str, Any]) -> dict[str, str]:
    """The run's LangGraph ids as labels (``otel-cancel ps --label thread_id=...``).

    Added to the labels that came with the root (already in the current context): an id
    replaces a carried label of the same name, and new ones fill only the room left, so
    the run never carries more than :data:`MAX_LABELS`.
    """
    ids = usable_labels(
        {
            "thread_id": run.get("thread_id"),
            "run_id": run.get("run_id"),
            "assistant_id": run.get("assistant_id"),
            "graph": configurable.get("graph_id"),
        }
    )
    carried = current_labels()
    room = MAX_LABELS - len(carried)
    labels: dict[str, str] = {}
    for key, value in ids.items():
        if key not in carried:
            if room <= 0:
                continue
            room -= 1
        labels[key] = value
    return labels


def _stream_run(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> AsyncIterator[Any]:
    return _run_in_scope(wrapped, args, kwargs)


async def _run_in_scope(
    wrapped: Callable[..., AsyncGenerator[Any, None]], args: Any, kwargs: Any
) -> AsyncIterator[Any]:
    # Iterated by the worker's task for the run's whole life: the scope, the context
    # and the relay all live in that one task.
    from langgraph_api.errors import UserInterrupt  # type: ignore[import-untyped]

    run = args[0] if args else kwargs["run"]
    done = args[2] if len(args) > 2 else kwargs["cancel"]
    kwargs_of_run = run.get("kwargs") or {}
    configurable = (kwargs_of_run.get("config") or {}).get("configurable") or {}
    token = otel_context.attach(run_context(configurable))
    owned = run_scope_bound.set(True)
    relay: asyncio.Task[None] | None = None
    root: str | None = None
    try:
        try:
            async with CancelScope(name=None, labels=_run_labels(run, configurable)) as run_scope:
                root = run_scope.root
                assert root is not None
                # Written at creation already when the root was known then; again here for a
                # run whose root starts here (no root at creation: a cron, a plain request)
                # and for a retried run, so the thread names the run that runs now.
                _record_run(root, run)
                relay = asyncio.get_running_loop().create_task(
                    _relay_langgraph_cancel(done, root, UserInterrupt, run.get("thread_id")),
                    name=f"otel-cancel relay {root}",
                )
                try:
                    # Closed here, in this task, however the run ends: left to the garbage
                    # collector, the server's own generator would be closed in another task,
                    # and its OpenTelemetry context could not be detached there.
                    async with contextlib.aclosing(wrapped(*args, **kwargs)) as events:
                        async for item in events:
                            yield item
                    cancelled = await _cancelled_meanwhile(root)
                    if cancelled is not None:
                        raise cancelled.error()
                except UserInterrupt as stopped:
                    # LangGraph stopped the run here (runs.cancel): for the scope, that is
                    # this root's cancel arriving early; the relay's flag claims it.
                    raise Cancelled(root, str(stopped)) from stopped
        except Cancelled as stopped:
            if root is None:
                root = stopped.root  # a late run: its root was cancelled before it started
            if stopped.root != root:
                raise
            own = _langgraph_stop(done, UserInterrupt)
            if own is not None:
                raise own from None  # keep LangGraph's outcome (interrupt or rollback)
            # Interrupted, not an error and never retried: LangGraph keeps the checkpoint.
            raise UserInterrupt(CancelRequest(root, stopped.reason, 0, "", stopped.kind).tag()) from None
    finally:
        if relay is not None:
            if done.is_set():
                # The relay is writing the flag: let it finish after the run has ended.
                _relays.add(relay)
                relay.add_done_callback(_relays.discard)
            else:
                relay.cancel()
        run_scope_bound.reset(owned)
        otel_context.detach(token)


# -- requests the server makes to itself ------------------------------------------------

LOOPBACK_HEADER = "otel-cancel-loopback"
_loopback_token = secrets.token_hex(16)
"""Marks requests this process sends to itself (``get_client()`` with no URL, the A2A
endpoint): known only in this process, so no outside client can pass for one."""


def _loopback_request(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """An in-process request carries this context's root (and the loopback mark)."""
    request = args[0] if args else kwargs["request"]
    # The A2A endpoint forwards its caller's headers: never let that caller's baggage
    # through, only the root this process established for it.
    request.headers.pop("baggage", None)
    carrier: dict[str, str] = {}
    _baggage_propagator.inject(carrier)
    if "baggage" in carrier:
        request.headers["baggage"] = carrier["baggage"]
    request.headers[LOOPBACK_HEADER] = _loopback_token
    return wrapped(*args, **kwargs)


def _is_loopback(scope: Mapping[str, Any]) -> bool:
    marks = [value for key, value in scope.get("headers", []) if key.lower() == LOOPBACK_HEADER.encode()]
    return len(marks) == 1 and hmac.compare_digest(marks[0], _loopback_token.encode())


class LangGraphServerCancelMiddleware:
    """:class:`~otel_cancel.integrations.asgi.CancelMiddleware` as LangGraph Server needs it.

    The server's worker runs graphs, stops them and ends their streams itself, so
    requests are not run in scopes, and a dropped stream follows the run's own
    ``on_disconnect`` (LangGraph's default lets a background run go on). A request the
    server makes to itself keeps the root of the request it serves, at an edge too.
    """

    def __init__(self, app: Any) -> None:
        from .asgi import CancelMiddleware

        self.app = app
        self._outside = CancelMiddleware(app, run_in_scope=False, on_disconnect="continue")
        self._loopback = CancelMiddleware(app, trust_incoming=True, run_in_scope=False, on_disconnect="continue")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _is_loopback(scope):
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != LOOPBACK_HEADER.encode()]
            await self._loopback(scope, receive, send)
            return
        await self._outside(scope, receive, send)


# -- installing ------------------------------------------------------------------------


def _owner_and_attribute(module: Any, name: str) -> tuple[Any, str]:
    """``("Class.method")`` names a class attribute in ``module``; a plain name, a module one."""
    owner, _, attribute = name.rpartition(".")
    return (getattr(module, owner) if owner else module), attribute


_WRAPPERS: Mapping[str, Mapping[str, Callable[..., Any]]] = {
    "langgraph_api.asgi_transport": {"ASGITransport.handle_async_request": _loopback_request},
    "langgraph_api.models.run": {
        "create_valid_run": _create_valid_run,
        "inject_current_trace_context": _inject_current_trace_context,
    },
    "langgraph_api.api.runs": {"create_valid_run": _create_valid_run},
    "langgraph_api.cron_scheduler": {"create_valid_run": _create_valid_run},
    "langgraph_api.worker": {"stream_run": _stream_run},
}


def _on_import(module: Any) -> None:
    if not _state["enabled"]:
        return
    missing = missing_names(module, HOOKED_NAMES[module.__name__])
    if missing:
        _state["enabled"] = False
        _warn_unsupported(f"{module.__name__} has no {', '.join(missing)}")
        _unpatch()
        return
    for name, wrapper in _WRAPPERS.get(module.__name__, {}).items():
        owner, attribute = _owner_and_attribute(module, name)
        # A function imported by name from a module already hooked is wrapped already: wrap()
        # leaves it, and unwrap() restores the original in this module too.
        wrap(owner, attribute, wrapper)
        _patched.append((owner, attribute, wrapper))


def instrument_langgraph_server() -> bool:
    """Hook LangGraph Server's run creation and worker (idempotent).

    Returns:
        Whether the hooks are (or will be, when ``langgraph_api`` is imported) in place:
        ``False`` on a ``langgraph-api`` release outside :data:`SUPPORTED_LANGGRAPH_API`
        (one warning is logged, and nothing is changed).
    """
    if _state["enabled"]:
        return True
    why = unsupported_reason()
    if why is not None:
        if why != "langgraph-api is not installed":
            _warn_unsupported(why)
        return False
    _state["enabled"] = True
    if not _state["hooks_registered"]:
        _state["hooks_registered"] = True
        for name in HOOKED_NAMES:
            wrapt.register_post_import_hook(_on_import, name)
    else:
        for name in HOOKED_NAMES:
            if name in sys.modules:
                _on_import(sys.modules[name])
    return True


def _unpatch() -> None:
    while _patched:
        owner, attribute, wrapper = _patched.pop()
        unwrap(owner, attribute, wrapper)


def uninstrument_langgraph_server() -> None:
    """Undo :func:`instrument_langgraph_server`."""
    _state["enabled"] = False
    _unpatch()


def is_langgraph_server_app(app: Any) -> bool:
    """Whether ``app`` is LangGraph Server's own Starlette app."""
    server = sys.modules.get("langgraph_api.server")
    return server is not None and app is getattr(server, "app", None)


__all__ = (
    "CONFIG_KEY",
    "METADATA_ROOT",
    "SUPPORTED_LANGGRAPH_API",
    "LangGraphServerCancelMiddleware",
    "instrument_langgraph_server",
    "is_langgraph_server_app",
    "run_context",
    "uninstrument_langgraph_server",
)
