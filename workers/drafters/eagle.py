"""EAGLE: a one-layer draft model over the target's features, drafting a dynamic tree (EAGLE-2).

The target's feature f_q at position q is its last layer's hidden state there, before the
final norm. The draft model reads the row [f_q ; e(x_{q+1})] (the feature of a token and
the embedding of the token after it), maps it to dim with `fc` and runs one decoder layer
of the target's shape over those rows (its own KV cache, causal). Its output at row q is a
prediction of f_{q+1}; the target's final norm and LM head, cut to the `vocab_ids` draft
vocabulary (the most frequent tokens, FR-Spec style: on a CPU the full head would cost a
fifth of a target step at every depth), read from it a draft of x_{q+2}.

Drafting a tree from root y at position P (the committed token the target has not cached):
    catch-up   the rows committed since the last step: the features of the accepted path
               (given by `feed`) paired with the tokens after them, the last one with y
    depth 1    the catch-up's last output drafts y's children
    depth d    the `top_k` best nodes of depth d - 1 (by path log-probability) run as rows
               [their parent's output ; e(their token)] at position P + d - 2, each seeing
               the cache and its own ancestors' rows, and draft their children
    tree       the `budget` best nodes of all drafted (EAGLE-2's reranking); the cache is
               cut back to the committed rows
Trees never change what is committed (the target verifies them), so any weights are lossless.
Trained by runtime.training.eagle_trainer; weights are safetensors with their metadata.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from workers.drafters.draft_vocabulary import DraftVocabulary
from workers.drafters.loading import DrafterWeightsError, read_model_weights
from workers.kv_cache import KVCache
from workers.model import AttentionContext, DecoderLayer, Linear, ModelArgs, Transformer, set_kernels
from workers.tree import TokenTree

METADATA_KEY = "leapfrog.eagle"


@dataclass(frozen=True)
class EagleConfig:
    vocab: int  # draft vocabulary size (len(vocab_ids))


class EagleModel(nn.Module):
    """The trained part: fc ([feature ; embedding] -> dim), one decoder layer, the draft vocabulary."""

    def __init__(self, args: ModelArgs, config: EagleConfig):
        super().__init__()
        self.args, self.config = args, config
        self.fc = Linear(2 * args.dim, args.dim, bias=True)
        self.layer = DecoderLayer(args, 0)  # layer index 0 of its own one-layer cache
        self.register_buffer("vocab_ids", torch.arange(config.vocab))  # draft vocabulary -> target token ids
        self.training_summary: dict = {}

    def forward(self, features: torch.Tensor, embeddings: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """features, embeddings (B, n, dim) -> predicted next features (B, n, dim)."""
        x = torch.cat((features.to(self.fc.weight.dtype), embeddings.to(self.fc.weight.dtype)), dim=-1)
        return self.layer(self.fc(x, ctx.prompt_rows), ctx)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        meta = {"config": asdict(self.config), "model": signature(self.args), **(extra or {})}
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        tensors = {name: t if name == "vocab_ids" else t.to(torch.bfloat16) for name, t in tensors.items()}
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, args: ModelArgs) -> EagleModel:
        meta, tensors = read_model_weights(path, METADATA_KEY, "eagle", "leapfrog train --drafter eagle", signature(args))
        module = cls(args, EagleConfig(**meta["config"]))
        try:
            module.load_state_dict({name: t.to(torch.float32) if t.is_floating_point() else t for name, t in tensors.items()})
        except RuntimeError as e:
            raise DrafterWeightsError(f"{path} does not fit this model: {e}") from None
        module.training_summary = meta.get("training", {})
        return module


def signature(args: ModelArgs) -> dict:
    return {"architecture": args.architecture, "dim": args.dim, "n_layers": args.n_layers, "vocab_size": args.vocab_size,
            "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "intermediate_size": args.intermediate_size}


class EagleDrafter:
    """Drafts EAGLE-2 trees; as a proposer (workers.drafters.base.TreeProposer) it is fed the
    target's features (`feed`) after the prefill and after every step."""

    observed_top_k = 1

    def __init__(self, eagle: EagleModel, model: Transformer, max_len: int, depth: int, top_k: int, budget: int):
        if min(depth, top_k, budget) < 1:
            raise ValueError(f"eagle depth, top_k and budget must be >= 1, got {depth}, {top_k}, {budget}")
        self.model, self.depth, self.top_k, self.budget = model, depth, top_k, budget
        self.eagle = eagle.to(device=model.device, dtype=model.dtype).eval().requires_grad_(False)
        set_kernels(self.eagle, model.kernels)
        self.vocabulary = DraftVocabulary(model, eagle.vocab_ids)  # the target's head cut to it
        a = model.args
        self.cache = KVCache(1, a.n_kv_heads, a.head_dim, max_len, dtype=model.attention_dtype, device=model.device)
        self.hidden: torch.Tensor | None = None  # features not yet run: (m, dim)
        self.next_tokens: list[int] = []  # the tokens after them, but for the last (the next root)

    def start(self, prompt_ids: list[int]) -> None:
        self.cache.truncate(0)
        self.hidden, self.next_tokens = None, list(prompt_ids[1:])

    def feed(self, hidden: torch.Tensor) -> None:
        """The target's features (m, dim) of the positions committed since the last call."""
        self.hidden = hidden if self.hidden is None else torch.cat((self.hidden, hidden))

    def observe(self, tree: TokenTree, path: list[int], top_tokens: torch.Tensor) -> None:
        self.next_tokens += [tree.tokens[node] for node in path[1:]]

    def skip(self, root: int) -> None:
        """A plain step committed `root` unproposed: it follows the features not yet run."""
        self.next_tokens.append(root)

    def rows(self, features: torch.Tensor, tokens: list[int], positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Run rows [features ; e(tokens)] at `positions` into the cache (kept pending); their outputs (n, dim)."""
        m = self.model
        ctx = m.context(positions, self.cache)
        if mask is not None:
            ctx.mask = mask
        out = self.eagle(features[None], m.embed(torch.tensor([tokens], device=m.device)), ctx)
        return out[0]

    @torch.inference_mode()
    def propose(self, root: int) -> TokenTree:
        committed = self.cache.length
        m = len(self.next_tokens) + 1
        positions = torch.arange(committed, committed + m, device=self.model.device)
        last = self.rows(self.hidden, self.next_tokens + [root], positions, None)[-1]
        self.cache.commit(m)
        self.hidden, self.next_tokens = None, []  # run: what comes next is fed and observed anew
        committed += m
        # Drafted nodes (index 0: the root): token, parent, depth, path log-probability, row in the cache.
        tokens, parents, depths, scores, cached_row = [root], [-1], [0], [0.0], [-1]
        outputs = last[None]  # the outputs that draft children, one per expanded node
        expanded = [0]
        for depth in range(1, self.depth + 1):
            values, drafted = self.vocabulary.top(self.vocabulary.logprobs(outputs), self.top_k)
            first_child = len(tokens)
            for out_row, parent in enumerate(expanded):
                for lp, v in zip(values[out_row], drafted[out_row]):
                    tokens.append(v)
                    parents.append(parent)
                    depths.append(depth)
                    scores.append(scores[parent] + lp)
                    cached_row.append(-1)
            if depth == self.depth:
                break
            # Expand the best of this depth: one row each, fed its parent's output.
            new = sorted(range(first_child, len(tokens)), key=lambda i: -scores[i])[: self.top_k]
            parent_out = outputs[[expanded.index(parents[i]) for i in new]]
            pending = self.cache.length - committed
            mask = torch.zeros(len(new), committed + pending + len(new), dtype=torch.bool)
            mask[:, :committed] = True
            for r, node in enumerate(new):
                mask[r, committed + pending + r] = True
                ancestor = parents[node]
                while ancestor > 0:
                    mask[r, committed + cached_row[ancestor]] = True
                    ancestor = parents[ancestor]
                cached_row[node] = pending + r
            positions = torch.tensor([committed - 1 + depth] * len(new), device=self.model.device)
            outputs = self.rows(parent_out, [tokens[i] for i in new], positions, mask.to(self.model.device))
            self.cache.commit(len(new))
            expanded = new
        self.cache.truncate(committed)
        return best_nodes(tokens, parents, depths, scores, self.budget)


def best_nodes(tokens: list[int], parents: list[int], depths: list[int], scores: list[float], budget: int) -> TokenTree:
    """The root and the budget - 1 drafted nodes of highest path log-probability, as a tree.

    A child's score is its parent's plus a log-probability <= 0, so the best nodes (ties to
    the shallower) always include their ancestors."""
    chosen = sorted(range(1, len(tokens)), key=lambda i: (-scores[i], depths[i], i))[: budget - 1]
    order = [0] + sorted(chosen, key=lambda i: (depths[i], i))
    index = {node: i for i, node in enumerate(order)}
    return TokenTree([tokens[i] for i in order], [-1] + [index[parents[i]] for i in order[1:]],
                     [depths[i] for i in order], [scores[i] for i in order])
