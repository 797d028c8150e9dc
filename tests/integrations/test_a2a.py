"""A2A agents (a2a-sdk) as real processes: cancel-task becomes a distributed cancel.

The chain is examples/a2a_chain under opentelemetry-instrument: a supervisor (two
replicas) -> a sub-agent (two replicas) -> a sub-sub-agent, each an A2A server
whose LangGraph graph streams fake-model tokens as artifact chunks.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import aetcd
import httpx
import pytest
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
)
from a2a.types import TaskState as State

from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest, Receipt, TaskRecord
from otel_cancel._core.root import random_root
from otel_cancel.cli.fleet import ps_rows
from otel_cancel.demo import ExampleChain
from otel_cancel.demo.a2a import a2a_client, task_id_of
from otel_cancel.store._keys import task_key
from otel_cancel.store.etcd import EtcdCancelStore, parse_endpoint
from otel_cancel.testing import EtcdServer, unique_prefix, wait_for_output

pytestmark = pytest.mark.anyio

EVENT_TIMEOUT = 30
T = TypeVar("T")
_EMITTED = re.compile(r"model (\w+) emitted (\d+)/(\d+) tokens")


@pytest.fixture(scope="module")
def a2a_chain(etcd: EtcdServer) -> Iterator[ExampleChain]:
    """The A2A example chain, shared by this module's tests (each test runs its own tasks)."""
    env = {
        "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
        "OTEL_CANCEL_PREFIX": unique_prefix(),
        "OTEL_CANCEL_WATCHDOG_SECONDS": "1",
    }
    replicas = {"supervisor": 2, "sub-agent": 2, "sub-sub-agent": 1}
    chain = ExampleChain(env, replicas=replicas, app="examples.a2a_chain.app:app")
    try:
        yield chain.start()
    finally:
        chain.stop()


def _message(text: str) -> SendMessageRequest:
    return SendMessageRequest(
        message=Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=[Part(text=text)])
    )


def _tokens_from(event: StreamResponse, agent: str) -> int:
    if not event.HasField("artifact_update"):
        return 0
    artifact = event.artifact_update.artifact
    return len(artifact.parts) if artifact.metadata["agent"] == agent else 0


def _model_reports(chain: ExampleChain, role: str, since: dict[int, int]) -> list[tuple[int, int]]:
    """``(emitted, total)`` of every fake-model stop that ``role`` logged after ``since``."""
    reports = []
    for index, process in enumerate(chain.processes):
        for line in process.lines[since.get(index, 0) :]:
            match = _EMITTED.search(line)
            if match and match.group(1) == role:
                reports.append((int(match.group(2)), int(match.group(3))))
    return reports


def _marks(chain: ExampleChain) -> dict[int, int]:
    return {index: len(process.lines) for index, process in enumerate(chain.processes)}


async def _await_leaf_stopped(chain: ExampleChain, since: dict[int, int]) -> tuple[int, int]:
    await asyncio.to_thread(
        wait_for_output,
        lambda: bool(_model_reports(chain, "sub_sub_agent", since)),
        EVENT_TIMEOUT,
        "the sub-sub-agent's model reported",
    )
    ((emitted, total),) = _model_reports(chain, "sub_sub_agent", since)
    return emitted, total


async def _stream_until_leaf_tokens(events: AsyncIterator[StreamResponse], count: int) -> tuple[str, int]:
    """Read the stream until the sub-sub-agent's ``count``-th token; return the task id and tokens seen."""
    task_id, seen = "", 0
    async for event in events:
        task_id = task_id or task_id_of(event)
        seen += _tokens_from(event, "sub_sub_agent")
        if seen >= count:
            return task_id, seen
    raise AssertionError(f"the stream ended after {seen} sub-sub-agent tokens")


async def _rest_of(events: AsyncIterator[StreamResponse]) -> list[StreamResponse]:
    async with asyncio.timeout(EVENT_TIMEOUT):
        return [event async for event in events]


def _no_tracebacks(chain: ExampleChain, since: dict[int, int]) -> None:
    for index, process in enumerate(chain.processes):
        new = process.lines[since.get(index, 0) :]
        assert not [line for line in new if "Traceback" in line], "\n".join(new[-40:])


