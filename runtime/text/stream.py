"""Turn a growing list of token ids into text deltas that are safe to print.

Byte-level BPE splits one character (an emoji, a CJK glyph) over several tokens, and
some tokenizers change how earlier tokens render once the next one arrives (leading
spaces, merges). So we never decode tokens one by one: we decode a short window of
recent tokens and emit only the part of its text that is new and complete. The deltas
always concatenate to tokenizer.decode(all ids).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class TextStream:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = 0  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the text that they complete (possibly empty)."""
        self.ids.extend(new_ids)
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(emitted) or text.endswith(REPLACEMENT):
            return ""  # nothing new, or a character still waits for its last bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """The text still held back at the end of the stream (an incomplete character)."""
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(emitted) :]
