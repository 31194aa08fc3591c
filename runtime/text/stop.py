"""Stop sequences on streamed text, as the OpenAI API has them: the reply ends just before
the first occurrence of any stop string, which is not part of the reply. Text is passed
on as it comes, except a tail that could be the start of a stop string: that is held
back until the next piece shows whether it is one."""

from __future__ import annotations


class StopText:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""  # text not passed on yet: it may begin a stop string
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what can be passed on. After a stop string, always ""."""
        if self.stopped:
            return ""
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of the reply: what was held back (it began no stop string after all)."""
        text, self.held = ("" if self.stopped else self.held), ""
        return text
