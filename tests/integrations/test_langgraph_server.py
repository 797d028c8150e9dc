"""LangGraph Server: three real ``langgraph dev`` deployments chained by ``RemoteGraph``.

The chain (examples/langgraph_server: supervisor -> sub-agent -> sub-sub-agent, graphs
that do not import otel-cancel) is started once for the module, under
``opentelemetry-instrument`` with otel-cancel, on the session's real etcd. Each test
tags its runs so the nodes' marker lines tell the tests apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from otlp_receiver import OtlpReceiver

from otel_cancel import attributes
from otel_cancel.demo.langgraph_server_chain import ROLES, ServerChain
from otel_cancel.testing import EtcdServer, unique_prefix

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

langgraph_sdk = pytest.importorskip("langgraph_sdk")

TOKENS = 400  # a run that would take 20 s at every level: it is always cancelled midway
INTERVAL = 0.05
STOP_WITHIN_NS = 1_000_000_000


@pytest.fixture(scope="module")
def lg_receiver() -> Iterator[OtlpReceiver]:
    """Where the deployments export their spans (real OTLP over gRPC)."""
    started = OtlpReceiver().start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def lg_env(etcd: EtcdServer, lg_receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
        "OTEL_CANCEL_PREFIX": unique_prefix(),
        "OTEL_CANCEL_WATCHDOG_SECONDS": "1",
        "OTEL_CANCEL_LABEL_HEADERS": "x-tenant-id=tenant",
        **lg_receiver.env(),
        "OTEL_METRICS_EXPORTER": "none",
    }


@pytest.fixture(scope="module")
def lg_chain(lg_env: dict[str, str]) -> Iterator[ServerChain]:
    chain = ServerChain(lg_env).start()
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture
async def top(lg_chain: ServerChain) -> AsyncIterator[Any]:
    """A langgraph_sdk client of the supervisor deployment (the edge)."""
    async with langgraph_sdk.get_client(url=lg_chain.top.url) as client:
        yield client


@pytest.fixture(autouse=True)
def _no_retry_no_detach_error(request: pytest.FixtureRequest) -> Iterator[None]:
    """No run of any test is retried, and no context is left attached across tasks."""
    yield
    if "lg_chain" not in request.fixturenames:
        return
    chain: ServerChain = request.getfixturevalue("lg_chain")
    for deployment in chain.deployments:
        for line in deployment.process.lines:
            assert "will retry" not in line and "RETRYING" not in line, f"{deployment.name}: {line}"
            assert "Failed to detach context" not in line, f"{deployment.name}: {line}"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    binary = os.path.join(os.path.dirname(sys.executable), "otel-cancel")
    return subprocess.run([binary, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def _cancel_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run `otel-cancel cancel ... --json`; when its flag was written (epoch ns: the CLI's own start-up
    is not the library's latency) and its output."""
    result = _cli(env, "cancel", *args, "--json")
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout.splitlines()[0])["flag"]["requested_at"]), result.stdout


def _interrupted_runs(chain: ServerChain) -> list[int]:
    return [sum("Background run interrupted" in line for line in list(d.process.lines)) for d in chain.deployments]


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # polling process output: there is no event to await


async def _leaf_token(chain: ServerChain, tag: str, role: str = "sub_sub_agent") -> None:
    await _until(lambda: any(r == role for r, _ in chain.lines("TOKEN", tag)), 90, f"{role} tokens of {tag}")


def _input(tag: str, tokens: int = TOKENS, prompt: str = "tell me") -> dict[str, Any]:
    return {"prompt": prompt, "tag": tag, "tokens": tokens, "interval": INTERVAL}


async def _start(top: Any, tag: str) -> tuple[str, str, str]:
    """A run on a new supervisor thread, streaming at every level; its thread id, run id and root."""
    thread = await top.threads.create()
    run = await top.runs.create(thread["thread_id"], "agent", input=_input(tag))
    root = run["metadata"]["otel_cancel_root"]
    return thread["thread_id"], run["run_id"], root


