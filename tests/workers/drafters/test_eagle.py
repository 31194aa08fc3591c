"""The EAGLE peer's drafter (workers.drafters.eagle): every drafted node scored as a cache-free
recomputation of its path scores it, across steps; the best-node cut; the weights file."""

import pytest
import torch
import torch.nn.functional as F

from workers.drafters.eagle import EagleConfig, EagleDrafter, EagleModel, best_nodes
from workers.drafters.loading import DrafterWeightsError
from workers.model import ModelArgs
from workers.tree import root_only


def random_eagle(model, vocab: int, seed: int = 0) -> EagleModel:
    torch.manual_seed(seed)
    eagle = EagleModel(model.args, EagleConfig(vocab=vocab))
    for p in eagle.parameters():
        p.data.normal_(0, 0.3 if p.dim() > 1 else 0.1)
    eagle.layer.input_layernorm.weight.data.fill_(1.0)
    eagle.layer.post_attention_layernorm.weight.data.fill_(1.0)
    eagle.vocab_ids.copy_(torch.randperm(model.args.vocab_size)[:vocab].sort().values)
    return eagle


@torch.no_grad()
def reference_log_probs(drafter: EagleDrafter, rows: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Run all rows [feature ; e(token)] from position 0, causal, without a cache; the draft
    log-probabilities (target ids -> value; -inf outside the draft vocabulary) after the last."""
    model = drafter.model
    feats = torch.stack([f for f, _ in rows])[None]
    emb = model.embed(torch.tensor([[t for _, t in rows]]))
    out = drafter.eagle(feats, emb, model.context(torch.arange(len(rows))))[0]
    lp = torch.full((model.args.vocab_size,), float("-inf"))
    lp[drafter.eagle.vocab_ids] = F.log_softmax(drafter.vocabulary.head(model.norm(out[-1])).float(), -1)
    return lp, out[-1]


def check_tree(drafter: EagleDrafter, history: list[tuple[torch.Tensor, int]], tree) -> None:
    """Each node's score minus its parent's is its log-probability under a recomputation of
    its path: history rows, then [parent's predicted feature ; token] for each node above it."""
    outputs = {}

    def rows_to(node):  # the rows whose last output drafts node's children
        if node == 0:
            return list(history)
        parent_rows = rows_to(tree.parents[node])
        return parent_rows + [(outputs[tree.parents[node]], tree.tokens[node])]

    children = tree.children()
    for node in range(len(tree)):
        if not children[node]:
            continue
        lp, out = reference_log_probs(drafter, rows_to(node))
        outputs[node] = out
        for child in children[node]:
            got = tree.scores[child] - tree.scores[node]
            assert got == pytest.approx(float(lp[tree.tokens[child]]), abs=2e-4)
        if node == 0:  # the root's children are its top_k drafts
            assert sorted(tree.tokens[c] for c in children[0]) == sorted(torch.topk(lp, drafter.top_k).indices.tolist())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_every_node_is_scored_as_its_own_path_would_be(tiny_models, kind):
    model, _ = tiny_models(kind)
    torch.manual_seed(1)
    drafter = EagleDrafter(random_eagle(model, vocab=100), model, 256, depth=4, top_k=2, budget=100)
    prompt = torch.randint(0, model.args.vocab_size, (7,)).tolist()
    feats = torch.randn(7, model.args.dim)
    drafter.start(prompt)
    drafter.feed(feats)
    root = 5
    tree = drafter.propose(root)
    assert len(tree) == 1 + 2 + 4 + 4 + 4 and tree.max_depth == 4  # depth d > 1: the top_k best of d - 1 expanded
    history = list(zip(feats, prompt[1:] + [root]))
    check_tree(drafter, history, tree)
    assert drafter.cache.length == 7  # the tree's rows are gone, the committed ones stay

    # A step accepted the root and its first child, then the target chose token 9.
    child = tree.tokens[1]
    drafter.observe(tree, [0, 1], None)
    step_feats = torch.randn(2, model.args.dim)
    drafter.feed(step_feats)
    tree = drafter.propose(9)
    history += [(step_feats[0], child), (step_feats[1], 9)]
    check_tree(drafter, history, tree)
    assert drafter.cache.length == 9

    # The root 9 alone was accepted and the target chose 10; then a plain step (other
    # replies sharing the passes) committed 10 with no proposal, and the target chose 11.
    drafter.observe(tree, [0], None)
    f9 = torch.randn(1, model.args.dim)
    drafter.feed(f9)
    drafter.skip(10)
    drafter.observe(root_only(10), [0], None)
    f10 = torch.randn(1, model.args.dim)
    drafter.feed(f10)
    tree = drafter.propose(11)
    check_tree(drafter, history + [(f9[0], 10), (f10[0], 11)], tree)
    assert drafter.cache.length == 11


def test_budget_keeps_the_best_nodes_with_their_ancestors():
    #         root  a     b     a1    a2    b1
    tokens = [0, 10, 11, 12, 13, 14]
    parents = [-1, 0, 0, 1, 1, 2]
    depths = [0, 1, 1, 2, 2, 2]
    scores = [0.0, -0.1, -2.0, -0.5, -3.0, -2.1]
    tree = best_nodes(tokens, parents, depths, scores, budget=4)
    assert tree.tokens == [0, 10, 11, 12] and tree.parents == [-1, 0, 0, 1]
    tree = best_nodes(tokens, parents, depths, scores, budget=3)
    assert tree.tokens == [0, 10, 12] and tree.parents == [-1, 0, 1] and tree.depths == [0, 1, 2]
    tie = best_nodes([0, 10, 11], [-1, 0, 1], [0, 1, 2], [0.0, 0.0, 0.0], budget=2)
    assert tie.tokens == [0, 10]  # a tie goes to the shallower node: the tree stays a tree


def test_weights_round_trip_and_refuse_another_model(tiny_models, tmp_path):
    model, _ = tiny_models("llama")
    eagle = random_eagle(model, vocab=50)
    path = tmp_path / "e.safetensors"
    eagle.save(path, extra={"training": {"steps": 3}})
    loaded = EagleModel.load(path, model.args)
    assert loaded.training_summary == {"steps": 3}
    assert torch.equal(loaded.vocab_ids, eagle.vocab_ids)
    for (name, a), (_, b) in zip(eagle.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float() if a.is_floating_point() else a, b), name  # stored in bfloat16
    other = ModelArgs(**{**model.args.__dict__, "dim": model.args.dim * 2})
    with pytest.raises(DrafterWeightsError, match="trained for a model"):
        EagleModel.load(path, other)
    with pytest.raises(DrafterWeightsError, match="do not exist"):
        EagleModel.load(tmp_path / "missing.safetensors", model.args)


def test_drafter_settings_are_checked(tiny_models):
    model, _ = tiny_models("llama")
    with pytest.raises(ValueError, match="depth, top_k and budget"):
        EagleDrafter(random_eagle(model, vocab=10), model, 64, depth=0, top_k=2, budget=4)
