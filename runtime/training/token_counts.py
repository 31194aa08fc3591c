"""How often each token appears in replies: the draft vocabularies (FR-Spec) of the EAGLE
peer (its training replies) and of a draft model ([draft] vocab: ShareGPT's training
replies, workers.drafters.draft_vocabulary).

`reply_token_counts` tokenizes every 'gpt' turn of the ShareGPT training conversations
(never the held-out last 1,000) with the model's tokenizer, ~40 s for Qwen2.5's on two
cores, once: the counts are cached by tokenizer in cache_dir()/token_counts. The
tokenizer's special and added tokens (the chat template's, end of turn among them) count
as the most frequent, as a reply ends with one.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
from tqdm import tqdm

from runtime.training.sharegpt import train_conversations
from workers.cache_dir import cache_dir

CHUNK = 256  # replies tokenized per call


def most_frequent(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent token ids (ties: the lower id first), sorted by id."""
    if not 1 <= size <= counts.numel():
        raise ValueError(f"a draft vocabulary of {size} tokens out of {counts.numel()}")
    return torch.argsort(-counts, stable=True)[:size].sort().values


def tokenizer_key(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def reply_token_counts(tokenizer, vocab_size: int, progress: bool = True) -> torch.Tensor:
    """(vocab_size,) int64: each token's count in ShareGPT's training replies (cached)."""
    path = cache_dir() / "token_counts" / f"sharegpt-replies-{tokenizer_key(tokenizer)}-{vocab_size}.pt"
    if path.is_file():
        return torch.load(path)
    replies = [turn["value"] for conv in train_conversations() for turn in conv.get("conversations") or []
               if turn.get("from") == "gpt" and isinstance(turn.get("value"), str)]
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    chunks = range(0, len(replies), CHUNK)
    bar = tqdm(chunks, desc="draft vocabulary: counting ShareGPT reply tokens", unit="chunk", disable=not progress,
               file=sys.stderr)
    for start in bar:
        ids = [t for reply in tokenizer(replies[start:start + CHUNK], add_special_tokens=False)["input_ids"] for t in reply]
        counts += torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=vocab_size)[:vocab_size]
    special = [i for i in {*tokenizer.all_special_ids, *tokenizer.get_added_vocab().values()} if i < vocab_size]
    counts[special] = int(counts.max()) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(counts, tmp)
    tmp.replace(path)
    return counts
