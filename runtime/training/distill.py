"""Training data for the drafters: ShareGPT first-turn prompts and a reply to each.

Two sources of replies (`DistillSettings.source`), the same loss either way (the target's
own full next-token distribution at every reply position, computed while training):
  - "self": the model's own greedy replies (self-distillation). Transformers generates
    them (do_sample=False, left-padded batches) up to `max_new_tokens` tokens, the stop
    token included when one is reached. What decoding sees, and slow to make on a CPU:
    about 210 reply tokens/s on this machine's 2 cores.
  - "sharegpt": ShareGPT's own first reply (teacher forcing on fixed text, as EAGLE-1
    trains), cut at `max_new_tokens` tokens, the end-of-turn token added when it is
    whole. Costs only tokenization: the 3M-token set builds in under a minute.

Prompts come from the training split of ShareGPT only (runtime.training.sharegpt; the
held-out conversations are never read here). Each prompt is wrapped in the chat template
exactly by runtime.text.chat.encode_chat, as the engine does; prompts longer than
`max_prompt_tokens` are skipped (cutting one would drop the template's assistant header).

The training prompts are split in two fixed parts: the last VAL_FRACTION (5%) of them
are validation prompts, the rest training prompts. Both lists are in file order and do
not depend on how many examples are asked for, so a larger run extends a smaller one and
the validation set stays the same.

Results are cached as JSONL ({"id", "prompt_ids", "reply_ids"} per line) in a cache
directory, one file per (checkpoint, source, dtype, lengths, split), appended batch by
batch: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from configs.schema import DTYPES
from runtime.text.chat import encode_chat, stop_ids
from runtime.training import sharegpt
from workers.cache_dir import cache_dir
from workers.loading import load_tokenizer

VAL_FRACTION = 0.05
SPLITS = ("train", "val")
SOURCES = ("self", "sharegpt")


@dataclass(frozen=True)
class DistillSettings:
    max_prompt_tokens: int = 256
    max_new_tokens: int = 128
    dtype: str = "float32"  # dtype of the model that generates: part of the cache key
    source: str = "self"  # "self": the model's greedy replies; "sharegpt": ShareGPT's own (SOURCES)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"the data source must be one of {', '.join(SOURCES)}, got {self.source!r}")


def default_data_dir() -> Path:
    return cache_dir() / "distill"


def split_prompts(prompts: list[tuple[str, str]], split: str) -> list[tuple[str, str]]:
    """The training ("train") or validation ("val") part of a prompt list: val is the last 5%."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cut = len(prompts) - max(1, round(len(prompts) * VAL_FRACTION))
    return prompts[:cut] if split == "train" else prompts[cut:]


def sharegpt_prompts(split: str) -> list[tuple[str, str]]:
    """(id, text) of ShareGPT training-split first-turn prompts for `split`, deduplicated.

    Stricter than the split alone: a prompt whose exact text is also a held-out first-turn
    prompt ("continue", "hi", a few dozen real ones) is dropped, and so are the parts of a
    conversation that the split cuts in two (ShareGPT ids are <conversation>_<part>:
    aLHtGu3_0 and aLHtGu3_11 are training, aLHtGu3_23 held out). Repeated texts are kept once.
    """
    def conversation(cid: str) -> str:
        return cid.rsplit("_", 1)[0]

    heldout = {text for _, text in sharegpt.heldout_prompts()}
    heldout_convs = {conversation(c["id"]) for c in sharegpt.heldout_conversations()}
    seen: set[str] = set()
    prompts = []
    for cid, text in sharegpt.train_prompts():
        if text in heldout or text in seen or conversation(cid) in heldout_convs:
            continue
        seen.add(text)
        prompts.append((cid, text))
    return split_prompts(prompts, split)


def encoded_prompts(
    tokenizer, settings: DistillSettings, split: str, prompts: list[tuple[str, str]] | None = None,
    replies: dict[str, str] | None = None,
) -> Iterator[tuple[str, list[int]]]:
    """(id, ids) of the prompts of `split` that fit, in order, each in the chat template
    exactly as the engine encodes it; with `replies` (source "sharegpt"), those with a reply."""
    for cid, text in sharegpt_prompts(split) if prompts is None else prompts:
        if replies is not None and cid not in replies:
            continue
        ids = encode_chat(tokenizer, text)
        if 0 < len(ids) <= settings.max_prompt_tokens:
            yield cid, ids


