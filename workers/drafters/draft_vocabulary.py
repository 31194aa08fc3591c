"""A drafter's vocabulary cut to the most frequent tokens (FR-Spec, arXiv 2502.14856).

On a CPU a small model's LM head is a large share of its step: Qwen2.5-Coder-0.5B's
151,936 x 896 head is 136M of its 494M weights. Drafting only among the `len(ids)` most
frequent tokens multiplies h by those rows of the head alone, and a token outside them
is never drafted. The target verifies every tree, so what is committed is the same
(a token a draft misses is the target's bonus token instead).

`ids` (sorted token ids) come from the host (runtime.training.draft_vocabulary counts the
training replies; EAGLE's trainer picks its own); None keeps the whole vocabulary and
the model's own LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.model import Linear, Transformer, set_kernels


def draft_head(model: Transformer, vocab_ids: torch.Tensor) -> torch.Tensor:
    """The model's LM head cut to the draft vocabulary: (draft vocab, dim) (or its blocks)."""
    return model.lm_head.weight.detach()[vocab_ids.to(model.device)].contiguous()


class DraftVocabulary:
    def __init__(self, model: Transformer, ids: torch.Tensor | list[int] | None):
        self.model = model
        self.ids: list[int] | None = None
        self.head = model.lm_head
        if ids is not None and len(ids) < model.args.vocab_size:
            ids = torch.as_tensor(ids, dtype=torch.long)
            if ids.numel() == 0 or bool((ids[1:] <= ids[:-1]).any()) or int(ids[0]) < 0 or int(ids[-1]) >= model.args.vocab_size:
                raise ValueError(f"a draft vocabulary is sorted distinct token ids in [0, {model.args.vocab_size})")
            weight = draft_head(model, ids)
            self.head = Linear(model.args.dim, len(ids), bias=False, device="meta").requires_grad_(False)
            self.head.weight = torch.nn.Parameter(weight, requires_grad=False)
            set_kernels(self.head, model.kernels)
            self.ids = ids.tolist()

    @property
    def size(self) -> int:
        return self.model.args.vocab_size if self.ids is None else len(self.ids)

    def logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """Draft log-probabilities (n, size) of the last hidden states h (n, dim), before the final norm."""
        return F.log_softmax(self.head(self.model.norm(h)).float(), dim=-1)

    def top(self, logprobs: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
        """Each row's k best drafts: their log-probabilities and token ids."""
        top = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
        indices = top.indices.tolist()
        if self.ids is not None:
            indices = [[self.ids[i] for i in row] for row in indices]
        return top.values.tolist(), indices

    def whole(self, logprobs: torch.Tensor) -> torch.Tensor:
        """logprobs over the whole vocabulary (n, vocab): -inf for the tokens outside it."""
        if self.ids is None:
            return logprobs
        out = logprobs.new_full((logprobs.shape[0], self.model.args.vocab_size), float("-inf"))
        out[:, torch.tensor(self.ids, device=logprobs.device)] = logprobs
        return out
