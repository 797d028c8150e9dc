"""Count the gRPC calls an etcd served, from etcd's own Prometheus metrics.

etcd serves ``grpc_server_started_total{grpc_method=...}`` on its client URL at
``/metrics``. Tests and benchmarks count the calls otel-cancel makes there, at the
server, instead of with counters inside the library: a receipt that took two calls
is counted as two, whatever the library thinks it did. It sits beside the embedded
etcd (:mod:`otel_cancel.store.embedded_etcd`), the other piece of test support about etcd.
"""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from collections.abc import Collection

KV_AND_LEASE_CALLS = ("Range", "Put", "Txn", "LeaseGrant", "DeleteRange")
"""The unary calls that read or write keys or grant leases (what a cancel or a receipt costs)."""

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\} (?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def etcd_grpc_calls(client_url: str, methods: Collection[str] | None = None, *, timeout: float = 5.0) -> Counter[str]:
    """How many gRPC calls of each method the etcd at ``client_url`` has started since it started.

    Args:
        client_url: etcd's client URL (``http://127.0.0.1:2379``), which serves ``/metrics``.
        methods: count only these gRPC methods (``"Put"``, ``"Txn"``...); all when ``None``.
        timeout: seconds to wait for etcd's answer.

    Returns:
        Calls by gRPC method name. Subtract two readings to count the calls between them.
    """
    with urllib.request.urlopen(f"{client_url}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group("name") != "grpc_server_started_total":
            continue
        method = dict(_LABEL.findall(match.group("labels"))).get("grpc_method")
        if method is not None and (methods is None or method in methods):
            counts[method] += int(float(match.group("value")))
    return counts
