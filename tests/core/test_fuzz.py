"""Hostile input, generated: baggage, foreign values under the prefix, receipts, CLI arguments.

Nothing crashes a service; each bad input is ignored with (at most) one log line
or refused with a clear message. One service process and one watcher serve every
example of their test. The number of inputs each test tried is printed at the end
of the module (run with ``-s`` to see it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import string
import threading
from collections import Counter
from collections.abc import Iterator
from unittest import mock

import aetcd
import httpx
import pytest
from chain import Chain
from debug_service import EVENT_TIMEOUT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import otel_cancel
from otel_cancel import cli
from otel_cancel import environment_variables as env
from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest, Receipt
from otel_cancel._core.root import is_valid_root, random_root
from otel_cancel.store.etcd import EtcdCancelStore, parse_endpoint
from otel_cancel.testing import configured, free_port, unique_prefix

TRIED: Counter[str] = Counter()


def examples(count: int) -> settings:
    """Hypothesis settings: ``count`` examples, no per-example deadline (real processes answer).

    Function-scoped fixtures (the autouse runtime reset, the watcher) are set up once
    around all the examples of a test, which is what these tests want.
    """
    return settings(max_examples=count, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def _report_inputs_tried() -> Iterator[None]:
    yield
    print("\ninputs tried:", dict(TRIED), f"(total {sum(TRIED.values())})")


# -- baggage sent to a real service ------------------------------------------------------------

header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"))
baggage_value = st.one_of(
    st.just(""),
    st.builds(random_root),
    st.text(alphabet=string.hexdigits, max_size=40),
    st.integers(-(10**20), 10**20).map(str),
    header_text.map(lambda text: text[:200]),
    st.sampled_from(["%", "%zz", "%00", "%E2%80%AE", "=", ";", ",", "\t", "0" * 32, "A" * 32]),
)
baggage_entry = st.builds(
    lambda key, value, properties: f"{key}={value}{properties}",
    st.one_of(
        st.sampled_from(["otel_cancel.root", "otel_cancel.depth", "otel_cancel.sig", "otel_cancel.deadline"]),
        st.text(alphabet=string.ascii_letters + "._-", min_size=1, max_size=20),
    ),
    baggage_value,
    st.sampled_from(["", ";p", ";p=v", ";;", ";=" * 3]),
)
baggage_header = st.one_of(
    st.lists(baggage_entry, max_size=12).flatmap(
        lambda entries: st.sampled_from([",", ", ", ",,", ";"]).map(lambda sep: sep.join(entries))
    ),
    header_text.map(lambda text: text[:300]),
    st.integers(8000, 12000).map(lambda size: "otel_cancel.root=" + "a" * size),  # around the 8,192-byte limit
    st.lists(baggage_entry, min_size=300, max_size=400).map(",".join),  # many entries, over the limits
)


@pytest.fixture(scope="module")
def services(etcd) -> Iterator[dict[str, tuple[str, object]]]:
    """An edge and an internal service (debug_app), reused by every example."""
    env_vars = {
        "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
        "OTEL_CANCEL_PREFIX": unique_prefix(),
        "OTEL_CANCEL_STARTUP_WAIT_SECONDS": str(EVENT_TIMEOUT),
    }
    chain = Chain().start(env_vars, levels=("A", "B"), replicas=1, module="debug_app")
    try:
        yield {"edge": chain.levels[0][0], "internal": chain.levels[1][0]}
    finally:
        chain.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=EVENT_TIMEOUT) as client:
        yield client


@examples(150)
@given(headers=st.lists(baggage_header, min_size=1, max_size=3), target=st.sampled_from(["edge", "internal"]))
def test_hostile_baggage_never_fails_a_request(services, http, headers, target):
    """Any baggage (malformed, oversized, forged, repeated) gets a normal answer with a valid root of its own."""
    TRIED["baggage headers"] += 1
    url, _ = services[target]
    # HTTP trims a value's outer whitespace (h11 refuses to send it untrimmed).
    sent = [("baggage", value.strip(" \t").encode("latin-1")) for value in headers]
    response = http.get(f"{url}/ping", headers=sent)
    # 504: a well-formed deadline in the past (a refusal the design asks for); never a 5xx of ours.
    assert response.status_code in (200, 504), response.text
    assert is_valid_root(response.headers["otel-cancel-root"])
    if target == "edge":  # an edge never takes a root from its caller
        assert response.headers["otel-cancel-root"] not in " ".join(headers)


def test_after_the_baggage_fuzz_the_services_are_alive_and_logged_at_most_once_per_kind(services, http):
    """The fuzzed services still serve, their registries are empty, and bad baggage was logged once per kind at most."""
    for url, process in services.values():
        assert http.get(f"{url}/ping").status_code == 200
        assert http.get(f"{url}/debug/state").json()["live_scopes"] == 0
        assert not [line for line in process.lines if "Traceback" in line or line.startswith("ERROR")]
        # Rate-limited: one line per kind of bad input (a minute apart at most), however many came.
        kinds = Counter(
            " ".join(word for word in line.split(":", 1)[1].split() if word.isalpha())
            for line in process.lines
            if line.startswith("WARNING otel_cancel.incoming")
        )
        assert all(count == 1 for count in kinds.values()), kinds


# -- foreign values under the flags prefix, while a watcher runs -------------------------------

huge = st.integers(64 * 1024 + 1, 256 * 1024).map(lambda size: b'{"root": "' + b"a" * size + b'"}')
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
near_flag = st.fixed_dictionaries(
    {},
    optional={
        "root": st.one_of(st.builds(random_root), st.text(max_size=40), st.integers()),
        "reason": st.one_of(st.text(max_size=600), st.integers(), st.none()),
        "requested_at": st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.floats()),
        "requested_by": st.one_of(st.text(max_size=20), st.lists(st.integers(), max_size=2)),
    },
)
foreign_value = st.one_of(
    st.binary(max_size=300),
    huge,
    json_values.map(lambda value: json.dumps(value).encode()),
    near_flag.map(lambda value: json.dumps(value).encode()),
)
foreign_key = st.one_of(
    st.builds(random_root),
    st.text(max_size=60),
    st.sampled_from(["", "/", "../acks", random_root().upper(), "0" * 32, random_root() + "/x"]),
)


class _App:
    """An application event loop on a thread of its own: scopes live here, as in a service."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def hold(self, root: str) -> concurrent.futures.Future[BaseException | None]:
        """A scope for ``root`` is entered before this returns; the future says how it ended."""
        entered = threading.Event()

        async def work() -> BaseException | None:
            try:
                async with otel_cancel.scope(root=root):
                    entered.set()
                    await asyncio.Event().wait()
            except otel_cancel.Cancelled as error:
                return error
            return None

        future = asyncio.run_coroutine_threadsafe(work(), self.loop)
        assert entered.wait(EVENT_TIMEOUT)
        return future

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(EVENT_TIMEOUT)
        self.loop.close()


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def watching(etcd) -> Iterator[tuple[object, str, _App, _Recorder]]:
    """A configured runtime watching a fresh prefix, an application loop, and the watcher's warnings."""
    prefix = unique_prefix()
    recorder = _Recorder()
    watcher_log = logging.getLogger("otel_cancel.watcher")
    watcher_log.addHandler(recorder)
    app = _App()
    try:
        with configured(endpoints=(etcd.endpoint,), prefix=prefix) as runtime:
            runtime.start()
            assert runtime.watcher.wait_connected(True, EVENT_TIMEOUT)
            yield runtime, prefix, app, recorder
    finally:
        app.close()
        watcher_log.removeHandler(recorder)


