"""Lossless sampling (workers.sampling): the target distribution, seeded draws, and the tree walk.

The chain of evidence: probabilities() is transformers' temperature/top-k/top-p
distribution; ar's sampled tokens follow it (chi-square, with a check that the test
catches a 20% change of temperature); walking a deep tree draws every token from the target's
distribution at its context (chi-square on the joint of three tokens) and draws the same
tokens as plain sampling; and every mode draws ar's tokens seed by seed (here on a tiny
model, in tests/runtime/decoding/ on the real one).
"""

import pytest
import torch

from configs.schema import SamplingConfig
from runtime.decoding.autoregressive import generate_ar
from workers.sampling import Greedy, NonFiniteLogitsError, Sampler, chooser, inverse_cdf, probabilities
from workers.tree import TokenTree
from workers.tree_step import accept

CONFIGS = [
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.0, top_k=5),
    SamplingConfig(temperature=0.7, top_p=0.8),
    SamplingConfig(temperature=1.3, top_k=10, top_p=0.5),
]


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of `counts` against `probs`; cells expected below 5
    are pooled into one. A cell with observations but zero probability gives 0."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat((counts[~small], counts[small].sum().reshape(1)))
    exp = torch.cat((expected[~small], expected[small].sum().reshape(1)))
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.double), stat / 2))


@pytest.mark.parametrize("config", CONFIGS)
def test_probabilities_match_transformers_warpers(config):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 60, generator=torch.Generator().manual_seed(0)) * 3
    warped = TemperatureLogitsWarper(config.temperature)(None, logits)
    if config.top_k:
        warped = TopKLogitsWarper(config.top_k)(None, warped)
    if config.top_p < 1:
        warped = TopPLogitsWarper(config.top_p)(None, warped)
    torch.testing.assert_close(probabilities(logits, config), torch.softmax(warped, -1), atol=1e-6, rtol=0)


def test_inverse_cdf_never_draws_a_zero_probability_token():
    p = torch.tensor([0.2, 0.0, 0.5, 0.3])
    assert [inverse_cdf(p, u)[0] for u in (0.0, 0.1, 0.2, 0.3, 0.69, 0.7, 0.99)] == [0, 0, 2, 2, 2, 3, 3]
    token, low, high = inverse_cdf(p, 0.3)
    assert (token, low, high) == (2, pytest.approx(0.2), pytest.approx(0.7))


def test_margins_measure_how_far_a_draw_is_from_flipping():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    sampler = Sampler(SamplingConfig(temperature=1.0), 4)
    p = torch.softmax(logits, 0)
    sampler.uniforms[0] = float(p[0]) + 1e-4  # just past token 0's interval
    token, margin = sampler.choose(logits, 0)
    assert token == 1 and 0 < margin < 1e-2
    # Raising token 0's logit by more than the margin (in log-odds) flips the draw back.
    assert sampler.choose(logits + torch.tensor([1.1 * margin, 0, 0, 0]), 0)[0] == 0
    assert Greedy().choose(logits, 0) == (0, 1.0)
    assert isinstance(chooser(SamplingConfig(), 4), Greedy) and isinstance(chooser(CONFIGS[0], 4), Sampler)


def test_same_seed_same_draws_other_seed_other_draws():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    draws = lambda seed: [Sampler(SamplingConfig(temperature=1.0, seed=seed), 64).choose(logits, i)[0] for i in range(64)]  # noqa: E731
    assert draws(3) == draws(3) and draws(3) != draws(4)


@pytest.mark.parametrize("config,check_power", [(CONFIGS[0], True), (CONFIGS[1], False), (CONFIGS[2], False)])
def test_ar_samples_the_model_distribution(tiny_models, config, check_power):
    model, _ = tiny_models("llama")
    prompt, n = [5, 17, 42, 8], 3000
    cache = model.new_cache(16)
    first = lambda seed: next(generate_ar(model, cache, prompt, 1, set(), chooser(SamplingConfig(**{**config.__dict__, "seed": seed}), 1)))  # noqa: E731
    counts = torch.bincount(torch.tensor([first(seed).tokens[0] for seed in range(n)]), minlength=model.args.vocab_size)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), model.context(torch.arange(len(prompt))))[0, -1]
    p = probabilities(logits, config)
    assert chi_square_p_value(counts, p) > 1e-3
    if check_power:  # on the whole vocabulary: the same counts fail against a 20% lower
        # temperature (the sharpening a sampler that accepts drafts too readily causes).
        sharper = SamplingConfig(**{**config.__dict__, "temperature": config.temperature * 0.8})
        assert chi_square_p_value(counts, probabilities(logits, sharper)) < 1e-6


# --------------------------------------------------------------------------- tree walk

VOCAB = 6


def target_logits(context: tuple[int, ...]) -> torch.Tensor:
    """A synthetic target: fixed random logits for each context."""
    g = torch.Generator().manual_seed(hash(context) % 2**31)
    return torch.randn(VOCAB, generator=g) * 1.5


def full_tree(root: int, width: int, depth: int) -> TokenTree:
    """Every node gets the `width` most likely tokens of the synthetic target as children
    (the deepest level gets the least likely instead, so that both kinds occur)."""
    tokens, parents, depths, contexts = [root], [-1], [0], [(root,)]
    frontier = [0]
    for d in range(1, depth + 1):
        nxt = []
        for node in frontier:
            ranked = torch.argsort(target_logits(contexts[node]), descending=d < depth).tolist()
            for t in ranked[:width]:
                tokens.append(t), parents.append(node), depths.append(d), contexts.append(contexts[node] + (t,))
                nxt.append(len(tokens) - 1)
        frontier = nxt
    tree = TokenTree(tokens, parents, depths, [0.0] * len(tokens))
    tree.contexts = contexts
    return tree


