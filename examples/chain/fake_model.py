"""A deterministic fake streaming chat model: tokens at a steady pace, no network, no weights."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

log = logging.getLogger("examples.model")


class PacedFakeChatModel(BaseChatModel):
    """Answers with ``tokens`` words derived from the prompt, one every ``interval`` seconds.

    It logs ``model <name> emitted N/M tokens`` when it stops, so a test or the demo
    can see that a cancel really stopped the token stream.
    """

    name: str = "fake"
    tokens: int = 50
    interval: float = 0.05

    @property
    def _llm_type(self) -> str:
        return "paced-fake"

    def _words(self, messages: list[BaseMessage]) -> list[str]:
        seed = str(messages[-1].content).split() or ["token"]
        return [f"{seed[i % len(seed)]}-{i}" for i in range(self.tokens)]

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        chunks = self._stream(messages, stop, run_manager, **kwargs)
        text = " ".join(str(chunk.message.content) for chunk in chunks)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: Any = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        emitted = 0
        words = self._words(messages)
        try:
            for word in words:
                time.sleep(self.interval)
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=word))
                if run_manager:
                    run_manager.on_llm_new_token(word, chunk=chunk)
                emitted += 1
                yield chunk
        finally:
            log.warning("model %s emitted %d/%d tokens", self.name, emitted, len(words))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: Any = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        emitted = 0
        words = self._words(messages)
        try:
            for word in words:
                await asyncio.sleep(self.interval)
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=word))
                if run_manager:
                    await run_manager.on_llm_new_token(word, chunk=chunk)
                emitted += 1
                yield chunk
        finally:
            log.warning("model %s emitted %d/%d tokens", self.name, emitted, len(words))
