"""``otel-cancel cancel ROOT [ROOT...]`` through etcd's HTTP gateway: a cancel as quick as ``etcdctl put``.

A plain cancel (roots, no ``--wait``, no ``--all``, no ``--thread``/``--run``) only
writes flags, and the gRPC store's imports alone (grpc, aetcd, asyncio) cost
several times what ``etcdctl put`` takes. So such a cancel writes its flags with
:class:`~otel_cancel.store.etcd_gateway.EtcdGatewayClient` and loads none of them.
The flags, the settings and the output are the same code as the gRPC path's
(:class:`~otel_cancel.store._flag_write.FlagCreation`, :class:`Settings`,
:func:`~otel_cancel.cli.fleet.print_flag`); only the transport differs. When spans
are exported (``OTEL_EXPORTER_OTLP_ENDPOINT``) the command records its
``otel_cancel.request`` spans on the gRPC path, and when etcd's gateway cannot serve
(turned off, or unable to reach etcd behind mutual TLS), from the start or after some
flags, the roots not flagged yet go that path.
"""

from __future__ import annotations

import argparse

from .._core.cancel_request import CancelRequest
from .._core.settings import Settings
from ..exceptions import StoreError, StoreUnavailableError
from .fleet import EXIT_OK, print_flag
from .options import requester


def takes_gateway(args: argparse.Namespace, settings: Settings, *, exporting: bool) -> bool:
    """Whether this ``cancel`` only writes flags for listed roots, so the gateway can carry it."""
    return (
        settings.store == "etcd"
        and not exporting
        and bool(args.roots)
        and not args.all_runs
        and args.service is None
        and not args.label
        and not args.wait
        and not getattr(args, "thread", None)
        and not getattr(args, "run", None)
    )


def cancel_through_gateway(settings: Settings, args: argparse.Namespace) -> int | None:
    """Write the flag of every listed root through etcd's gateway and print each as the gRPC path does.

    As on the gRPC path, a root etcd refuses does not stop the others: every flag
    written is printed, then the first refusal is raised.

    Returns:
        The exit code, or ``None`` when the gateway cannot serve (turned off, or gone
        unusable after some flags): ``args.roots`` then holds the roots it did not
        flag, and ``args.gateway_attempted`` the flag it may have stored unawares,
        for the caller to cancel through the gRPC path.

    Raises:
        StoreError: etcd could not be reached on any endpoint, or refused a write.
    """
    from ..store.etcd_gateway import EtcdGatewayClient, GatewayUnusableError

    requested_by = requester()
    roots = list(dict.fromkeys(args.roots))  # each root once, in the order given
    refused: dict[str, StoreError] = {}
    with EtcdGatewayClient(settings.endpoints, **settings.etcd_options()) as client:
        for index, root in enumerate(roots):
            request = CancelRequest.new(root, args.reason, requested_by)
            try:
                stored, created = client.create_flag(request, settings.ttl_seconds)
            except GatewayUnusableError as error:
                # etcd may still serve gRPC (a member with its gateway off, say): the
                # roots not flagged yet go that way (the refused ones again, so their
                # error is reported there), the ones printed stay done. An endpoint may
                # have stored this root's flag and lost the answer: the gRPC path then
                # finds it, and must know it for this cancel's own.
                args.roots = [*refused, *roots[index:]]
                args.gateway_attempted = error.attempted
                return None
            except StoreUnavailableError:
                raise  # etcd unreachable: each further root would only wait out the same deadlines
            except StoreError as error:
                refused[root] = error
                continue
            print_flag(stored, created, args.json)
    if refused:
        raise next(iter(refused.values()))
    return EXIT_OK