def cache_file(data_dir: Path, folder: Path, settings: DistillSettings, split: str) -> Path:
    fields = dict(settings.__dict__)
    if fields["source"] == "self":
        del fields["source"]  # the key of the files made before there was a choice
    else:
        del fields["dtype"]  # fixed text: no model generates it
    key = json.dumps({"folder": str(Path(folder).resolve()), "split": split, **fields, "version": 1}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    source = "" if settings.source == "self" else f"-{settings.source}"
    return Path(data_dir) / f"{Path(folder).name}{source}-{split}-{digest}.jsonl"


def read_cache(path: Path) -> list[dict]:
    """Complete records of a cache file; a line cut off by an interruption is removed."""
    if not path.is_file():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
                if not line.endswith(b"\n"):
                    raise ValueError("unterminated line")
            except ValueError:
                break
            records.append(record)
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def cut_at_stop(reply: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(reply):
        if t in stops:
            return reply[: i + 1]
    return reply


@torch.inference_mode()
def generate_batch(hf_model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, stops: set[int]) -> list[list[int]]:
    """Greedy replies for a batch of prompt id lists (left padding), each cut after its stop token."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    device = hf_model.device
    out = hf_model.generate(
        ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=sorted(stops),
        pad_token_id=pad_id,
    )
    return [cut_at_stop(row[width:].tolist(), stops) for row in out.cpu()]


def teacher_replies(tokenizer, replies: dict[str, str], max_new_tokens: int, end_id: int):
    """A batch replier for source "sharegpt": each id's ShareGPT reply as tokens, cut at
    max_new_tokens; `end_id` (the end of the assistant turn) follows a reply that is whole."""

    def reply(chunk: list[tuple[str, list[int]]]) -> list[list[int]]:
        out = []
        for cid, _ in chunk:
            ids = tokenizer.encode(replies[cid], add_special_tokens=False)
            out.append(ids[:max_new_tokens] if len(ids) >= max_new_tokens else ids + [end_id])
        return out

    return reply


def distill(
    folder: Path,
    n_examples: int,
    split: str = "train",
    settings: DistillSettings = DistillSettings(),
    data_dir: Path | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
    prompts: list[tuple[str, str]] | None = None,
    replies: dict[str, str] | None = None,
    encoded: list[tuple[str, list[int]]] | None = None,
    deadline: float | None = None,
) -> list[dict]:
    """The first `n_examples` examples of `split`, making the missing ones.

    `prompts` overrides the ShareGPT prompts (id, text) and `replies` ShareGPT's replies
    by id (tests). `encoded` gives the prompts already in the chat template as (id, ids),
    in order (`export_prompts`: a machine without the ShareGPT file). Returns fewer
    examples when the prompts run out, or when time.monotonic() passes `deadline` (the
    batches made by then are kept: a later call goes on from there).
    """
    folder = Path(folder)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    path = cache_file(data_dir, folder, settings, split)
    done = read_cache(path)
    if len(done) >= n_examples:
        return done[:n_examples]

    tokenizer = load_tokenizer(folder)
    done_ids = {r["id"] for r in done}
    if settings.source == "sharegpt":
        replies = replies if replies is not None else sharegpt.train_first_replies()
    if encoded is None:
        encoded = encoded_prompts(tokenizer, settings, split, prompts, replies)
    need = n_examples - len(done)
    pending = list(islice(((cid, ids) for cid, ids in encoded if cid not in done_ids), need))
    if not pending:
        return done

    from tqdm import tqdm

    stops = stop_ids(tokenizer, folder)
    if settings.source == "sharegpt":
        end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stops)
        reply = teacher_replies(tokenizer, replies, settings.max_new_tokens, end_id)
        batch_size = max(batch_size, 256)  # tokenizing: no model, large batches
    else:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[settings.dtype]).to(device).eval()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)

        def reply(chunk: list[tuple[str, list[int]]]) -> list[list[int]]:
            return generate_batch(hf_model, [ids for _, ids in chunk], settings.max_new_tokens, pad_id, stops)

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = path.with_suffix(".meta.json")
    if not meta.is_file():
        meta.write_text(json.dumps({"folder": str(folder.resolve()), "split": split, **settings.__dict__}, indent=1))
    bar = tqdm(total=n_examples, initial=len(done), desc=f"data {split} ({settings.source})", unit="ex", disable=not progress)
    try:
        with open(path, "a") as f:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start : start + batch_size]
                lines = []
                for (cid, ids), reply_ids in zip(chunk, reply(chunk)):
                    record = {"id": cid, "prompt_ids": ids, "reply_ids": reply_ids}
                    done.append(record)
                    lines.append(json.dumps(record, separators=(",", ":")) + "\n")
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(chunk))
                if deadline is not None and time.monotonic() > deadline:
                    break
    finally:
        bar.close()
    return done[:n_examples]
