"""The fleet at a glance and cancelling many at once: real etcd, real worker processes, the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest
from conftest import cli, python_worker

from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.root import random_root
from otel_cancel.cli.fleet import ps_rows
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import ManagedProcess

EVENT_TIMEOUT = 20.0
POLL_SECONDS = 0.05


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


def live_rows(env: dict[str, str]) -> list[dict]:
    """Every ps row, read straight from etcd (what ``ps --json`` prints, without a process per poll)."""

    async def read() -> list[dict]:
        store = EtcdCancelStore([env["OTEL_CANCEL_ETCD_ENDPOINTS"]], prefix=env["OTEL_CANCEL_PREFIX"])
        try:
            return ps_rows(await store.list_live(), None, [])
        finally:
            await store.close()

    return io_loop().submit(read()).result(EVENT_TIMEOUT)


def await_live(env: dict[str, str], predicate: Callable[[list[dict]], bool], what: str) -> list[dict]:
    """Poll the published live work until ``predicate`` holds (at most EVENT_TIMEOUT)."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        rows = live_rows(env)
        if predicate(rows):
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: live work is {rows}")
        time.sleep(POLL_SECONDS)  # a poll interval, not a wait for an event: each loop re-reads etcd


def held(rows: list[dict]) -> set[tuple[str, str]]:
    return {(row["root"], row["service"]) for row in rows}


@pytest.fixture
def fleet(spawn, etcd_env):
    """Start fleet workers: ``fleet(service, **env)`` -> a ManagedProcess taking commands on stdin."""

    def start(service: str, instance: str | None = None, **extra: str) -> ManagedProcess:
        env = {
            **etcd_env,
            "OTEL_SERVICE_NAME": service,
            "OTEL_CANCEL_INSTANCE": instance or f"{service}-0",
            "OTEL_CANCEL_LIVE_INTERVAL_MS": "50",
            **extra,
        }
        return spawn(python_worker("fleet_worker"), env=env, name=instance or service)

    return start


def enter(worker: ManagedProcess, command: str) -> str:
    """Send a start/hop command; return the root it entered (or raise if refused)."""
    name = command.split()[1]
    worker.send(command)
    line = worker.wait_for_line(lambda text: text.split()[:2] in (["ENTERED", name], ["REFUSED", name]), EVENT_TIMEOUT)
    assert line.startswith("ENTERED"), line
    return line.split()[2]


