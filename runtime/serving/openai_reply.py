"""The OpenAI response objects -- a whole completion, or its stream of chunk events --
built from the Chunks and the final Stats of a request, with OpenAI's stop sequences
(runtime.text.stop) applied to the text and usage counted as OpenAI does."""

from __future__ import annotations

import time
import uuid

from runtime.serving.protocol import Chunk, Stats
from runtime.text.stop import StopText


class CompletionBuilder:
    def __init__(self, chat: bool, model: str, include_usage: bool = False, stops: list[str] | None = None, seed: int = 0):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        # The sampling seed, known before the first token: every object reports it as its
        # system_fingerprint (what the openai package shows), and `leapfrog.seed` at the end.
        self.seed = seed
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.text: list[str] = []
        self.stats: Stats | None = None
        self.stop = StopText(stops or [])
        self._sent_role = False

    @property
    def stopped(self) -> bool:
        """A stop sequence came: the caller cancels the decode, the reply ends with "stop"."""
        return self.stop.stopped

    def add(self, item: Chunk | Stats) -> str:
        """Take one item; returns the text it adds to the reply."""
        if isinstance(item, Chunk):
            text = self.stop.push(item.text)
        else:
            self.stats, text = item, self.stop.flush()
        self.text.append(text)
        return text

    def _usage(self) -> dict:
        s = self.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.tokens, "total_tokens": s.prompt_tokens + s.tokens}

    def _leapfrog(self) -> dict:
        s = self.stats
        return {"mode": s.mode, "forward_passes": s.forward_passes, "tau": s.tau, "seconds": s.seconds,
                "ttft_seconds": s.ttft_seconds, "queue_seconds": s.queue_seconds, "seed": s.seed}

    def _finish(self) -> str:
        return "length" if self.stats.finish_reason == "length" and not self.stopped else "stop"

    def whole(self) -> dict:
        text = "".join(self.text)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": self._finish(), "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": self._finish(), "logprobs": None}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": f"seed-{self.seed}", "choices": [choice], "usage": self._usage(),
                "leapfrog": self._leapfrog()}

    def _chunk(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "system_fingerprint": f"seed-{self.seed}", "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk has it, null until the last one
        return chunk

    def events(self, item: Chunk | Stats) -> list[dict]:
        """The SSE events for one item: a delta per Chunk with text; the finish (and usage) at the end."""
        text = self.add(item)
        events = []
        if text or (self.chat and not self._sent_role):
            role, self._sent_role = self.chat and not self._sent_role, True
            events.append(self._chunk(text, None, role))
        if isinstance(item, Stats):
            final = self._chunk(None, self._finish())
            final["leapfrog"] = self._leapfrog()
            events.append(final)
            if self.include_usage:
                usage = self._chunk(None, None)
                usage["choices"], usage["usage"] = [], self._usage()
                events.append(usage)
        return events
