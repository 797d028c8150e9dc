"""The kind of a cancel: carried by the flag and the exception, read back from the cancellation's tag."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from otel_cancel import attributes
from otel_cancel._core.bulk import BulkCancel
from otel_cancel._core.records import CancelRequest, read_tag
from otel_cancel.exceptions import Cancelled

ROOT = "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.parametrize("kind", sorted(attributes.CANCEL_KINDS))
def test_a_flag_keeps_its_kind_through_the_store(kind):
    """A flag written with a kind is read back with it, and raises a Cancelled of that kind."""
    request = CancelRequest.new(ROOT, "why", "svc/1", kind)
    parsed = CancelRequest.from_json(request.to_json(), ROOT)
    assert parsed == request
    assert parsed.error().kind == kind


def test_a_flag_without_a_kind_or_with_an_unknown_one_is_explicit():
    """Flags written before kinds existed, or by a newer release with a kind unknown here, are explicit."""
    old = CancelRequest.from_json(b'{"root":"%s","reason":"deadline"}' % ROOT.encode())
    newer = CancelRequest.from_json(b'{"root":"%s","kind":"solar-flare"}' % ROOT.encode())
    assert old.kind == newer.kind == attributes.KIND_EXPLICIT
    assert old.reason == "deadline"  # the text says deadline; the kind decides, and it is explicit


def test_the_tag_of_a_delivered_cancellation_names_root_and_kind_whatever_the_reason():
    """The task.cancel() message is built and read in one place; a reason cannot forge another kind."""
    request = CancelRequest.new(ROOT, "x; kind=deadline; root=" + "1" * 32, "cli@host")
    assert read_tag(request.tag()) == (ROOT, attributes.KIND_EXPLICIT)
    assert read_tag("some other library's cancel") is None
    assert read_tag(None) is None


@pytest.mark.anyio
async def test_a_delivered_tag_arrives_with_the_cancelled_error():
    """A task cancelled with the tag sees it in its CancelledError (what anyio-style recognition reads)."""
    seen: list[tuple[str, str] | None] = []
    waiting = asyncio.Event()

    async def work() -> None:
        waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as error:
            seen.append(read_tag(error.args[0] if error.args else None))
            raise

    task = asyncio.get_running_loop().create_task(work())
    await waiting.wait()
    task.cancel(CancelRequest.new(ROOT, "r", "me", attributes.KIND_DISCONNECT).tag())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [(ROOT, attributes.KIND_DISCONNECT)]


def test_cancelled_pickles_with_its_kind():
    """Cancelled crosses process pools with its root, reason and kind."""
    error = pickle.loads(pickle.dumps(Cancelled(ROOT, "slow", attributes.KIND_DEADLINE)))
    assert (error.root, error.reason, error.kind) == (ROOT, "slow", attributes.KIND_DEADLINE)


def test_a_bulk_cancel_stops_runs_with_the_bulk_kind():
    """A root a bulk cancel selects is stopped with kind bulk (dashboards count it apart)."""
    bulk = BulkCancel.new(service=None, labels={"tenant": "acme"}, reason="incident", requested_by="cli@h")
    assert bulk.request_for(ROOT).kind == attributes.KIND_BULK