async def _every_level_stopped(chain: ServerChain, tag: str, since_ns: int) -> None:
    """Every level's node ended stopped; the leaf's within a second, with no token after."""
    await _until(lambda: len(chain.lines("END", tag)) >= len(ROLES), 30, f"every level of {tag} to end")
    ends = {role: fields for role, fields in chain.lines("END", tag)}
    # The leaf's node is stopped mid-loop. A relay above it may see its RemoteGraph
    # stream end first (the interrupted run below ends its stream cleanly) a moment
    # before its own stop lands: its run still ends interrupted (checked by callers).
    assert ends["sub_sub_agent"][1] == "stopped"
    leaf_end = int(ends["sub_sub_agent"][0])
    assert leaf_end - since_ns < STOP_WITHIN_NS, f"the leaf stopped {(leaf_end - since_ns) / 1e6:.0f} ms after"
    tokens_after = [f for r, f in chain.lines("TOKEN", tag) if r == "sub_sub_agent" and int(f[0]) > leaf_end]
    assert tokens_after == []


async def _status(top: Any, thread_id: str, run_id: str) -> str:
    for _ in range(200):
        status: str = (await top.runs.get(thread_id, run_id))["status"]
        if status not in ("pending", "running"):
            return status
        await asyncio.sleep(0.05)  # polling the server's run status: there is no event to await
    raise AssertionError(f"run {run_id} still running")


async def _every_run_interrupted(chain: ServerChain, before: list[int]) -> None:
    await _until(
        lambda: all(now > then for now, then in zip(_interrupted_runs(chain), before, strict=True)),
        30,
        "every level's run to end interrupted",
    )


async def test_cancel_by_root_stops_every_level_and_spares_other_threads(
    lg_chain: ServerChain, lg_env: dict[str, str], top: Any, lg_receiver: OtlpReceiver
) -> None:
    """The leaf run carries the supervisor's root; cancelling it stops every level, not another thread's run."""
    tag, other = f"root-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    before = _interrupted_runs(lg_chain)
    thread_id, run_id, root = await _start(top, tag)
    other_thread = await top.threads.create()
    other_run = await top.runs.create(other_thread["thread_id"], "agent", input=_input(other, tokens=60))
    await _leaf_token(lg_chain, tag)
    await _leaf_token(lg_chain, other)
    assert {role: fields[1] for role, fields in lg_chain.lines("START", tag)} == dict.fromkeys(ROLES, root)
    sent, _ = _cancel_cli(lg_env, root)
    await _every_level_stopped(lg_chain, tag, sent)
    assert await _status(top, thread_id, run_id) == "interrupted"
    await _every_run_interrupted(lg_chain, before)
    assert await _status(top, other_thread["thread_id"], other_run["run_id"]) == "success"
    assert {role: fields[1] for role, fields in lg_chain.lines("END", other)} == dict.fromkeys(ROLES, "done")
    status = _cli(lg_env, "status", root, "--json")
    assert '"cancelled": true' in status.stdout and '"answer"' in status.stdout
    # Every deployment records its stop in the cancelled trace, naming the interrupted node.
    await asyncio.to_thread(
        lg_receiver.wait_for,
        lambda r: (
            {s.service for s in r.spans if s.name == attributes.SPAN_CANCELLED and s.trace_id == root} >= set(ROLES)
        ),
        30,
        "an otel_cancel.cancelled span from every deployment",
    )
    nodes = {
        (s.service, s.attributes.get(attributes.NODE))
        for s in lg_receiver.received.spans
        if s.name == attributes.SPAN_CANCELLED and s.trace_id == root
    }
    # The leaf names its node; a relay may have seen its RemoteGraph stream end first, and
    # then its run's own stop (no node running any more) is what it records.
    assert ("sub_sub_agent", "answer") in nodes and {service for service, _ in nodes} == set(ROLES)


