"""Draft-model speculation (`draft`): a separate, smaller model of the same vocabulary drafts
a tree from the root (Qwen2.5-Coder-0.5B for the 1.5B: workers.model_registry).

The draft model has its own Transformer (the target's dtype, device and kernels) and its
own KV cache, which holds the committed tokens (a prefix of them: what it has run so far).
Each step, from root y:
    catch-up   one forward over the committed tokens it has not run yet, y last (the
               prompt on the first step; later the accepted drafts it had not expanded and
               the last bonus token): y's output drafts y's children
    depth d    the `top_k` best nodes of depth d - 1 (by path log-probability) run as rows
               at position P + d - 1, each seeing the committed tokens and its own
               ancestors' rows, and draft their children; drafting stops early when the
               best path of a depth is drafted less likely than `min_prob`
    tree       the `budget` best nodes of all drafted (workers.drafters.eagle.best_nodes),
               each scored by its path's draft log-probability, which the tree sizer
               (workers.tree_sizing) calibrates per depth like any scored drafter's
The expanded nodes' rows stay in the cache after the committed tokens until `observe`:
the rows of the accepted path's expanded nodes are kept (KVCache.keep: moved down to
follow the committed tokens; for a chain, a truncate to the accepted prefix), the rest
dropped, and what the draft model has not run (the accepted leaf, the bonus token) is fed
on the next propose. A proposer never changes what is committed: the target verifies
every tree (runtime.decoding.speculative), so any draft model is lossless.
"""

from __future__ import annotations

from pathlib import Path

import torch

from configs.schema import ConfigError, ModelConfig
from workers.drafters.base import Proposal
from workers.drafters.draft_vocabulary import DraftVocabulary
from workers.drafters.eagle import best_nodes
from workers.loading import ModelLoadError, load_model, load_tokenizer, resolve_checkpoint
from workers.model_registry import REGISTRY
from workers.model import Transformer
from workers.tree import TokenTree
from workers.tree_step import StepOutcome


class DraftModelProposer:
    """The draft model as a proposer (workers.drafters.base.Proposer): it starts the tree."""

    scored = True  # its trees carry draft log-probabilities

    def __init__(self, model: Transformer, max_len: int, depth: int, top_k: int, budget: int, min_prob: float = 0.0,
                 vocabulary: list[int] | None = None):
        if min(depth, top_k, budget) < 1 or not 0.0 <= min_prob < 1.0:
            raise ValueError(f"draft depth, top_k and budget must be >= 1 and min_prob in [0, 1): "
                             f"{depth}, {top_k}, {budget}, {min_prob}")
        self.model, self.depth, self.top_k, self.budget = model, depth, top_k, budget
        self.vocabulary = DraftVocabulary(model, vocabulary)  # None: the whole vocabulary
        self.min_logprob = float("-inf") if min_prob == 0.0 else float(torch.tensor(min_prob).log())
        self.cache = model.new_cache(max_len)
        self.tokens: list[int] = []  # the committed tokens before the next root; the cache holds a prefix of them
        self.base = 0  # after a propose: the committed positions in the cache (the root's included)
        self.rows: dict[tuple[int, ...], int] = {}  # after a propose: an expanded node's path tokens -> its row after `base`
        self.calls = 0  # draft-model forward passes (for the tests and the curious)

    def start(self, prompt_ids: list[int]) -> None:
        self.cache.truncate(0)
        self.tokens, self.rows = list(prompt_ids), {}

    def forward(self, tokens: list[int], positions: torch.Tensor, mask: torch.Tensor | None, prompt_rows: int = 0) -> torch.Tensor:
        """Run `tokens` at `positions` into the cache and commit them; their draft log-probabilities
        (n, draft vocabulary).
        `mask` (n, n + cached rows beyond `base`): which of those each row sees besides itself."""
        m = self.model
        self.calls += 1
        ctx = m.context(positions, self.cache, torch.eye(len(tokens), dtype=torch.bool, device=m.device) if mask is not None else None,
                        prompt_rows=prompt_rows)
        if mask is not None:  # the earlier depths' rows: only the ancestors'
            ctx.mask[:, self.base:self.cache.length] &= mask
        h = m.run_layers(m.embed(torch.tensor([tokens], device=m.device)), ctx)
        self.cache.commit(len(tokens))
        return self.vocabulary.logprobs(h[0])

    @torch.inference_mode()
    def propose(self, proposal: Proposal) -> None:
        if proposal.ahead:  # a predicted root: its cache holds committed tokens only
            return
        if len(proposal.tree) > 1:
            raise ValueError("the draft model starts the tree: it must be the first proposer")
        root = proposal.tree.tokens[0]
        feed = self.tokens[self.cache.length:] + [root]
        start = self.cache.length
        positions = torch.arange(start, start + len(feed), device=self.model.device)
        logprobs = self.forward(feed, positions, None, prompt_rows=len(feed) - 1)[-1:]  # y's children
        self.base, self.rows = self.cache.length, {}
        proposal.logprobs = self.vocabulary.whole(logprobs)  # depth 1 alone: deeper drafts depend on the path (a grafted chain's are unscored there)
        # Drafted nodes (index 0: the root): token, parent, depth, path log-probability, path tokens.
        tokens, parents, depths, scores, paths = [root], [-1], [0], [0.0], [()]
        expanded = [0]  # the nodes whose children `logprobs` holds, one row each
        for depth in range(1, self.depth + 1):
            values, drafted = self.vocabulary.top(logprobs, self.top_k)
            first_child = len(tokens)
            for row, parent in enumerate(expanded):
                for lp, v in zip(values[row], drafted[row]):
                    tokens.append(v)
                    parents.append(parent)
                    depths.append(depth)
                    scores.append(scores[parent] + lp)
                    paths.append(paths[parent] + (v,))
            children = range(first_child, len(tokens))
            if depth == self.depth or max(scores[i] for i in children) < self.min_logprob:
                break
            # Expand the best of this depth: one row each, seeing the committed tokens and its ancestors' rows.
            expanded = sorted(children, key=lambda i: -scores[i])[: self.top_k]
            cached = self.cache.length - self.base
            mask = torch.zeros(len(expanded), cached, dtype=torch.bool)
            for r, node in enumerate(expanded):
                path = paths[node]
                for d in range(1, len(path)):  # its ancestors below the root
                    mask[r, self.rows[path[:d]]] = True
                self.rows[path] = cached + r
            positions = torch.full((len(expanded),), self.base - 1 + depth, device=self.model.device)
            logprobs = self.forward([tokens[i] for i in expanded], positions, mask.to(self.model.device))
        proposal.tree = best_nodes(tokens, parents, depths, scores, self.budget)

    def observe(self, tree: TokenTree, path: list[int], outcome: StepOutcome) -> None:
        accepted = [tree.tokens[node] for node in path]  # root first
        self.tokens += accepted
        # Keep the rows of the accepted drafts the draft model ran (a path down from the root);
        # the others go, and the next propose runs what is missing.
        kept = []
        for d in range(1, len(accepted)):
            row = self.rows.get(tuple(accepted[1 : d + 1]))
            if row is None:
                break
            kept.append(row)
        self.cache.truncate(self.base)
        self.cache.keep(kept)
        self.rows = {}

    def skip(self, root: int, outcome: StepOutcome) -> None:
        """A step of `root` alone (the first step, a plain one): the draft model runs it next time."""
        if self.rows:  # a proposal that was never verified: its rows go
            self.cache.truncate(self.base)
            self.rows = {}
        self.tokens.append(root)


