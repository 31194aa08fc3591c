"""Chat prompts to token ids, and the ids that end a reply: shared by the engine and training."""

from __future__ import annotations

from pathlib import Path


def encode_chat(tokenizer, prompt: str | list[dict]) -> list[int]:
    """A user prompt (or a list of chat messages) -> prompt token ids, with the chat template."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if tokenizer.chat_template is None:
        return tokenizer.encode("\n".join(m["content"] for m in messages))
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def stop_ids(tokenizer, folder: Path) -> set[int]:
    """EOS ids of the tokenizer and of the checkpoint's generation_config.json."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}