async def test_cancel_task_on_the_supervisor_stops_the_sub_sub_agent_and_reports_canceled(a2a_chain):
    """CancelTask on the supervisor stops the leaf's model; the task and its stream end `canceled` with the reason."""
    since = _marks(a2a_chain)
    supervisor = a2a_chain.urls["supervisor"][0]
    async with a2a_client(supervisor) as client:
        events = client.send_message(_message("hello over a2a"))
        task_id, _ = await _stream_until_leaf_tokens(events, 5)
        cancel = CancelTaskRequest(id=task_id)
        cancel.metadata.update({"reason": "user pressed stop"})
        answered = await client.cancel_task(cancel)
        rest = await _rest_of(events)
        stored = await client.get_task(GetTaskRequest(id=task_id))
    assert answered.status.state == State.TASK_STATE_CANCELED
    assert answered.status.message.parts[0].text == "cancelled: user pressed stop"
    # The caller's stream ends by itself, its last event saying canceled (with the reason).
    assert rest and rest[-1].HasField("status_update"), rest
    assert rest[-1].status_update.status.state == State.TASK_STATE_CANCELED
    assert rest[-1].status_update.status.message.metadata["otel_cancel.reason"] == "user pressed stop"
    assert stored.status.state == State.TASK_STATE_CANCELED
    emitted, total = await _await_leaf_stopped(a2a_chain, since)
    assert 5 <= emitted < total
    _no_tracebacks(a2a_chain, since)


async def test_cancel_task_on_a_replica_not_running_the_task_still_stops_it(a2a_chain):
    """CancelTask sent to the other supervisor replica finds the task's root in etcd and stops it where it runs."""
    since = _marks(a2a_chain)
    running_here, elsewhere = a2a_chain.urls["supervisor"]
    async with a2a_client(running_here) as client, a2a_client(elsewhere) as other_replica:
        events = client.send_message(_message("cancelled from elsewhere"))
        task_id, _ = await _stream_until_leaf_tokens(events, 5)
        answered = await other_replica.cancel_task(CancelTaskRequest(id=task_id))
        rest = await _rest_of(events)
        stored = await client.get_task(GetTaskRequest(id=task_id))
    assert answered.id == task_id and answered.status.state == State.TASK_STATE_CANCELED
    assert answered.status.message.parts[0].text == "cancelled: a2a cancel-task"
    assert rest[-1].status_update.status.state == State.TASK_STATE_CANCELED
    assert stored.status.state == State.TASK_STATE_CANCELED
    emitted, total = await _await_leaf_stopped(a2a_chain, since)
    assert 5 <= emitted < total
    _no_tracebacks(a2a_chain, since)


async def test_a_streaming_call_cancelled_by_its_root_ends_cleanly(a2a_chain):
    """Cancelling the stream's root (its otel-cancel-root header) ends the caller's stream with a canceled event."""
    since = _marks(a2a_chain)
    responses: list[httpx.Response] = []
    async with a2a_client(a2a_chain.urls["supervisor"][1], responses) as client:
        events = client.send_message(_message("cancelled by root"))
        await _stream_until_leaf_tokens(events, 3)
        root = responses[-1].headers["otel-cancel-root"]
        await _cancel_root(a2a_chain, root)
        rest = await _rest_of(events)
    final = rest[-1].status_update.status
    assert final.state == State.TASK_STATE_CANCELED and final.message.metadata["otel_cancel.root"] == root
    emitted, total = await _await_leaf_stopped(a2a_chain, since)
    assert 3 <= emitted < total
    _no_tracebacks(a2a_chain, since)


def _store(chain: ExampleChain) -> EtcdCancelStore:
    return EtcdCancelStore(chain.env["OTEL_CANCEL_ETCD_ENDPOINTS"].split(","), prefix=chain.env["OTEL_CANCEL_PREFIX"])


async def _cancel_root(chain: ExampleChain, root: str) -> None:
    """Write the flag for ``root`` as an operator would (on the IO loop, like the library)."""

    async def write() -> None:
        store = _store(chain)
        try:
            await store.create_flag(CancelRequest.new(root, "operator", "tests"), 60)
        finally:
            await store.close()

    await io_loop().call(write())


async def _task_record(chain: ExampleChain, task_id: str) -> TaskRecord | None:
    async def read() -> TaskRecord | None:
        store = _store(chain)
        try:
            return await store.get_task(task_id)
        finally:
            await store.close()

    return await io_loop().call(read())


async def _await_key_deleted(chain: ExampleChain, key: str) -> None:
    """Watch ``key`` until etcd reports it deleted (returns at once if it is already gone)."""

    async def watch() -> None:
        host, port = parse_endpoint(chain.env["OTEL_CANCEL_ETCD_ENDPOINTS"].split(",")[0])
        async with aetcd.Client(host, port) as client:
            found = await client.get(key.encode())
            if found is None:
                return
            events = await client.watch(key.encode(), start_revision=found.mod_revision + 1)
            try:
                async for event in events:
                    if event.kind == "DELETE":
                        return
            finally:
                await events.cancel()

    await io_loop().call(asyncio.wait_for(watch(), EVENT_TIMEOUT))