async def test_cancel_by_thread_id_and_resume(lg_chain: ServerChain, lg_env: dict[str, str], top: Any) -> None:
    """`otel-cancel cancel --thread` stops every level; the same thread then resumes after its last completed step."""
    tag = f"thread-{uuid.uuid4().hex[:8]}"
    before = _interrupted_runs(lg_chain)
    thread_id, run_id, root = await _start(top, tag)
    await _leaf_token(lg_chain, tag)

    def labelled_in_ps() -> bool:
        rows = json.loads(_cli(lg_env, "ps", "--label", f"thread_id={thread_id}", "--json").stdout)
        return any(row["root"] == root and row["labels"].get("run_id") == run_id for row in rows)

    # The run's LangGraph ids are labels of its live work (published within a second).
    await _until(labelled_in_ps, 20, "the run listed by `ps --label thread_id=...`")
    sent, output = _cancel_cli(lg_env, "--thread", thread_id, "--reason", "user pressed stop")
    assert root in output
    await _every_level_stopped(lg_chain, tag, sent)
    assert await _status(top, thread_id, run_id) == "interrupted"
    await _every_run_interrupted(lg_chain, before)
    # The same thread resumes from its checkpoint: `prepare` completed, so it does not run again.
    assert len(lg_chain.lines("PREPARE", tag)) == 1
    # As `prepare`'s update: `guardrail` runs beside `agent`, and whether it had finished when the
    # cancel landed decides whether LangGraph could infer the node on its own.
    await top.threads.update_state(thread_id, {"tokens": 3}, as_node="prepare")
    resumed = await top.runs.wait(thread_id, "agent", input=None)
    assert resumed["prepared"] == 1 and resumed["produced"] > 0
    assert len(lg_chain.lines("PREPARE", tag)) == 1


async def test_a_label_given_at_the_edge_labels_every_level_and_cancel_all_by_label_stops_them(
    lg_chain: ServerChain, lg_env: dict[str, str]
) -> None:
    """A label the edge took from a request header travels with the runs below; `cancel --all --label` stops all."""
    tag, tenant = f"label-{uuid.uuid4().hex[:8]}", f"acme-{uuid.uuid4().hex[:8]}"
    before = _interrupted_runs(lg_chain)
    async with langgraph_sdk.get_client(url=lg_chain.top.url, headers={"x-tenant-id": tenant}) as client:
        thread = await client.threads.create()
        run = await client.runs.create(thread["thread_id"], "agent", input=_input(tag))
        root = run["metadata"]["otel_cancel_root"]
        await _leaf_token(lg_chain, tag)

        def labelled_at_every_level() -> bool:
            rows = json.loads(_cli(lg_env, "ps", "--label", f"tenant={tenant}", "--json").stdout)
            return {row["service"] for row in rows if row["root"] == root} == set(ROLES)

        await _until(labelled_at_every_level, 20, "every level listed by `ps --label tenant=...`")
        result = _cli(lg_env, "cancel", "--all", "--label", f"tenant={tenant}", "--json")
        assert result.returncode == 0, result.stderr
        sent = int(json.loads(result.stdout.splitlines()[0])["bulk"]["cutoff"])
        await _every_level_stopped(lg_chain, tag, sent)
        assert await _status(client, thread["thread_id"], run["run_id"]) == "interrupted"
    await _every_run_interrupted(lg_chain, before)


async def test_a_queued_run_is_found_by_its_run_and_thread_ids_and_never_starts_once_cancelled(
    lg_chain: ServerChain, lg_env: dict[str, str], top: Any
) -> None:
    """A run still pending behind another is the thread's latest: `--thread` names it, `cancel --run` stops it."""
    tag = f"queued-{uuid.uuid4().hex[:8]}"
    thread_id, _, running_root = await _start(top, f"{tag}-a")
    await _leaf_token(lg_chain, f"{tag}-a")
    queued = await top.runs.create(thread_id, "agent", input=_input(f"{tag}-b", tokens=3), multitask_strategy="enqueue")
    queued_root = queued["metadata"]["otel_cancel_root"]
    assert (await top.runs.get(thread_id, queued["run_id"]))["status"] == "pending"
    by_thread = _cli(lg_env, "status", "--thread", thread_id, "--json")
    assert by_thread.returncode == 0 and json.loads(by_thread.stdout)["root"] == queued_root, by_thread.stderr
    _, output = _cancel_cli(lg_env, "--run", queued["run_id"])
    assert queued_root in output
    sent, _ = _cancel_cli(lg_env, running_root)
    await _every_level_stopped(lg_chain, f"{tag}-a", sent)
    # Refused when a worker picks it up: it ends interrupted without running a node.
    assert await _status(top, thread_id, queued["run_id"]) == "interrupted"
    assert lg_chain.lines("START", f"{tag}-b") == []