def outcome(worker: ManagedProcess, name: str) -> str:
    """STOPPED, REFUSED or DONE: how NAME's work ended."""
    line = worker.wait_for_line(
        lambda text: text.split()[1:2] == [name] and not text.startswith("ENTERED"), EVENT_TIMEOUT
    )
    return line.split()[0]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_ps_lists_live_work_per_root_and_process_filtered_by_service_and_label(fleet, etcd_env):
    """Two services holding shared and own roots appear in ps (table and --json), filtered by service and label."""
    alpha, beta = fleet("alpha"), fleet("beta")
    shared = enter(alpha, "start edge new tenant=t1 user_id=u-1")
    own = enter(alpha, "start solo new tenant=t2")
    enter(beta, f"hop sub {shared} {now_ms()} tenant=t1 user_id=u-1")
    other = enter(beta, "start beta-own new tenant=t3")
    await_live(etcd_env, lambda rows: len(rows) == 4, "four rows")

    result = run("ps", "--json", env=etcd_env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert held(rows) == {(shared, "alpha"), (own, "alpha"), (shared, "beta"), (other, "beta")}
    for row in rows:
        assert set(row) == {"root", "service", "instance", "depth", "started_at", "scopes", "labels"}
        assert row["instance"] == f"{row['service']}-0"
        assert 0 < time.time_ns() - row["started_at"] < 60e9
    sub = next(row for row in rows if row["service"] == "beta" and row["root"] == shared)
    assert sub["depth"] == 1 and sub["scopes"] == ["sub"] and sub["labels"] == {"tenant": "t1", "user_id": "u-1"}

    only_beta = json.loads(run("ps", "--service", "beta", "--json", env=etcd_env).stdout)
    assert held(only_beta) == {(shared, "beta"), (other, "beta")}
    tenant_one = json.loads(run("ps", "--label", "tenant=t1", "--json", env=etcd_env).stdout)
    assert held(tenant_one) == {(shared, "alpha"), (shared, "beta")}
    both = json.loads(run("ps", "--label", "tenant=t1", "--service", "alpha", "--json", env=etcd_env).stdout)
    assert held(both) == {(shared, "alpha")}

    table = run("ps", env=etcd_env).stdout.splitlines()
    assert table[0].split() == ["ROOT", "SERVICE", "INSTANCE", "DEPTH", "AGE", "SCOPES", "LABELS"]
    assert len(table) == 6 and table[-1] == "3 root(s) live in 2 process(es) of 2 service(s)"
    assert run("ps", "--label", "tenant", env=etcd_env).returncode == 2


def test_cancel_all_by_service_then_by_label_stops_exactly_the_selected_runs_everywhere(fleet, etcd_env):
    """--all --service beta stops every root with work in beta, in alpha too; --label tenant=t2 then stops t2 only."""
    alpha, beta = fleet("alpha"), fleet("beta")
    shared = enter(alpha, "start edge new tenant=t1")
    enter(beta, f"hop sub {shared} {now_ms()} tenant=t1")
    beta_own = enter(beta, "start beta-own new tenant=t1")
    alpha_t2 = enter(alpha, "start alpha-t2 new tenant=t2")
    alpha_t3 = enter(alpha, "start alpha-t3 new tenant=t3")
    await_live(etcd_env, lambda rows: len(rows) == 5, "five rows")

    result = run("cancel", "--all", "--service", "beta", "--reason", "bad rollout", "--json", env=etcd_env)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["bulk"]["service"] == "beta" and lines[0]["bulk"]["reason"] == "bad rollout"
    assert {line["flag"]["root"] for line in lines[1:]} == {shared, beta_own}
    assert outcome(alpha, "edge") == "STOPPED"
    assert outcome(beta, "sub") == "STOPPED"
    assert outcome(beta, "beta-own") == "STOPPED"
    status = json.loads(run("status", shared, "--json", env=etcd_env).stdout)
    assert status["cancelled"] and status["flag"]["reason"] == "bad rollout"

    result = run("cancel", "--all", "--label", "tenant=t2", env=etcd_env)
    assert result.returncode == 0, result.stderr
    assert "(tenant=t2)" in result.stdout.splitlines()[0]
    assert f"cancelled {alpha_t2} (reason: cancelled by operator)" in result.stdout.splitlines()
    assert outcome(alpha, "alpha-t2") == "STOPPED"
    rows = await_live(etcd_env, lambda rows: held(rows) == {(alpha_t3, "alpha")}, "only t3 left")
    assert rows[0]["labels"] == {"tenant": "t3"}
    alpha.send("finish alpha-t3")
    assert outcome(alpha, "alpha-t3") == "DONE"


def test_cancel_all_yes_stops_unpublished_work_refuses_late_hops_and_spares_runs_begun_after(fleet, etcd_env):
    """--all --yes: work begun just before (never published) stops, late hops of old runs are refused, new runs run."""
    # These workers publish only once a minute: their work is never in ps during the test.
    quiet = fleet("quiet", OTEL_CANCEL_LIVE_INTERVAL_MS="60000")
    other = fleet("other", OTEL_CANCEL_LIVE_INTERVAL_MS="60000")
    assert run("cancel", "--all", env=etcd_env).returncode == 2  # no selector and no --yes

    # --service selects unpublished work too: quiet stops its run and writes the root's flag,
    # which stops the run's hop in the other service.
    by_service = enter(quiet, "start by-service new")
    enter(other, f"hop by-service-hop {by_service} {now_ms()}")
    result = run("cancel", "--all", "--service", "quiet", "--reason", "quiet only", env=etcd_env)
    assert result.returncode == 0, result.stderr
    assert outcome(quiet, "by-service") == "STOPPED"
    assert outcome(other, "by-service-hop") == "STOPPED"
    flag = json.loads(run("status", by_service, "--json", env=etcd_env).stdout)["flag"]
    assert flag["reason"] == "quiet only" and "(bulk " in flag["requested_by"]

    just_before = enter(quiet, "start just-before new")
    begun_before_ms = now_ms()
    assert live_rows(etcd_env) == []
    result = run("cancel", "--all", "--yes", "--reason", "kill switch", "--json", env=etcd_env)
    assert result.returncode == 0, result.stderr
    cutoff_ms = json.loads(result.stdout.splitlines()[0])["bulk"]["cutoff"] // 1_000_000
    assert outcome(quiet, "just-before") == "STOPPED"
    listing = json.loads(run("list", "--json", env=etcd_env).stdout)
    assert sorted((b["reason"], b["service"] or "") for b in listing["bulk"]) == [
        ("kill switch", ""),
        ("quiet only", "quiet"),
    ]
    assert "2 bulk cancel(s) in force" in run("list", env=etcd_env).stdout

    # A late hop of the stopped run, and of another run begun before the call that no
    # process held at the time: both refused where they land.
    other.send(f"hop late {just_before} {begun_before_ms}")
    assert outcome(other, "late") == "REFUSED"
    other.send(f"hop old-run {random_root()} {begun_before_ms}")
    assert outcome(other, "old-run") == "REFUSED"

    # Runs that begin after the call are untouched, in both processes, hops included.
    after = enter(quiet, "start after new")
    enter(other, f"hop after-hop {after} {max(now_ms(), cutoff_ms + 1)}")
    for worker, name in ((quiet, "after"), (other, "after-hop")):
        worker.send(f"finish {name}")
        assert outcome(worker, name) == "DONE"


def test_cancel_wait_returns_once_expected_receipts_are_in_and_names_a_process_that_died(fleet, etcd_env):
    """--wait returns when every holder answered (well before its timer); it names a holder killed before the cancel."""
    alpha = fleet("alpha")
    beta = fleet("beta", OTEL_CANCEL_LIVE_TTL_SECONDS="3")
    root = enter(alpha, "start edge new")
    enter(beta, f"hop sub {root} {now_ms()}")
    await_live(etcd_env, lambda rows: held(rows) == {(root, "alpha"), (root, "beta")}, "both hold the root")

    timer = 30.0
    began = time.monotonic()
    result = run("cancel", root, "--wait", str(timer), "--json", env=etcd_env)
    elapsed = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert {line["receipt"]["service"] for line in lines if "receipt" in line} == {"alpha", "beta"}
    waited = lines[-1]["waited"]
    assert waited["expected"] == 2 and waited["missing"] == []
    print(f"cancel --wait {timer:g}: returned after {elapsed:.2f}s ({elapsed / timer:.1%} of the timer)")
    assert elapsed < timer / 2
    status = run("status", root, env=etcd_env).stdout.splitlines()
    assert " ago) by cli:" in status[0]
    assert status[4].startswith("2 process(es) of 2 service(s) stopped 2 task(s); slowest "), status

    second = enter(alpha, "start edge-2 new")
    enter(beta, f"hop sub-2 {second} {now_ms()}")
    await_live(etcd_env, lambda rows: held(rows) == {(second, "alpha"), (second, "beta")}, "both hold the root")
    os.killpg(beta.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    beta.process.wait(EVENT_TIMEOUT)
    result = run("cancel", second, "--wait", "1.5", env=etcd_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "1 process(es) reported stopped work (2 expected)" in lines
    assert any(line.startswith(f"no receipt from beta/beta-0 for {second} within 1.5s") for line in lines), lines
    # The dead process leaves ps within its lease (3 s; etcd checks expiries about twice a second).
    await_live(etcd_env, lambda rows: all(row["service"] != "beta" for row in rows), "beta gone from ps")
    gone_after = time.monotonic() - killed_at
    print(f"a killed process left ps {gone_after:.2f}s after SIGKILL (lease 3 s)")
    assert gone_after < 3 + 3  # the lease, plus slack for a loaded machine


def test_langgraph_runs_carry_their_thread_id_and_graph_name_as_labels(fleet, etcd_env):
    """A LangGraph run's thread_id and graph name are labels: ps --label thread_id=T finds it, with its node."""
    worker = fleet("agent")
    worker.send("graph run-1 thread-42")
    root = worker.wait_for_line("ENTERED run-1", EVENT_TIMEOUT).split()[2]
    await_live(etcd_env, lambda rows: bool(rows), "the graph run published")
    result = run("ps", "--label", "thread_id=thread-42", "--json", env=etcd_env)
    (row,) = json.loads(result.stdout)
    assert row["root"] == root
    assert row["labels"] == {"thread_id": "thread-42", "graph": "fleet_graph"}
    assert "wait_node" in row["scopes"]
    assert run("cancel", "--all", "--label", "thread_id=thread-42", env=etcd_env).returncode == 0
    assert outcome(worker, "run-1") == "STOPPED"


@pytest.mark.anyio
async def test_an_edge_labels_runs_from_request_headers_and_the_label_travels_to_the_next_service(chain, etcd_env):
    """OTEL_CANCEL_LABEL_HEADERS at the edge: the tenant header labels the run in both services; --label stops it."""
    import asyncio

    import httpx

    chain.start(
        {**etcd_env, "OTEL_CANCEL_LIVE_INTERVAL_MS": "50"},
        levels=("A", "B"),
        replicas=1,
        level_env={"A": {"OTEL_CANCEL_LABEL_HEADERS": "x-tenant-id=tenant,x-user-id=user_id"}},
    )
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT) as client:
        request = client.build_request(
            "GET",
            f"{chain.urls(0)[0]}/stream",
            params={"tokens": 2000, "interval": 0.05},
            # A value that is not a valid label is left out; the run itself is served.
            headers={"x-tenant-id": "acme", "x-user-id": "not a label!"},
        )
        response = await client.send(request, stream=True)
        root = response.headers["otel-cancel-root"]

        def labelled_everywhere(rows: list[dict]) -> bool:
            return {(row["service"], tuple(row["labels"].items())) for row in rows if row["root"] == root} == {
                ("service-A", (("tenant", "acme"),)),
                ("service-B", (("tenant", "acme"),)),
            }

        await asyncio.to_thread(await_live, etcd_env, labelled_everywhere, "the run labelled in A and B")
        began_before = now_ms()
        result = await asyncio.to_thread(run, "cancel", "--all", "--label", "tenant=acme", "--wait", "20", env=etcd_env)
        assert result.returncode == 0, result.stderr
        assert "2 process(es) reported stopped work (2 expected)" in result.stdout.splitlines()
        await response.aclose()

        # A late hop of another tenant=acme run begun before the call: refused (409) by the bulk
        # flag alone, in a process that never held it; one begun after the call is served.
        for started, status in ((began_before, 409), (now_ms() + 1000, 200)):
            hop = random_root()
            baggage = (
                f"otel_cancel.root={hop},otel_cancel.depth=1,otel_cancel.started={started},"
                "otel_cancel.labels=tenant%3Dacme"
            )
            answer = await client.get(f"{chain.urls(1)[0]}/work", params={"seconds": 0}, headers={"baggage": baggage})
            assert answer.status_code == status, answer.text
            if status == 409:
                assert answer.json() == {"error": "cancelled", "root": hop, "reason": "cancelled by operator"}
    assert len(chain.lines("STOPPED", root)) == 2