def _expected_warning(prefix: str, key: str, value: bytes) -> bool:
    """Whether the watcher should log this put: its key names no root, or its value is not that root's flag."""
    suffix = key.removeprefix(f"{prefix}flags/")
    if not is_valid_root(suffix):
        return True
    try:
        CancelRequest.from_json(value, suffix)
    except ValueError:
        return True
    return False


@examples(100)
@given(key=foreign_key, value=foreign_value)
def test_foreign_values_under_the_flags_prefix_are_logged_once_and_real_flags_still_apply(watching, etcd, key, value):
    """A put by someone else under flags/ costs one log line at most; the next real flag still stops its work."""
    TRIED["foreign flag values"] += 1
    runtime, prefix, app, recorder = watching
    root = random_root()
    held = app.hold(root)
    reconnects, listings, warnings = runtime.watcher.reconnects, runtime.watcher.listings, len(recorder.messages)
    full_key = f"{prefix}flags/{key}"

    async def put_then_cancel() -> None:
        host, port = parse_endpoint(etcd.endpoint)
        async with aetcd.Client(host, port) as client:
            await client.put(full_key.encode("utf-8", "surrogatepass"), value)
        store = EtcdCancelStore([etcd.endpoint], prefix=prefix)
        try:
            await store.create_flag(CancelRequest.new(root, "real", "tests"), 60)
        finally:
            await store.close()

    io_loop().submit(put_then_cancel()).result(EVENT_TIMEOUT)
    ended = held.result(EVENT_TIMEOUT)
    assert isinstance(ended, otel_cancel.Cancelled) and ended.root == root
    # The watcher applies in revision order: the foreign put was handled before the real flag.
    new_warnings = recorder.messages[warnings:]
    assert len(new_warnings) == (1 if _expected_warning(prefix, full_key, value) else 0), new_warnings
    assert (runtime.watcher.reconnects, runtime.watcher.listings) == (reconnects, listings)