async def test_runs_cancel_on_the_supervisor_stops_every_level(
    lg_chain: ServerChain, lg_env: dict[str, str], top: Any
) -> None:
    """LangGraph's own runs.cancel on the supervisor stops the sub-runs it created through RemoteGraph."""
    tag = f"runs-cancel-{uuid.uuid4().hex[:8]}"
    before = _interrupted_runs(lg_chain)
    thread_id, run_id, root = await _start(top, tag)
    await _leaf_token(lg_chain, tag)
    sent = time.time_ns()
    await top.runs.cancel(thread_id, run_id)
    await _every_level_stopped(lg_chain, tag, sent)
    assert await _status(top, thread_id, run_id) == "interrupted"
    await _every_run_interrupted(lg_chain, before)
    status = _cli(lg_env, "status", root)
    assert "(reason: interrupt requested via POST" in status.stdout, status.stdout  # the reason LangGraph gave


async def test_client_disconnect_with_on_disconnect_cancel_stops_every_level(lg_chain: ServerChain, top: Any) -> None:
    """A client that drops its stream with on_disconnect="cancel" stops every level."""
    tag = f"disconnect-{uuid.uuid4().hex[:8]}"
    before = _interrupted_runs(lg_chain)
    thread = await top.threads.create()

    async def stream_until_leaf_tokens() -> None:
        async for _ in top.runs.stream(
            thread["thread_id"], "agent", input=_input(tag), stream_mode="values", on_disconnect="cancel"
        ):
            pass

    streaming = asyncio.create_task(stream_until_leaf_tokens())
    await _leaf_token(lg_chain, tag)
    sent = time.time_ns()
    streaming.cancel()  # the client goes away mid-stream
    with pytest.raises(asyncio.CancelledError):
        await streaming
    await _every_level_stopped(lg_chain, tag, sent)
    await _every_run_interrupted(lg_chain, before)


async def test_stream_ends_without_reconnecting_when_cancelled(
    lg_chain: ServerChain, lg_env: dict[str, str], top: Any
) -> None:
    """A client streaming the run sees its stream end when the root is cancelled (no reconnect to the finished run)."""
    tag = f"stream-{uuid.uuid4().hex[:8]}"
    thread = await top.threads.create()
    events: list[str] = []
    requests: list[tuple[str, str]] = []

    async def record(request: httpx.Request) -> None:
        requests.append((request.method, request.url.path))

    top.http.client.event_hooks["request"].append(record)

    async def stream() -> None:
        async for part in top.runs.stream(thread["thread_id"], "agent", input=_input(tag), stream_mode="values"):
            events.append(part.event)

    streaming = asyncio.create_task(stream())
    await _leaf_token(lg_chain, tag)
    root = (await top.runs.list(thread["thread_id"]))[0]["metadata"]["otel_cancel_root"]
    assert _cli(lg_env, "cancel", root).returncode == 0
    await asyncio.wait_for(streaming, 10)
    # One streaming request, and no reconnect (the SDK GETs the run's stream to reconnect).
    assert [(m, p) for m, p in requests if "stream" in p] == [("POST", f"/threads/{thread['thread_id']}/runs/stream")]
    runs = await top.runs.list(thread["thread_id"])
    assert [run["status"] for run in runs] == ["interrupted"]
    await _until(lambda: len(lg_chain.lines("END", tag)) >= len(ROLES), 10, f"every level of {tag} to end")
    assert dict(lg_chain.lines("END", tag))["sub_sub_agent"][1] == "stopped"


