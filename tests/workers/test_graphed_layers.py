"""Graphed layers (workers.graphed_layers): steps padded to row buckets over a fixed cache
window give what plain steps give. On the CPU the padded path runs eagerly (capture=False);
on a CUDA machine the captured graphs are checked against plain launches too."""

import pytest
import torch

from workers.drafters.pseudo_forward import run_to_end
from workers.graphed_layers import KEY_BUCKET_MIN, ROW_BUCKETS, GraphedLayers, key_bucket, row_bucket
from workers.sampling import Greedy
from workers.tree import TokenTree, root_only
from workers.tree_step import decoding_cache, tree_step


def test_buckets():
    assert [row_bucket(n) for n in (1, 2, 3, 5, 13, 128)] == [1, 2, 4, 8, 16, 128]
    assert row_bucket(ROW_BUCKETS[-1] + 1) is None
    assert key_bucket(1, 4096) == KEY_BUCKET_MIN
    assert key_bucket(KEY_BUCKET_MIN + 1, 4096) == 2 * KEY_BUCKET_MIN
    assert key_bucket(3000, 2600) == 2600  # never past the cache


def decode(model, cache, prompt, trees, graphs):
    """A prefill step, then one tree step per tree (rooted at the last committed token);
    per step its logits, path and the cache's committed keys."""
    model.use_graphs(graphs)
    try:
        cache.truncate(0)
        out = [run_to_end(tree_step(model, cache, root_only(prompt[-1]), Greedy(), 0, prompt[:-1]))]
        for tokens, parents in trees:
            root = out[-1].tokens[-1]
            out.append(run_to_end(tree_step(model, cache, TokenTree.from_parents([root, *tokens], parents), Greedy(), 0)))
        return [(o.logits.clone(), o.path, o.tokens) for o in out], cache.k[:, :, :, : cache.length].clone()
    finally:
        model.use_graphs(None)


TREES = [([], [-1]), ([5, 6, 7], [-1, 0, 0, 1]), ([9] * 12, [-1, *range(12)]), ([3, 4], [-1, 0, 1])]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral_window"])
def test_padded_steps_give_the_plain_steps_logits_paths_and_cache(tiny_models, kind):
    """A prompt longer than the largest row bucket (its prefill runs plain), then trees of 1
    to 13 rows, over a context that crosses a key bucket (the sliding-window model masks by
    distance too)."""
    model, _ = tiny_models(kind)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, model.args.vocab_size, (KEY_BUCKET_MIN - 8,), generator=g).tolist()
    with torch.inference_mode():
        cache = decoding_cache(model, 300)
        plain, plain_k = decode(model, cache, prompt, TREES * 3, None)
        padded, padded_k = decode(model, cache, prompt, TREES * 3, GraphedLayers(model, capture=False))
    assert cache.length > KEY_BUCKET_MIN  # the later steps attended through the next key bucket
    for (a_logits, a_path, a_tokens), (b_logits, b_path, b_tokens) in zip(plain, padded, strict=True):
        torch.testing.assert_close(b_logits, a_logits, atol=1e-5, rtol=0)
        assert (b_path, b_tokens) == (a_path, a_tokens)
    torch.testing.assert_close(padded_k, plain_k, atol=1e-6, rtol=0)


def test_steps_outside_the_buckets_run_plain(tiny_models):
    """A prompt longer than the largest bucket, a batch, a step that would pad past the cache's
    end, and calls outside inference mode are not padded: `fits` says no and model.layer calls the layer itself."""
    model, _ = tiny_models("llama")
    graphs = GraphedLayers(model, capture=False)
    cache = decoding_cache(model, 16)
    h = torch.zeros(1, ROW_BUCKETS[-1] + 1, model.args.dim)
    ctx = model.context(torch.arange(h.shape[1]), cache)
    with torch.inference_mode():
        assert not graphs.fits(h, ctx)
        assert graphs.fits(h[:, :3], model.context(torch.arange(3), cache))
        cache.commit(cache.max_len - 3)
        assert not graphs.fits(h[:, :3], model.context(cache.length + torch.arange(3), cache))  # pads to 4
        assert graphs.fits(h[:, :2], model.context(cache.length + torch.arange(2), cache))
        assert not graphs.fits(torch.zeros(2, 1, model.args.dim), model.context(torch.arange(1), cache))  # a batch
    cache.truncate(0)
    with torch.no_grad():
        assert not graphs.fits(h[:, :3], model.context(torch.arange(3), cache))


def test_capture_needs_a_cuda_model(tiny_models):
    model, _ = tiny_models("llama")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        GraphedLayers(model)


@pytest.mark.real_model
def test_real_model_modes_with_padded_layers_decode_ar_tokens(real_model, chat_prompt_ids):
    """The real model, float32: ar, the tree modes and the pipeline (two workers on threads,
    sharing the model and its padded layers, each with its own cache) give plain ar's tokens."""
    from configs.schema import DrafterConfigs, ModelConfig, PipelineConfig, TreeSizingConfig
    from runtime.engine import Engine

    engine = Engine(ModelConfig(dtype="float32", device="cpu", max_context=512),
                    DrafterConfigs(tree_sizing=TreeSizingConfig(cost="off")), PipelineConfig(transport="local", workers=2))
    try:
        ar = [t for s in engine.steps(chat_prompt_ids, "ar", 32) for t in s.tokens]
        engine.model.use_graphs(GraphedLayers(engine.model, capture=False))
        accepted = False
        for mode in ("ar", "ht", "ht-pld", "pipeline"):
            steps = list(engine.steps(chat_prompt_ids, mode, 32))
            assert [t for s in steps for t in s.tokens] == ar, mode
            accepted |= mode != "ar" and any(len(s.tokens) > 1 for s in steps)
        assert accepted  # drafts accepted: tree rows padded and verified
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs: needs a CUDA device")
@pytest.mark.parametrize("kind", ["llama", "mistral_window"])
def test_captured_graphs_match_plain_launches_on_cuda(tiny_checkpoint, kind):
    from workers.loading import load_model

    model, _ = load_model(str(tiny_checkpoint(kind)), torch.float32, "cuda", cuda_graphs=False)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, model.args.vocab_size, (KEY_BUCKET_MIN - 8,), generator=g).tolist()
    with torch.inference_mode():
        cache = decoding_cache(model, 300)
        plain, plain_k = decode(model, cache, prompt, TREES * 3, None)
        graphed, graphed_k = decode(model, cache, prompt, TREES * 3, GraphedLayers(model))
    for (a_logits, a_path, a_tokens), (b_logits, b_path, b_tokens) in zip(plain, graphed, strict=True):
        torch.testing.assert_close(b_logits, a_logits, atol=1e-4, rtol=0)
        assert (b_path, b_tokens) == (a_path, a_tokens)
    torch.testing.assert_close(graphed_k, plain_k, atol=1e-4, rtol=0)
