"""Run an async generator in one task of its own, however its items are consumed.

A graph run's scope binds to the task it is entered in, and attaches its root to that
task's context. A caller that takes each item in a task of its own
(``asyncio.wait_for(anext(stream), t)`` on Python 3.11) would run each step of the
run in another task and context: later steps lose the root, and the scope cannot be
left where it was entered. :class:`OneTaskStream` runs the whole generator in one
task instead and hands each item over, one at a time, when it is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

_END = object()
"""What the runner hands over when the generator is exhausted."""


async def _run(stream: AsyncIterator[Any], requests: asyncio.Queue[asyncio.Future[Any]]) -> None:
    """Take one item from ``stream`` per request, in this task, until it ends or fails.

    Holds no reference to its :class:`OneTaskStream`, so that one dropped unclosed is
    collected and cancels this task (its ``__del__``), which closes ``stream`` here.
    """
    try:
        while True:
            reply = await requests.get()
            try:
                item = await anext(stream)
            except StopAsyncIteration:
                _answer(reply, _END)
                return
            except asyncio.CancelledError:
                # The consumer left mid-item (it cancels this task), or the run was
                # stopped (its scope raises an error of its own instead): the stream
                # ends, as a generator ends when cancelled.
                reply.cancel()
                raise
            except Exception as error:
                # A consumer that left meanwhile (its reply cancelled with it) hears of it no more.
                if not reply.done():
                    reply.set_exception(error)
                return
            except BaseException:
                reply.cancel()  # KeyboardInterrupt, SystemExit: never leave the consumer waiting
                raise
            _answer(reply, item)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def _answer(reply: asyncio.Future[Any], item: object) -> None:
    if not reply.done():  # else its consumer was cancelled while it waited, and left
        reply.set_result(item)


class OneTaskStream:
    """An async iterator over ``start()``'s items, produced in one task created at the first request.

    The task is created in the context of the first ``anext``, as the generator itself
    would have run there; it ends when the stream ends, fails, is closed, or is
    collected. A consumer cancelled while it waits for an item cancels the step in
    progress, as it would cancel the generator's own await.
    """

    def __init__(self, start: Callable[[], AsyncIterator[Any]], name: str) -> None:
        self._start = start
        self._name = name
        self._requests: asyncio.Queue[asyncio.Future[Any]] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._finished = False

    def __aiter__(self) -> OneTaskStream:
        return self

    async def __anext__(self) -> Any:
        if self._finished:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        if self._runner is None:
            self._requests = asyncio.Queue()
            self._runner = loop.create_task(_run(self._start(), self._requests), name=self._name)
        elif self._runner.done():
            self._finished = True
            raise StopAsyncIteration
        assert self._requests is not None
        reply: asyncio.Future[Any] = loop.create_future()
        self._requests.put_nowait(reply)
        try:
            item = await reply
        except asyncio.CancelledError:
            # This consumer left mid-item (its cancellation cancelled the reply too): the
            # stream ends here, so the step in progress is cancelled with it, and has
            # stopped before the consumer goes on (as when the step ran in its own task:
            # its nodes' cleanup runs before the caller's).
            self._runner.cancel()
            self._finished = True
            await asyncio.wait({self._runner})
            raise
        except BaseException:
            self._finished = True
            raise
        if item is _END:
            self._finished = True
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        """Close the stream: its generator is closed in its own task (and its scope left there)."""
        self._finished = True
        runner = self._runner
        if runner is not None and not runner.done():
            runner.cancel()
            # Waits for the runner without taking its cancellation (or this caller's) for its own.
            await asyncio.wait({runner})

    def __del__(self) -> None:
        runner = self._runner
        if runner is not None and not runner.done():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs any more
                runner.cancel()


__all__ = ("OneTaskStream",)