async def test_sync_node_stops_at_check(lg_chain: ServerChain, lg_env: dict[str, str]) -> None:
    """A run whose node never awaits stops at otel_cancel.check(); `cancel --run` finds its root."""
    tag = f"sync-{uuid.uuid4().hex[:8]}"
    async with langgraph_sdk.get_client(url=lg_chain.leaf.url) as leaf:
        thread = await leaf.threads.create()
        run = await leaf.runs.create(thread["thread_id"], "sync_answer", input=_input(tag))
        await _leaf_token(lg_chain, tag, role="sync_answer")
        sent, _ = _cancel_cli(lg_env, "--run", run["run_id"])
        assert await _status(leaf, thread["thread_id"], run["run_id"]) == "interrupted"
    # The run ends as soon as its task is cancelled; the node's thread stops at its next check().
    await _until(lambda: lg_chain.lines("END", tag) != [], 10, "the sync node to stop")
    ends = lg_chain.lines("END", tag)
    assert [fields[1] for _, fields in ends] == ["stopped"]
    assert int(ends[0][1][0]) - sent < STOP_WITHIN_NS


async def test_edge_ignores_a_root_smuggled_in_config_metadata_or_baggage(lg_chain: ServerChain) -> None:
    """At the edge a client cannot attach a run to a root of its choosing (config, metadata or baggage)."""
    smuggled = uuid.uuid4().hex
    headers = {"baggage": f"otel_cancel.root={smuggled},otel_cancel.depth=0"}
    async with langgraph_sdk.get_client(url=lg_chain.top.url, headers=headers) as client:
        thread = await client.threads.create()
        run = await client.runs.create(
            thread["thread_id"],
            "agent",
            input=_input(f"smuggle-{uuid.uuid4().hex[:8]}", tokens=1),
            config={"configurable": {"__otel_cancel__": {"otel_cancel.root": smuggled, "otel_cancel.depth": "0"}}},
            metadata={"otel_cancel_root": smuggled},
        )
        root = run["metadata"]["otel_cancel_root"]
        assert root != smuggled and len(root) == 32
        await client.runs.join(thread["thread_id"], run["run_id"])
        stored = (await client.runs.get(thread["thread_id"], run["run_id"]))["kwargs"]["config"]["configurable"]
    assert stored["__otel_cancel__"]["otel_cancel.root"] == root


def test_cli_rejects_bad_and_unknown_langgraph_ids(lg_env: dict[str, str]) -> None:
    """A malformed thread id exits 2, an unknown run id exits 1, each with one line."""
    bad = _cli(lg_env, "cancel", "--thread", "not-a-uuid")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    unknown = _cli(lg_env, "status", "--run", str(uuid.uuid4()))
    assert unknown.returncode == 1 and "no LangGraph run" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    both = _cli(lg_env, "cancel", uuid.uuid4().hex, "--thread", str(uuid.uuid4()))
    assert both.returncode == 2


async def test_a2a_endpoint_carries_the_root_and_cancel_task_stops_every_level(lg_chain: ServerChain, top: Any) -> None:
    """/a2a/{assistant_id}: the run (created in-process) keeps the root; tasks/cancel stops every level."""
    assistant_id = (await top.assistants.search(graph_id="agent"))[0]["assistant_id"]
    url = f"{lg_chain.top.url}/a2a/{assistant_id}"
    tag = f"a2a-{uuid.uuid4().hex[:8]}"
    message = {"role": "user", "parts": [{"kind": "text", "text": f"{tag} tokens={TOKENS}"}], "messageId": tag}
    before = _interrupted_runs(lg_chain)
    async with httpx.AsyncClient(timeout=30) as http:
        task_id: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        roots: list[str] = []

        async def stream() -> None:
            body = {"jsonrpc": "2.0", "id": 1, "method": "message/stream", "params": {"message": message}}
            async with http.stream("POST", url, json=body, headers={"Accept": "text/event-stream"}) as response:
                roots.append(response.headers["otel-cancel-root"])
                async for line in response.aiter_lines():
                    if line.startswith("data:") and not task_id.done():
                        result = json.loads(line[5:]).get("result", {})
                        found = result.get("id") if result.get("kind") == "task" else result.get("taskId")
                        if found:
                            task_id.set_result(found)

        streaming = asyncio.create_task(stream())
        await _leaf_token(lg_chain, tag)
        assert {role: fields[1] for role, fields in lg_chain.lines("START", tag)} == dict.fromkeys(ROLES, roots[0])
        sent = time.time_ns()
        body = {"jsonrpc": "2.0", "id": 2, "method": "tasks/cancel", "params": {"id": await task_id}}
        answer = (await http.post(url, json=body, headers={"Accept": "application/json"})).json()
        assert answer["result"]["status"]["state"] == "canceled"
        await _every_level_stopped(lg_chain, tag, sent)
        await _every_run_interrupted(lg_chain, before)
        await asyncio.wait_for(streaming, 10)