def draft_checkpoint(setting: str, target: str) -> str:
    """The draft model's checkpoint name: `setting` ([draft] checkpoint), or for "auto" the
    named checkpoint paired with the target's (workers.model_registry)."""
    if setting != "auto":
        return setting
    entry = REGISTRY.get(target)
    if entry is None or entry.draft is None:
        paired = ", ".join(f"{e.draft} for {n}" for n, e in REGISTRY.items() if e.draft)
        raise ConfigError(f"[draft] checkpoint \"auto\": no draft model is paired with the checkpoint {target!r}; "
                          f"set [draft] checkpoint to a model of the same vocabulary (paired: {paired})")
    return entry.draft


def load_draft_model(name: str, target: Transformer, target_folder: Path, config: ModelConfig) -> Transformer:
    """The draft model `name` with the target's dtype, device, kernels, CUDA graphs and weights
    (`config`: the target's [model]); the target itself when `name` is its checkpoint.
    ModelLoadError naming both when their vocabularies differ."""
    folder = resolve_checkpoint(name)
    if folder == target_folder:
        return target  # drafting with the target itself: one copy of the weights (its own cache)
    model, folder = load_model(name, config.torch_dtype(), config.torch_device(), config.kernels, config.cuda_graphs,
                               config.weights)
    check_same_vocabulary(target, target_folder, config.checkpoint, model, folder, name)
    return model


def check_same_vocabulary(target: Transformer, target_folder: Path, target_name: str,
                          draft: Transformer, draft_folder: Path, draft_name: str) -> None:
    """ModelLoadError, naming both checkpoints, unless the draft model's tokens are the
    target's: the same vocabulary size and, where both folders have a tokenizer, the same
    token -> id map (added tokens included)."""
    def refuse(why: str) -> None:
        raise ModelLoadError(f"the draft model {draft_name!r} cannot draft for {target_name!r}: {why}")

    if draft.args.vocab_size != target.args.vocab_size:
        refuse(f"its vocabulary has {draft.args.vocab_size:,} tokens, the target's {target.args.vocab_size:,}")
    try:
        draft_vocab = load_tokenizer(draft_folder).get_vocab()
        target_vocab = load_tokenizer(target_folder).get_vocab()
    except ModelLoadError:
        return  # a folder without a tokenizer (a bare checkpoint): the sizes are all there is to compare
    if draft_vocab != target_vocab:
        differ = sorted(set(draft_vocab.items()) ^ set(target_vocab.items()))[:3]
        refuse(f"their tokenizers differ ({len(draft_vocab):,} and {len(target_vocab):,} tokens; e.g. {differ})")