async def test_a_late_hop_gets_a_canceled_task_not_a_409(a2a_chain):
    """A message arriving with an already-cancelled root is answered with a task born `canceled`; no model runs."""
    since = _marks(a2a_chain)
    root = random_root()
    await _cancel_root(a2a_chain, root)
    leaf = a2a_chain.urls["sub-sub-agent"][0]  # an internal service: it trusts the incoming root
    payload = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "SendMessage",
        "params": {"message": {"messageId": uuid.uuid4().hex, "role": "ROLE_USER", "parts": [{"text": "late"}]}},
    }
    headers = {"baggage": f"otel_cancel.root={root},otel_cancel.depth=2", "A2A-Version": "1.0"}
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT) as http:
        response = await http.post(f"{leaf}/", json=payload, headers=headers)
    assert response.status_code == 200, response.text
    task = response.json()["result"]["task"]
    assert task["status"]["state"] == "TASK_STATE_CANCELED", task
    assert task["status"]["message"]["metadata"]["otel_cancel.root"] == root
    assert not _model_reports(a2a_chain, "sub_sub_agent", since)


async def test_cancel_task_for_unknown_or_hostile_ids_is_a_protocol_error(a2a_chain):
    """CancelTask for an unknown id, or one that could escape the key prefix, is an A2A error; the service lives on."""
    supervisor = a2a_chain.urls["supervisor"][0]
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT) as http:
        for task_id in (str(uuid.uuid4()), "../flags/x", "a" * 500, ""):
            payload = {"jsonrpc": "2.0", "id": 1, "method": "CancelTask", "params": {"id": task_id}}
            response = await http.post(f"{supervisor}/", json=payload, headers={"A2A-Version": "1.0"})
            assert response.status_code == 200, response.text
            assert "error" in response.json(), response.text
        assert (await http.get(f"{supervisor}/healthz")).status_code == 200


async def test_the_task_record_lives_while_the_task_runs(a2a_chain):
    """{prefix}tasks/{id} names the task's root while it runs and is gone once it completed."""
    responses: list[httpx.Response] = []
    async with a2a_client(a2a_chain.urls["sub-sub-agent"][0], responses) as client:
        events = client.send_message(_message("short"))
        task_id, _ = await _stream_until_leaf_tokens(events, 1)
        running = await _task_record(a2a_chain, task_id)
        rest = await _rest_of(events)
    assert running is not None and running.root == responses[-1].headers["otel-cancel-root"]
    assert running.service == "sub-sub-agent"
    assert rest[-1].status_update.status.state == State.TASK_STATE_COMPLETED
    await _await_key_deleted(a2a_chain, task_key(a2a_chain.env["OTEL_CANCEL_PREFIX"], task_id))


async def test_a_0_3_client_cancels_with_tasks_cancel(a2a_chain):
    """`tasks/cancel` from an A2A 0.3 client, sent to the replica not running the task, stops the run too."""
    since = _marks(a2a_chain)
    running_here, elsewhere = a2a_chain.urls["supervisor"]
    async with a2a_client(running_here) as client, httpx.AsyncClient(timeout=EVENT_TIMEOUT) as http:
        events = client.send_message(_message("cancelled by an old client"))
        task_id, _ = await _stream_until_leaf_tokens(events, 3)
        payload = {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tasks/cancel",
            "params": {"id": task_id, "metadata": {"reason": "0.3 client stop"}},
        }
        response = await http.post(f"{elsewhere}/", json=payload)
        rest = await _rest_of(events)
    assert response.status_code == 200, response.text
    status = response.json()["result"]["status"]
    assert status["state"] == "canceled", response.text
    assert status["message"]["parts"][0]["text"] == "cancelled: 0.3 client stop"
    assert rest[-1].status_update.status.state == State.TASK_STATE_CANCELED
    emitted, total = await _await_leaf_stopped(a2a_chain, since)
    assert 3 <= emitted < total


@pytest.fixture(scope="module")
def plain_a2a_chain(etcd: EtcdServer) -> Iterator[ExampleChain]:
    """The A2A chain whose agents call the next one with plain SendMessage (no streaming), one replica each."""
    env = {
        "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
        "OTEL_CANCEL_PREFIX": unique_prefix(),
        "NEXT_AGENT_STREAMING": "false",
    }
    chain = ExampleChain(env, replicas=1, app="examples.a2a_chain.app:app")
    try:
        yield chain.start()
    finally:
        chain.stop()