async def test_rollback_deletes_the_top_run_and_interrupts_the_runs_below(lg_chain: ServerChain, top: Any) -> None:
    """runs.cancel(action="rollback"): the top run is rolled back (deleted), the runs below end interrupted."""
    tag = f"rollback-{uuid.uuid4().hex[:8]}"
    before = _interrupted_runs(lg_chain)
    thread_id, run_id, _ = await _start(top, tag)
    await _leaf_token(lg_chain, tag)
    sent = time.time_ns()
    await top.runs.cancel(thread_id, run_id, action="rollback")
    await _every_level_stopped(lg_chain, tag, sent)
    await _until(
        lambda: all(now > then for now, then in list(zip(_interrupted_runs(lg_chain), before, strict=True))[1:]),
        30,
        "the runs below the top one to end interrupted",
    )
    # LangGraph deletes a rolled-back run (and its checkpoints).
    assert [run["run_id"] for run in await top.runs.list(thread_id)] == []


@pytest.mark.parametrize("strategy", ["interrupt", "rollback"])
async def test_a_run_superseded_by_a_run_of_its_own_root_stops_alone(
    lg_chain: ServerChain, lg_env: dict[str, str], strategy: str
) -> None:
    """Below the edge, a run replaced (interrupt/rollback) by a run of its own root stops alone: no flag is written."""
    tag, root = f"supersede-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    headers = {"baggage": f"otel_cancel.root={root},otel_cancel.depth=1"}
    async with langgraph_sdk.get_client(url=lg_chain.leaf.url, headers=headers) as leaf:
        thread_id = (await leaf.threads.create())["thread_id"]
        first = await leaf.runs.create(thread_id, "agent", input=_input(f"{tag}-a"))
        await _leaf_token(lg_chain, f"{tag}-a")
        second = await leaf.runs.create(
            thread_id, "agent", input=_input(f"{tag}-b", tokens=3), multitask_strategy=strategy
        )
        assert first["metadata"]["otel_cancel_root"] == second["metadata"]["otel_cancel_root"] == root
        assert await _status(leaf, thread_id, second["run_id"]) == "success"
    assert [fields[1] for _, fields in lg_chain.lines("END", f"{tag}-b")] == ["done"]
    assert [fields[1] for _, fields in lg_chain.lines("END", f"{tag}-a")] == ["stopped"]
    assert _cli(lg_env, "status", root).stdout.strip() == f"{root} is not cancelled"


async def test_a_run_superseded_at_the_edge_stops_every_level_below_it(lg_chain: ServerChain, top: Any) -> None:
    """At the edge the replacing run has a root of its own: the replaced run's root is cancelled at every level."""
    tag = f"supersede-edge-{uuid.uuid4().hex[:8]}"
    thread_id, _, root = await _start(top, tag)
    await _leaf_token(lg_chain, tag)
    sent = time.time_ns()
    second = await top.runs.create(
        thread_id, "agent", input=_input(f"{tag}-b", tokens=1), multitask_strategy="interrupt"
    )
    assert second["metadata"]["otel_cancel_root"] != root
    await _every_level_stopped(lg_chain, tag, sent)
    assert await _status(top, thread_id, second["run_id"]) == "success"


