"""Every use of aetcd's internals, in one module, checked against the installed aetcd at import.

aetcd 1.0 (the asyncio etcd v3 client the store uses) opens only plaintext channels,
authenticates only when it connects, and takes a watch that etcd refuses for a live one.
:class:`PatchedEtcdClient` and :class:`RefusalAwareWatcher` add what is missing by
overriding or reading names aetcd does not document. They were checked against
``aetcd`` :data:`SUPPORTED_AETCD` (the range ``pyproject.toml`` pins); at import,
:func:`check_aetcd` verifies that each name below still exists with the shape relied
on and otherwise raises :class:`~otel_cancel.exceptions.ConfigurationError` naming
what changed, instead of an ``AttributeError`` deep inside a watch later.

The names, and why each is used (:data:`AETCD_NAMES_USED` is the list the check walks):

- ``aetcd.Client.connect`` is overridden: it opens a TLS channel when certificates
  are configured (aetcd's opens ``insecure_channel`` only) and installs
  :class:`RefusalAwareWatcher`. It follows aetcd's own steps, so it reads and sets
  the client's private state: ``_connected`` (the "connected" event), ``_is_connecting``
  (another task is connecting), ``_host``, ``_port``, ``_options`` (channel options),
  ``_username``, ``_password``, ``_timeout`` and ``_watcher``, and assigns the
  undocumented attributes ``channel``, ``metadata`` (the auth token metadata),
  ``auth_stub``, ``kvstub``, ``clusterstub``, ``leasestub`` and ``maintenancestub``
  with the stubs of ``aetcd.rpc`` (``AuthStub``, ``KVStub``, ``ClusterStub``,
  ``LeaseStub``, ``MaintenanceStub``, ``WatchStub``) and ``aetcd.rpc.AuthenticateRequest``.
- ``aetcd.Client.__init__``'s parameters (``host``, ``port``, ``username``, ``password``,
  ``timeout``, ``options``, ``connect_wait_timeout``) are passed by name.
- ``aetcd.watcher.Watcher._handle_response`` is overridden: etcd answers a watch it
  refuses (no read permission, an expired token) with one response both ``created``
  and ``canceled``; aetcd 1.0 files it as a live watch and the caller waits forever.
  The override reads the watcher's ``_lock``, ``_new_callback`` (the watch being
  created, an ``aetcd.watcher.WatcherCallback`` whose ``error`` it sets) and
  ``_new_callback_ready``.
- ``aetcd.watcher.Watcher._metadata`` is replaced after a re-authentication, so a
  watch stream opened later carries the new token; ``aetcd.watcher.Watcher.__init__``
  takes ``watchstub``, ``timeout`` and ``metadata``.
- ``aetcd.exceptions.RevisionCompactedError`` is built with ``compacted_revision``
  for a refused watch whose start revision was compacted; :class:`WatchRefusedError`
  subclasses ``aetcd.exceptions.ClientError``, so aetcd's watch machinery passes it on.
- ``kvstub.Range`` and ``maintenancestub.Status`` are called directly (with
  ``aetcd.rpc.RangeRequest`` / ``StatusRequest``): aetcd has no paged range and no
  leader check.

The subclass also adds names of its own (:data:`NAMES_ADDED`); the check makes sure
aetcd has not grown a name that they would silently override.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc

from ..exceptions import ConfigurationError
from ._endpoints import grpc_target

SUPPORTED_AETCD = ">=1.0.0,<1.1"
"""The aetcd releases these patches were checked against (``pyproject.toml`` pins the same range)."""

# etcd's gRPC metadata asking a member to refuse the call (and end a watch) when it
# has no leader (rpctypes.MetadataRequireLeaderKey / MetadataHasLeader). Without it a
# member cut off from its peers keeps a watch open that will never see another event.
_REQUIRE_LEADER = ("hasleader", "true")


@dataclasses.dataclass(frozen=True)
class AetcdName:
    """One aetcd name this module relies on, and the shape it must have.

    Attributes:
        path: dotted path from the ``aetcd`` package, e.g. ``aetcd.watcher.Watcher._handle_response``.
        shape: ``"class"``, ``"coroutine function"``, ``"callable"`` or ``"instance attribute"``
            (set by the owner's ``__init__``; checked on an instance built without a connection).
        parameters: parameter names the callable (for a class: its ``__init__``) must accept.
    """

    path: str
    shape: str
    parameters: tuple[str, ...] = ()


def _attributes(owner: str, *names: str) -> tuple[AetcdName, ...]:
    return tuple(AetcdName(f"{owner}.{name}", "instance attribute") for name in names)


AETCD_NAMES_USED: tuple[AetcdName, ...] = (
    AetcdName(
        "aetcd.Client",
        "class",
        ("host", "port", "username", "password", "timeout", "options", "connect_wait_timeout"),
    ),
    AetcdName("aetcd.Client.connect", "coroutine function", ("self",)),
    *_attributes(
        "aetcd.Client",
        "_connected",
        "_is_connecting",
        "_host",
        "_port",
        "_options",
        "_username",
        "_password",
        "_timeout",
        "_watcher",
        "channel",
        "metadata",
        "auth_stub",
        "kvstub",
        "clusterstub",
        "leasestub",
        "maintenancestub",
    ),
    AetcdName("aetcd.watcher.Watcher", "class", ("watchstub", "timeout", "metadata")),
    AetcdName("aetcd.watcher.Watcher._handle_response", "coroutine function", ("self", "response")),
    *_attributes("aetcd.watcher.Watcher", "_lock", "_new_callback", "_new_callback_ready", "_metadata"),
    AetcdName("aetcd.watcher.WatcherCallback", "class", ("callback",)),
    *_attributes("aetcd.watcher.WatcherCallback", "error"),
    AetcdName("aetcd.exceptions.ClientError", "class"),
    AetcdName("aetcd.exceptions.RevisionCompactedError", "class", ("compacted_revision",)),
    *(
        AetcdName(f"aetcd.rpc.{name}", "callable")
        for name in (
            "AuthStub",
            "KVStub",
            "ClusterStub",
            "LeaseStub",
            "MaintenanceStub",
            "WatchStub",
            "AuthenticateRequest",
            "RangeRequest",
            "StatusRequest",
        )
    ),
)
"""Every aetcd name used here beyond its documented API, with the shape relied on."""

NAMES_ADDED = (
    "aetcd.Client.authenticate_on_channel",
    "aetcd.Client.renew_token",
    "aetcd.Client.watch_metadata",
    "aetcd.Client._credentials",
    "aetcd.Client._auth_lock",
)
"""Names :class:`PatchedEtcdClient` adds; aetcd must not define them (they would be overridden unseen)."""

# How to build an instance of an owner of instance attributes without a connection.
_INSTANCE_FACTORIES: dict[str, Callable[[Any], Any]] = {
    "aetcd.Client": lambda cls: cls(),
    "aetcd.watcher.Watcher": lambda cls: cls(None),
    "aetcd.watcher.WatcherCallback": lambda cls: cls(None),
}

_MISSING = object()


def _resolve(root: Any, path: str) -> Any:
    """The object at ``path`` (``aetcd.x.y``) from ``root`` (the aetcd package), or ``_MISSING``."""
    found = root
    for part in path.split(".")[1:]:
        found = getattr(found, part, _MISSING)
        if found is _MISSING:
            break
    return found


def _missing_parameters(target: Any, parameters: tuple[str, ...]) -> list[str]:
    if not parameters:
        return []  # nothing to check (and a signature costs import time)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return list(parameters)
    accepted = set(signature.parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return []
    # inspect.signature of a class leaves out ``self``.
    return [name for name in parameters if name not in accepted and not (name == "self" and inspect.isclass(target))]


def aetcd_problems(root: Any = aetcd) -> list[str]:
    """What the aetcd at ``root`` lacks of :data:`AETCD_NAMES_USED` (empty: every patch fits).

    Args:
        root: the ``aetcd`` package (a stand-in in tests).

    Returns:
        One line per name that is missing, has another shape or lacks a parameter.
    """
    problems: list[str] = []
    instances: dict[str, Any] = {}
    for name in AETCD_NAMES_USED:
        if name.shape == "instance attribute":
            owner_path, attribute = name.path.rsplit(".", 1)
            if owner_path not in instances:
                owner = _resolve(root, owner_path)
                try:
                    instances[owner_path] = _INSTANCE_FACTORIES[owner_path](owner)
                except Exception as error:
                    instances[owner_path] = _MISSING
                    problems.append(f"{owner_path} (cannot be built without a connection: {error!r})")
            instance = instances[owner_path]
            if instance is not _MISSING and not hasattr(instance, attribute):
                problems.append(f"{name.path} (missing)")
            continue
        target = _resolve(root, name.path)
        if target is _MISSING:
            problems.append(f"{name.path} (missing)")
            continue
        if name.shape == "class" and not inspect.isclass(target):
            problems.append(f"{name.path} (not a class)")
        elif name.shape == "coroutine function" and not inspect.iscoroutinefunction(target):
            problems.append(f"{name.path} (not a coroutine function)")
        elif name.shape == "callable" and not callable(target):
            problems.append(f"{name.path} (not callable)")
        for parameter in _missing_parameters(target, name.parameters):
            problems.append(f"{name.path} (no parameter {parameter!r})")
    for path in NAMES_ADDED:
        owner_path, attribute = path.rsplit(".", 1)
        instance = instances.get(owner_path, _MISSING)
        if hasattr(_resolve(root, owner_path), attribute) or (
            instance is not _MISSING and hasattr(instance, attribute)
        ):
            problems.append(f"{path} (now defined by aetcd; the patch would override it)")
    return problems


def check_aetcd(root: Any = aetcd) -> None:
    """Raise a clear error when the aetcd at ``root`` no longer has what the patches rely on.

    Args:
        root: the ``aetcd`` package (a stand-in in tests).

    Raises:
        ConfigurationError: a name is missing or changed; the message names each one and
            the supported aetcd range.
    """
    problems = aetcd_problems(root)
    if not problems:
        return
    import importlib.metadata  # only on this error path: it costs the CLI's start-up time

    try:
        version = importlib.metadata.version("aetcd")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    raise ConfigurationError(
        f"otel-cancel's etcd store supports aetcd {SUPPORTED_AETCD}, and the installed aetcd {version} "
        f"does not have what it relies on: {'; '.join(problems)}. "
        f"Install a supported release: pip install 'aetcd{SUPPORTED_AETCD}'"
    )


check_aetcd()


class WatchRefusedError(aetcd.exceptions.ClientError):  # type: ignore[misc]  # aetcd is untyped
    """etcd refused to create a watch (the reason is the message)."""


class RefusalAwareWatcher(aetcd.watcher.Watcher):  # type: ignore[misc]  # aetcd is untyped
    """aetcd's watch multiplexer, except that a watch etcd refuses raises instead of hanging.

    etcd answers a watch it will not serve (the user's role may not read the range,
    or the token the watch stream was opened with has expired) with one response
    that is both ``created`` and ``canceled``. aetcd 1.0 takes it for a live watch
    and files it under the id of the refused request (0, the id of the watch that
    may already run on the stream): the caller would wait for events that never
    come, connected in appearance, and the running watch's events would go astray.
    """

    async def _handle_response(self, response: Any) -> None:
        if response.created and response.canceled:
            async with self._lock:
                if self._new_callback is not None:
                    if response.compact_revision:
                        self._new_callback.error = aetcd.exceptions.RevisionCompactedError(response.compact_revision)
                    else:
                        self._new_callback.error = WatchRefusedError(response.cancel_reason or "watch cancelled")
                    self._new_callback_ready.notify_all()
            return
        await super()._handle_response(response)


class PatchedEtcdClient(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """``aetcd.Client`` with what aetcd 1.0 lacks.

    - TLS channels (aetcd only opens plain ones);
    - renewing the auth token on the open channel (:meth:`renew_token`), so the
      watch stream survives a token that expired (aetcd authenticates only on connect);
    - watches that etcd refuses raise (:class:`RefusalAwareWatcher`);
    - watch streams that require a leader (:attr:`watch_metadata`).

    gRPC errors of the calls made here (authentication) propagate unchanged: the store
    maps every client error in one place (:mod:`otel_cancel.store._grpc_errors`).
    """

    # Attributes of aetcd.Client, declared for mypy (aetcd is untyped).
    _is_connecting: bool
    metadata: Any

    def __init__(self, *args: Any, credentials: grpc.ChannelCredentials | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials
        self._auth_lock = asyncio.Lock()

    async def connect(self) -> None:
        if self._connected.is_set() or self._is_connecting:
            # Connected, or another task is connecting: aetcd returns or waits for it.
            await super().connect()
            return
        # The same steps as aetcd.Client.connect(), with our channel and watcher.
        self._is_connecting = True
        try:
            target = grpc_target(self._host, self._port)
            if self._credentials is None:
                self.channel = grpc.aio.insecure_channel(target, options=self._options.items())
            else:
                self.channel = grpc.aio.secure_channel(target, self._credentials, options=self._options.items())
            if self._username is not None and self._password is not None:
                self.auth_stub = aetcd.rpc.AuthStub(self.channel)
                await self.authenticate_on_channel()
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self._watcher = RefusalAwareWatcher(
                aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.watch_metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False

    async def authenticate_on_channel(self) -> None:
        """Get a fresh auth token for the open channel (raises the call's ``grpc.aio.AioRpcError``)."""
        request = aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password)
        response = await self.auth_stub.Authenticate(request, timeout=self._timeout)
        self.metadata = (("token", response.token),)
        if self._watcher is not None:
            # A watch stream opened from now on carries the new token. The running one
            # keeps its own: etcd checks a stream's token only when a watch is created on it.
            self._watcher._metadata = self.watch_metadata

    @property
    def watch_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of a watch stream: the auth token, if any, and "require a leader"."""
        return (*(self.metadata or ()), _REQUIRE_LEADER)

    async def renew_token(self, rejected: Any) -> None:
        """Authenticate again on the open channel, unless a concurrent call already did.

        Args:
            rejected: the token metadata etcd rejected. A burst of calls that all saw
                it rejected (receipts after an idle spell) authenticate once: each
                authentication costs etcd a bcrypt check.
        """
        async with self._auth_lock:
            if self.metadata == rejected:
                await self.authenticate_on_channel()