def test_walking_a_deep_tree_samples_the_target_distribution():
    config, n, length = SamplingConfig(temperature=0.8, top_p=0.95), 6000, 3
    tree = full_tree(root=0, width=2, depth=4)
    logits = torch.stack([target_logits(c) for c in tree.contexts])
    counts = torch.zeros([VOCAB] * length)
    deepest = 0
    for seed in range(n):
        sampler = Sampler(SamplingConfig(**{**config.__dict__, "seed": seed}), length)
        path, tokens, _ = accept(tree, logits, sampler, 0)
        deepest = max(deepest, len(path) - 1)
        assert tokens[:-1] == [tree.tokens[i] for i in path[1:]]
        while len(tokens) < length:  # the following steps, as plain sampling
            tokens.append(sampler.choose(target_logits(tuple([0] + tokens)), len(tokens))[0])
        plain = []
        for i in range(length):
            plain.append(sampler.choose(target_logits(tuple([0] + plain)), i)[0])
        assert tokens[:length] == plain  # the walk draws plain sampling's tokens
        counts[tuple(tokens[:length])] += 1
    assert deepest == 4  # whole paths of the tree were accepted
    exact = torch.zeros([VOCAB] * length)
    for a in range(VOCAB):
        pa = probabilities(target_logits((0,)), config)[a]
        for b in range(VOCAB):
            pb = probabilities(target_logits((0, a)), config)[b]
            exact[a, b] = pa * pb * probabilities(target_logits((0, a, b)), config)
    assert chi_square_p_value(counts, exact) > 1e-3


def test_modes_draw_ar_tokens_on_a_tiny_model(tiny_models):
    from configs.schema import PseudoStateModeConfig
    from runtime.decoding.speculative import SpeculativeDecoder
    from workers.drafters.base import LookupChain, TreeProposer
    from workers.drafters.hidden_transfer import HiddenTransfer
    from workers.drafters.prompt_lookup import PromptLookupDrafter
    from workers.drafters.pseudo_proposer import PseudoStateProposer
    from workers.drafters.pseudo_states import PseudoStateConfig
    from workers.drafters.token_recycling import TokenRecyclingDrafter

    model, _ = tiny_models("llama")
    cache = model.new_cache(128)
    torch.manual_seed(0)
    ht = HiddenTransfer(PseudoStateConfig(layer=1, k=3), model.args.dim)
    ht.transfer.data += 0.05 * torch.randn_like(ht.transfer)
    decoders = {
        "pld": SpeculativeDecoder(model, cache, [LookupChain(PromptLookupDrafter(1, 3, 6))]),
        "token-recycling": SpeculativeDecoder(model, cache, [TreeProposer(TokenRecyclingDrafter(model.args.vocab_size, 8, 12))]),
        "ht": SpeculativeDecoder(model, cache, [PseudoStateProposer(ht, PseudoStateModeConfig(budget=10, top_k=4), model.args)]),
    }
    prompt, n = [5, 17, 42, 8, 5, 17], 24
    multi = {name: 0 for name in decoders}
    for config in CONFIGS[1:3]:
        for seed in range(12):
            c = SamplingConfig(**{**config.__dict__, "seed": seed})
            ar = [t for s in generate_ar(model, cache, prompt, n, set(), chooser(c, n)) for t in s.tokens]
            for name, decoder in decoders.items():
                steps = list(decoder.generate(prompt, n, set(), chooser(c, n)))
                assert [t for s in steps for t in s.tokens] == ar, (name, config, seed)
                multi[name] += sum(len(s.tokens) > 1 for s in steps)
    assert multi["token-recycling"] > 0 and multi["pld"] > 0  # drafts were accepted, not only bonus tokens


@pytest.mark.parametrize("temperature", [1e-40, 1e-45, 1e-300, 5e-324])
def test_a_tiny_temperature_draws_the_greedy_token(temperature):
    """logits / 1e-40 overflows float32; the scaled logits must not: the distribution is
    the one-hot greedy choice, finite, for every uniform."""
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(3)) * 8
    config = SamplingConfig(temperature=temperature)
    p = probabilities(logits, config)
    assert torch.isfinite(p).all()
    assert torch.equal(p.argmax(-1), logits.argmax(-1)) and torch.equal(p.amax(-1), torch.ones(6))
    sampler = Sampler(config, 64)
    for row in logits:
        assert {sampler.choose(row, n)[0] for n in range(64)} == {Greedy().choose(row, 0)[0]}


def test_huge_logits_scale_without_overflow():
    logits = torch.tensor([3e38, 2.9e38, -3e38, 0.0])
    p = probabilities(logits, SamplingConfig(temperature=0.5))
    assert torch.isfinite(p).all() and int(p.argmax()) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_never_reach_a_draw(bad):
    logits = torch.tensor([1.0, bad, 0.5])
    with pytest.raises(NonFiniteLogitsError):
        Sampler(SamplingConfig(temperature=0.7), 4).choose(logits, 0)
    with pytest.raises(NonFiniteLogitsError):
        Greedy().choose(logits, 0)
    # -inf is a token the model rules out: allowed, and never drawn.
    with pytest.raises(NonFiniteLogitsError):
        Greedy().choose(torch.full((3,), float("-inf")), 0)
    masked = torch.tensor([1.0, float("-inf"), 0.5])
    assert {Sampler(SamplingConfig(temperature=1.0, seed=s), 1).choose(masked, 0)[0] for s in range(20)} <= {0, 2}