# -- receipts ----------------------------------------------------------------------------------

near_receipt = st.fixed_dictionaries(
    {},
    optional={
        "root": st.one_of(st.builds(random_root), st.text(max_size=40), st.none()),
        "service": st.one_of(st.text(max_size=30), st.integers(), st.none()),
        "instance": st.one_of(st.text(max_size=30), st.lists(st.text(), max_size=2)),
        "depth": st.one_of(st.integers(), st.booleans(), st.floats(), st.text(max_size=3)),
        "seen_at": st.one_of(st.integers(), st.none(), st.text(max_size=3)),
        "stopped_at": st.one_of(st.integers(), st.none(), st.floats()),
        "requested_at": st.one_of(st.integers(), st.text(max_size=3)),
        "interrupted": st.one_of(st.lists(st.one_of(st.text(max_size=10), st.integers()), max_size=5), st.text()),
        "tasks": st.one_of(st.integers(), st.none()),
        "reason": st.one_of(st.text(max_size=700), st.integers()),
    },
)
receipt_bytes = st.one_of(
    st.binary(max_size=300),
    huge,
    json_values.map(lambda value: json.dumps(value).encode()),
    near_receipt.map(lambda value: json.dumps(value).encode()),
)


@examples(1000)
@given(raw=receipt_bytes)
def test_receipt_and_flag_parsing_raise_nothing_but_value_error(raw):
    """Receipt.from_json and CancelRequest.from_json either parse or raise ValueError, whatever the bytes."""
    TRIED["receipt and flag values parsed"] += 1
    for parse in (Receipt.from_json, CancelRequest.from_json):
        try:
            parsed = parse(raw)
        except ValueError:
            continue
        assert is_valid_root(parsed.root)


@examples(30)
@given(garbage=st.lists(receipt_bytes, min_size=1, max_size=4))
def test_list_receipts_skips_garbage_and_returns_every_real_receipt(etcd, garbage):
    """Garbage under acks/{root}/ is skipped; the real receipts beside it all come back."""
    TRIED["receipt listings with garbage"] += 1
    prefix, root = unique_prefix(), random_root()
    real = [Receipt(root, "svc", f"i{index}", index, 1, 2, 0) for index in range(2)]

    async def write_and_list() -> list[Receipt]:
        store = EtcdCancelStore([etcd.endpoint], prefix=prefix)
        host, port = parse_endpoint(etcd.endpoint)
        try:
            async with aetcd.Client(host, port) as client:
                for index, value in enumerate(garbage):
                    await client.put(f"{prefix}acks/{root}/garbage/{index}".encode(), value)
            for receipt in real:
                await store.put_receipt(receipt, 60)
            return await store.list_receipts(root)
        finally:
            await store.close()

    listed = io_loop().submit(write_and_list()).result(EVENT_TIMEOUT)
    valid_garbage = []
    for value in garbage:
        with contextlib.suppress(ValueError):
            valid_garbage.append(Receipt.from_json(value))
    assert sorted(listed, key=repr) == sorted(real + valid_garbage, key=repr)


# -- CLI arguments -------------------------------------------------------------------------------

cli_word = st.one_of(
    st.sampled_from(["cancel", "status", "list", "watch", "doctor", "--json", "--reason", "--wait", "--expect"]),
    st.sampled_from(["--help", "-h", "--", "-", "0", "-1", "1e9", "nan", "inf", "86401", "0.01"]),
    st.builds(random_root),
    st.sampled_from(["0" * 32, random_root().upper(), random_root()[:31], random_root() + "0"]),
    st.text(max_size=40),
)


@examples(200)
# Not `demo` (it starts etcd and six services) nor `doctor` (its etcd check runs on a loop of
# its own, asyncio.run, which strands gRPC completions in a process that goes on).
@given(argv=st.lists(cli_word, max_size=6).filter(lambda argv: "demo" not in argv and argv[:1] != ["doctor"]))
def test_the_cli_exits_0_1_or_2_with_one_line_on_error_whatever_the_arguments(argv):
    """Random argv: main() returns or exits with 0, 1 or 2, and a failure prints one `otel-cancel:` line."""
    TRIED["CLI argument lists"] += 1
    unreachable = {
        # Nobody listens there, and every call gives up fast: store commands fail with 1, quickly.
        env.OTEL_CANCEL_ETCD_ENDPOINTS: f"127.0.0.1:{free_port()}",
        env.OTEL_CANCEL_ETCD_TIMEOUT_SECONDS: "0.05",
    }
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, unreachable), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
    assert code in (0, 1, 2), (argv, code)
    if code != 0:
        lines = [line for line in err.getvalue().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("otel-cancel: "), (argv, err.getvalue())