async def test_cancel_many_stops_every_level_of_every_run(lg_chain: ServerChain, top: Any) -> None:
    """runs.cancel_many on the runs of two threads stops every level of both."""
    tags = [f"many-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    started = [await _start(top, tag) for tag in tags]
    for tag in tags:
        await _leaf_token(lg_chain, tag)
    sent = time.time_ns()
    for thread_id, run_id, _ in started:
        await top.runs.cancel_many(thread_id=thread_id, run_ids=[run_id])
    for tag in tags:
        await _every_level_stopped(lg_chain, tag, sent)
    for thread_id, run_id, _ in started:
        assert await _status(top, thread_id, run_id) == "interrupted"


def test_demo_langgraph_server_cancels_three_ways_and_lists_every_depth() -> None:
    """`otel-cancel demo --langgraph-server` exits 0: by root, runs.cancel and a disconnect each stop every depth."""
    env = {k: v for k, v in os.environ.items() if k != "OTEL_CANCEL_ETCD_ENDPOINTS"}
    result = subprocess.run(
        [sys.executable, "-m", "otel_cancel", "demo", "--langgraph-server", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    scenarios = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [s["scenario"] for s in scenarios] == [
        "cancelled midway by otel-cancel cancel ROOT",
        "cancelled midway by client.runs.cancel on the supervisor",
        "cancelled midway by a client disconnect",
    ]
    for scenario in scenarios:
        assert [(row["depth"], row["service"]) for row in scenario["stopped"]] == list(enumerate(ROLES))
        assert scenario["stopped"][-1]["interrupted"] == "answer"


async def test_guardrail_stops_the_whole_run_with_langgraphs_own_cancel(lg_chain: ServerChain, top: Any) -> None:
    """The supervisor's guardrail (runs.cancel on its own run, in-process) stops every level."""
    tag = f"guardrail-{uuid.uuid4().hex[:8]}"
    thread = await top.threads.create()
    run = await top.runs.create(thread["thread_id"], "agent", input=_input(tag, prompt="please exfiltrate the keys"))
    assert await _status(top, thread["thread_id"], run["run_id"]) == "interrupted"
    assert lg_chain.lines("GUARDRAIL", tag) != []
    # Every level the run reached before the guardrail tripped stops (none runs to its end).
    started = {role for role, _ in lg_chain.lines("START", tag)}
    await _until(lambda: {role for role, _ in lg_chain.lines("END", tag)} >= started, 10, "the started levels to stop")
    assert {fields[1] for _, fields in lg_chain.lines("END", tag)} <= {"stopped"}


async def test_a_request_deadline_travels_with_the_run_and_stops_every_level(lg_chain: ServerChain) -> None:
    """A run created with an otel-cancel-timeout header stops at every level when that deadline passes."""
    tag = f"deadline-{uuid.uuid4().hex[:8]}"
    async with langgraph_sdk.get_client(url=lg_chain.top.url, headers={"otel-cancel-timeout": "4s"}) as client:
        thread = await client.threads.create()
        created = time.time_ns()
        run = await client.runs.create(thread["thread_id"], "agent", input=_input(tag))
        assert await _status(client, thread["thread_id"], run["run_id"]) == "interrupted"
    await _until(lambda: len(lg_chain.lines("END", tag)) >= len(ROLES), 10, f"every level of {tag} to end")
    leaf_end = next(int(fields[0]) for role, fields in lg_chain.lines("END", tag) if role == "sub_sub_agent")
    # Stopped by the deadline (4 s after the request), long before its 20 s of work.
    assert 3.9e9 < leaf_end - created < 6e9


async def test_a_dropped_stream_with_langgraphs_default_lets_the_run_go_on(lg_chain: ServerChain, top: Any) -> None:
    """With LangGraph's default on_disconnect="continue", a client leaving the stream stops nothing."""
    tag = f"continue-{uuid.uuid4().hex[:8]}"
    thread = await top.threads.create()

    async def stream() -> None:
        async for _ in top.runs.stream(thread["thread_id"], "agent", input=_input(tag, tokens=40)):
            pass

    streaming = asyncio.create_task(stream())
    await _leaf_token(lg_chain, tag)
    streaming.cancel()
    with pytest.raises(asyncio.CancelledError):
        await streaming
    await _until(lambda: len(lg_chain.lines("END", tag)) >= len(ROLES), 30, f"every level of {tag} to end")
    assert {role: fields[1] for role, fields in lg_chain.lines("END", tag)} == dict.fromkeys(ROLES, "done")
    (run,) = await top.runs.list(thread["thread_id"])
    assert await _status(top, thread["thread_id"], run["run_id"]) == "success"
