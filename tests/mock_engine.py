"""A stand-in for runtime.engine.Engine with the surface the server uses (encode_chat,
check_fits, steps, tokenizer, cache, stop_ids), so serving tests run in milliseconds.

Tokens are UTF-8 bytes plus one (0 is the stop token). The reply to a prompt is fixed by
the prompt (expected_reply), and it is committed in steps of 1, 2, 3, 1, 2, 3, ...
tokens, like a speculative decoder accepting a varying number per forward pass. The KV
cache is the real workers.kv_cache.KVCache (tiny), so leaks show up in cache.length.
"""

from __future__ import annotations

import threading
import time

from configs.schema import ModelConfig
from runtime.decoding.steps import Step, clip_step
from runtime.engine import Engine
from runtime.batching.step_batcher import StepBatcher
from workers.kv_cache import KVCache

STOP = 0


class ByteTokenizer:
    chat_template = None
    eos_token_id = STOP

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 1 for i in ids if i != STOP).decode("utf-8", errors="replace")


def reply_text(prompt_ids: list[int]) -> str:
    """The mock model's reply: fixed by the prompt, with a multi-byte character in it."""
    return f"Reply to {len(prompt_ids)} tokens, sum {sum(prompt_ids)} \u00e9\u00e8 ok."


def expected_reply(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    return (ByteTokenizer().encode(reply_text(prompt_ids)) + [STOP])[:max_new_tokens]


class MockEngine:
    def __init__(self, max_context: int = 512, step_delay: float = 0.0):
        self.config = ModelConfig(max_context=max_context)
        self.tokenizer = ByteTokenizer()
        self.stop_ids = {STOP}
        self.cache = KVCache(1, 1, 1, max_context)
        self.lane = StepBatcher(None).lane()  # its seat in a batcher; its steps never use it
        self.step_delay = step_delay  # seconds per step: makes requests overlap in tests
        self.started = threading.Event()  # set when a decode begins
        self.calls: list[dict] = []  # the arguments of every steps() call
        self.produced = 0  # tokens the last decode yielded

    def encode_chat(self, prompt: str | list[dict]) -> list[int]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.tokenizer.encode("\n".join(f"{m['role']}: {m['content']}" for m in messages))

    check_fits = Engine.check_fits

    def steps(self, prompt_ids: list[int], mode: str, max_new_tokens: int, sampling=None):
        self.check_fits(prompt_ids, max_new_tokens)
        self.calls.append({"prompt_ids": prompt_ids, "mode": mode, "max_new_tokens": max_new_tokens, "sampling": sampling})
        return self._generate(prompt_ids, max_new_tokens)

    def _generate(self, prompt_ids: list[int], max_new_tokens: int):
        self.cache.truncate(0)
        self.cache.commit(len(prompt_ids))  # "prefill"
        self.started.set()
        reply = expected_reply(prompt_ids, max_new_tokens)
        produced, size = 0, 1
        self.produced = 0
        while True:
            time.sleep(self.step_delay)
            tokens, _, done = clip_step(reply[produced : produced + size], [0.0] * size, produced, max_new_tokens, self.stop_ids)
            self.cache.commit(len(tokens))
            produced += len(tokens)
            self.produced = produced
            yield Step(tokens, None, 1)
            if done or produced >= len(reply):
                return
            size = size % 3 + 1