async def _await_value_under(chain: ExampleChain, key_prefix: str, accept: Callable[[bytes], T | None]) -> T:
    """Watch etcd under ``key_prefix`` until a value ``accept`` takes (returns not None); return what it made."""

    async def watch() -> T:
        host, port = parse_endpoint(chain.env["OTEL_CANCEL_ETCD_ENDPOINTS"].split(",")[0])
        async with aetcd.Client(host, port) as client:
            current = await client.get_prefix(key_prefix.encode())
            for kv in current:
                if (taken := accept(kv.value)) is not None:
                    return taken
            events = await client.watch_prefix(key_prefix.encode(), start_revision=current.header.revision + 1)
            try:
                async for event in events:
                    if event.kind == "PUT" and (taken := accept(event.kv.value)) is not None:
                        return taken
            finally:
                await events.cancel()
        raise AssertionError(f"the watch on {key_prefix} ended")

    return await io_loop().call(asyncio.wait_for(watch(), EVENT_TIMEOUT))


def _task_record_of(service: str) -> Callable[[bytes], TaskRecord | None]:
    def accept(value: bytes) -> TaskRecord | None:
        record = TaskRecord.from_json(value)
        return record if record.service == service else None

    return accept


def _receipt_of(service: str) -> Callable[[bytes], Receipt | None]:
    def accept(value: bytes) -> Receipt | None:
        receipt = Receipt.from_json(value)
        return receipt if receipt.service == service else None

    return accept


async def test_plain_send_message_hops_carry_the_root_and_cancel_task_stops_the_leaf(plain_a2a_chain):
    """Through two plain SendMessage hops the leaf runs under the supervisor's root; cancel-task stops it."""
    since = _marks(plain_a2a_chain)
    responses: list[httpx.Response] = []
    async with a2a_client(plain_a2a_chain.urls["supervisor"][0], responses) as client:
        events = client.send_message(_message("plain hops"))
        first = await anext(events)
        prefix = plain_a2a_chain.env["OTEL_CANCEL_PREFIX"]
        leaf_record = await _await_value_under(plain_a2a_chain, f"{prefix}tasks/", _task_record_of("sub-sub-agent"))
        root = responses[0].headers["otel-cancel-root"]
        assert leaf_record.root == root  # the root travelled supervisor -> sub-agent -> leaf, no streaming
        answered = await client.cancel_task(CancelTaskRequest(id=task_id_of(first)))
        rest = await _rest_of(events)
    assert answered.status.state == State.TASK_STATE_CANCELED
    assert rest[-1].status_update.status.state == State.TASK_STATE_CANCELED
    # The leaf's execution was live (its record was there): the cancel stopped it, and it says so.
    receipt = await _await_value_under(plain_a2a_chain, f"{prefix}acks/{root}/", _receipt_of("sub-sub-agent"))
    assert receipt.tasks >= 1 and receipt.depth == 2
    _no_tracebacks(plain_a2a_chain, since)


async def test_a2a_task_and_context_ids_label_the_run_and_select_it_for_a_bulk_cancel(a2a_chain):
    """The supervisor's live work carries the task's task_id and context_id; --all --label task_id=T stops it."""

    async def rows_for(task_id: str) -> list[dict]:
        async def read() -> list[dict]:
            store = _store(a2a_chain)
            try:
                return ps_rows(await store.list_live(), None, [("task_id", task_id)])
            finally:
                await store.close()

        return await io_loop().call(read())

    async with a2a_client(a2a_chain.urls["supervisor"][0]) as client:
        events = client.send_message(_message("label me"))
        task_id, _ = await _stream_until_leaf_tokens(events, 3)
        async with asyncio.timeout(EVENT_TIMEOUT):
            while not (rows := await rows_for(task_id)):
                await asyncio.sleep(0.05)  # a poll of etcd, re-read each time
        (row,) = rows
        assert row["service"] == "supervisor" and row["labels"]["context_id"]
        cancel = await asyncio.to_thread(
            _run_cli, a2a_chain, "cancel", "--all", "--label", f"task_id={task_id}", "--reason", "by label"
        )
        assert cancel.returncode == 0, cancel.stderr
        rest = await _rest_of(events)
    assert rest[-1].status_update.status.state == State.TASK_STATE_CANCELED
    assert rest[-1].status_update.status.message.metadata["otel_cancel.reason"] == "by label"


def _run_cli(chain: ExampleChain, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``otel-cancel ARGS`` against the chain's etcd and prefix."""
    return subprocess.run(
        [sys.executable, "-m", "otel_cancel", *args],
        env={**os.environ, **chain.env},
        capture_output=True,
        text=True,
        timeout=EVENT_TIMEOUT,
    )
