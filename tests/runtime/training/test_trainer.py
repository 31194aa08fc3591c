"""Drafter training (runtime.training.trainer, runtime.training.objective) and its data
(runtime.training.distill, runtime.training.sharegpt).

Everything runs on a tiny random Llama (hidden 64, 4 layers) and token sequences the tiny
model generated greedily itself; only the ShareGPT parser reads the real data file.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from configs.training import TrainConfig, TrainError
from runtime.decoding.autoregressive import generate_ar
from runtime.training import distill, sharegpt
from runtime.training.objective import (
    PrefixKV,
    draft_logits,
    encode_packed,
    encode_sequence,
    evaluate,
    pack_loss,
    target_logits,
)
from runtime.training.loop import weights_paths
from runtime.training.trainer import train
from workers.drafters.hidden_transfer import HiddenTransfer
from workers.drafters.loading import build, load
from workers.drafters.pseudo_forward import run_to_end
from workers.drafters.pseudo_states import PseudoStateConfig
from workers.loading import load_model
from workers.sampling import Greedy
from workers.tree import root_only
from workers.tree_step import tree_step

from tiny_training import REPLY, examples, model, tiny_folder  # noqa: F401 - fixtures


def perturbed(model, layer, k, pseudo_attention, seed=0, kind="ht", refine_layers=()):
    torch.manual_seed(seed)
    config = PseudoStateConfig(layer, k, pseudo_attention, kind, refine_layers)
    ht = build(config, model.args.dim)
    for p in ht.parameters():
        p.data += 0.1 * torch.randn_like(p)
    return ht


def inference_drafts(model, ht, cache, catch_up: list[int], root: int) -> torch.Tensor:
    """Draft logits (k, vocab) of the decoding path: a tree step over the catch-up tokens
    and a root-only tree with pseudo states at the root (workers.tree_step)."""
    return run_to_end(tree_step(model, cache, root_only(root), Greedy(), 0, catch_up, ht, [0])).drafts


def config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "ht.safetensors"), layer=2, k=3, steps=40, lr=3e-3, batch=2, positions_per_seq=8,
                log_every=10, eval_every=0, checkpoint_every=10, progress=False, threads=1, device="cpu")
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------ training == inference


@pytest.mark.parametrize(
    "kind,layer,refine_layers,pseudo_attention",
    [("ht", 2, (), True), ("ht", 2, (), False), ("ht", 1, (2, 3), True), ("medusa", 4, (), True), ("pass", 0, (), True)],
)
def test_training_drafts_equal_inference_drafts(model, examples, kind, layer, refine_layers, pseudo_attention):
    """The read-only prefix path of training computes exactly the drafts of decoding
    (workers.tree_step), for every pseudo-state kind and with FIRP-style refine layers."""
    ht = perturbed(model, layer, 3, pseudo_attention, kind=kind, refine_layers=refine_layers)
    e = examples[0][0]
    ids = e["prompt_ids"] + e["reply_ids"]
    P = len(e["prompt_ids"])
    ts = [P - 1, P + 4, P + 11, len(ids) - 4]  # several positions at once: groups must not leak
    with torch.no_grad():
        enc = encode_sequence(model, ids, ht.config.layer, ht.config.refine_layers)
        train_drafts = draft_logits(model, ht, enc, torch.tensor(ts))
        cache = model.new_cache(64)
        for i, t in enumerate(ts):
            # Prefill-style: the real tokens 0..t in one pass, pseudo states for the last one.
            cache.truncate(0)
            drafts = inference_drafts(model, ht, cache, ids[:t], ids[t])
            torch.testing.assert_close(train_drafts[i], drafts, atol=1e-4, rtol=1e-4)
            # Decode-step-style: tokens up to P-1 committed, the rest caught up in a later step.
            if t >= P:
                cache.truncate(0)
                inference_drafts(model, ht, cache, ids[: P - 1], ids[P - 1])
                assert cache.length == P
                drafts = inference_drafts(model, ht, cache, ids[P:t], ids[t])
                torch.testing.assert_close(train_drafts[i], drafts, atol=1e-4, rtol=1e-4)


def test_targets_are_the_model_logits(model, examples):
    e = examples[0][0]
    ids = e["prompt_ids"] + e["reply_ids"]
    with torch.no_grad():
        enc = encode_sequence(model, ids, 2)
        full = model(torch.tensor([ids]), model.context(torch.arange(len(ids))))[0]
        ts = torch.tensor([len(e["prompt_ids"]) - 1, len(ids) - 4])
        target = target_logits(model, enc, ts, 3)
    for i, t in enumerate(ts.tolist()):
        torch.testing.assert_close(target[i], full[t + 1 : t + 4], atol=1e-4, rtol=1e-4)
        # argmax at t+j is the greedy reply token at t+j+1 (where the sequence has one)
        known = ids[t + 2 : t + 5]
        assert target[i].argmax(-1).tolist()[: len(known)] == known


def test_prefix_kv_is_read_only(model, examples):
    e = examples[0][0]
    enc = encode_sequence(model, e["prompt_ids"] + e["reply_ids"], 2)
    before = [k.clone() for k in enc.prefix.k]
    k_new = torch.randn(1, 2, 5, 16)
    k_out, v_out = enc.prefix.write(3, k_new, k_new)
    assert k_out.shape[2] == enc.prefix.length + 5 and torch.equal(k_out[:, :, -5:], k_new)
    assert all(torch.equal(a, b) for a, b in zip(before, enc.prefix.k))
    assert enc.prefix.length == len(e["prompt_ids"]) + len(e["reply_ids"])
    with pytest.raises(ValueError):
        enc.prefix.write(1, k_new, k_new)  # below the transfer layer: not held
    assert isinstance(enc.prefix, PrefixKV)


def test_packed_sequences_draft_as_they_do_alone(model, examples):
    """Sequences packed into one forward give each anchor the drafts and targets it gets
    alone: no sequence sees another's tokens, and positions restart at each one."""
    ht = perturbed(model, 2, 3, True, refine_layers=(3,))
    group = examples[0][:3]
    seqs = [e["prompt_ids"] + e["reply_ids"] for e in group]
    with torch.no_grad():
        packed = encode_packed(model, seqs, 2, (3,))
        assert packed.starts == [0, len(seqs[0]), len(seqs[0]) + len(seqs[1])]
        for e, ids, first in zip(group, seqs, packed.starts):
            alone = encode_sequence(model, ids, 2, (3,))
            ts = torch.tensor([len(e["prompt_ids"]) - 1, len(ids) - 4])
            want = draft_logits(model, ht, alone, ts)
            got = draft_logits(model, ht, packed, ts + first, torch.full_like(ts, first))
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(target_logits(model, packed, ts + first, 3), target_logits(model, alone, ts, 3),
                                       atol=1e-4, rtol=1e-4)


def test_pack_loss_is_the_mean_of_the_sequence_losses(model, examples):
    ht = perturbed(model, 2, 3, True)
    group = examples[0][3:7]
    together = pack_loss(model, ht, group, 5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same positions, drawn in the same order
    alone = torch.stack([pack_loss(model, ht, [e], 5, g) for e in group]).mean()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_packed_training_follows_the_unpacked_path(model, examples, tmp_path):
    """--pack changes how many sequences share a forward, not what is learnt."""
    train_ex, val_ex = examples
    quiet = lambda *_: None  # noqa: E731
    one, _ = train(model, train_ex, val_ex, config(tmp_path / "a", steps=6, batch=4), log=quiet)
    four, summary = train(model, train_ex, val_ex, config(tmp_path / "b", steps=6, batch=4, pack=4), log=quiet)
    assert summary["training"]["pack"] == 4
    torch.testing.assert_close(four.transfer, one.transfer, atol=2e-4, rtol=1e-3)  # float sums, Adam-scaled
    with pytest.raises(TrainError, match="pack"):
        config(tmp_path, batch=2, pack=3).validate()


# ------------------------------------------------------------------ training


def test_training_lowers_loss_and_keeps_accuracy(model, examples, tmp_path):
    train_ex, val_ex = examples
    cfg = config(tmp_path, pseudo_attention=True, steps=60, lr=1e-2, batch=8, positions_per_seq=16)
    initial = evaluate(model, HiddenTransfer(PseudoStateConfig(2, 3), model.args.dim), val_ex)
    ht, summary = train(model, train_ex, val_ex, cfg, log=lambda *_: None)
    losses = summary["loss_history"]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    final = summary["val"]
    assert final["kl"] < initial["kl"]
    assert sum(final["top1"]) >= sum(initial["top1"]) - 0.01, (initial, final)
    assert sum(final["top5"]) >= sum(initial["top5"]) - 0.01, (initial, final)
    assert all(p.requires_grad is False for p in model.parameters())


def test_save_load_and_resume(model, examples, tmp_path):
    train_ex, val_ex = examples
    quiet = lambda *_: None  # noqa: E731
    straight, _ = train(model, train_ex, val_ex, config(tmp_path / "a", steps=20, schedule="constant"), log=quiet)

    cfg = config(tmp_path / "b", steps=10, schedule="constant", pseudo_attention=True)
    train(model, train_ex, val_ex, cfg, log=quiet)
    out, summary_path, ckpt = weights_paths(cfg.out)
    assert out.is_file() and summary_path.is_file() and ckpt.is_file()
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == 10
    assert summary["config"] == {"layer": 2, "k": 3, "pseudo_attention": True, "kind": "ht", "refine_layers": []}
    assert {"time_s", "examples", "val"} <= set(summary) and len(summary["val"]["top1"]) == 3

    messages = []
    cfg2 = config(tmp_path / "b", steps=20, schedule="constant", resume=True)
    resumed, summary2 = train(model, train_ex, val_ex, cfg2, log=messages.append)
    assert any("resumed" in m and "step 10" in m for m in messages)
    assert summary2["steps"] == 20 and len(summary2["loss_history"]) == 20
    # Ten steps, a checkpoint, ten more: the same weights as twenty straight steps.
    torch.testing.assert_close(resumed.transfer, straight.transfer, atol=1e-6, rtol=1e-5)

    loaded = load(out, model.args)
    assert loaded.config == resumed.config
    torch.testing.assert_close(loaded.transfer, resumed.transfer.detach())

    with pytest.raises(ValueError, match="saved for"):
        train(model, train_ex, val_ex, config(tmp_path / "b", steps=21, k=2, resume=True), log=quiet)


def test_resume_without_a_checkpoint_starts_from_init(model, examples, tmp_path):
    """--resume --init: the first run (no checkpoint yet) starts from the init weights, as
    a script that is simply run again after a stop needs; a later run resumes."""
    train_ex, val_ex = examples
    quiet = lambda *_: None  # noqa: E731
    base = tmp_path / "base.safetensors"
    train(model, train_ex, val_ex, config(tmp_path / "a", steps=3, out=str(base)), log=quiet)
    messages = []
    cfg = config(tmp_path / "b", steps=0, init=str(base), resume=True)
    started, _ = train(model, train_ex, val_ex, cfg, log=messages.append)
    assert any("started from" in m for m in messages)
    torch.testing.assert_close(started.transfer.detach(), load(base, model.args).transfer.detach())


def test_bfloat16_backbone(tiny_folder, examples, tmp_path):
    """bfloat16 backbone: the transfer stays float32, the loss is finite and drafts match inference."""
    model16 = load_model(str(tiny_folder), torch.bfloat16, "cpu")[0]
    train_ex, val_ex = examples
    cfg = config(tmp_path, steps=4, batch=2, positions_per_seq=4, dtype="bfloat16")
    ht, summary = train(model16, train_ex[:8], val_ex[:2], cfg, log=lambda *_: None)
    assert ht.transfer.dtype == torch.float32 and ht.transfer.grad is not None
    assert all(math.isfinite(x) for x in summary["loss_history"]) and math.isfinite(summary["val"]["kl"])
    e = train_ex[0]
    ids, t = e["prompt_ids"] + e["reply_ids"], len(e["prompt_ids"]) + 3
    with torch.no_grad():
        ours = draft_logits(model16, ht, encode_sequence(model16, ids, 2), torch.tensor([t]))[0]
        theirs = inference_drafts(model16, ht, model16.new_cache(64), ids[:t], ids[t])
    torch.testing.assert_close(ours, theirs.float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("command", ["train"])
def test_cli_train(tiny_folder, examples, tmp_path, command):
    """`leapfrog train` end to end, from an already distilled data cache."""
    from runtime.cli import main

    data = tmp_path / "data"
    settings = distill.DistillSettings(max_prompt_tokens=256, max_new_tokens=REPLY, dtype="float32")
    for split, rows in zip(("train", "val"), examples):
        path = distill.cache_file(data, tiny_folder, settings, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "w.safetensors"
    argv = [command, "--checkpoint", str(tiny_folder), "--device", "cpu", "--threads", "1", "--layer", "3",
            "--k", "2", "--no-pseudo-attention", "--examples", "8", "--val-examples", "2", "--max-new-tokens",
            str(REPLY), "--val-max-new-tokens", str(REPLY), "--steps", "3", "--batch", "2", "--positions-per-seq", "4", "--out", str(out),
            "--data-dir", str(data), "--no-progress"]
    data_only = tmp_path / "none.safetensors"
    assert main(argv + ["--data-only", "--out", str(data_only)]) == 0  # the cached data is there: nothing to make
    assert not data_only.exists() and not data_only.with_suffix(".ckpt.pt").exists()  # and nothing trained
    assert main(argv) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["steps"] == 3 and summary["examples"]["train"] == 8 and summary["examples"]["val"] == 2
    assert summary["config"] == {"layer": 3, "k": 2, "pseudo_attention": False, "kind": "ht", "refine_layers": []}
    assert summary["parameters"] == 2 * 64 * 64
    # leapfrog-style usage errors, not tracebacks
    assert main(argv + ["--layer", "4"]) == 2
    assert main(argv + ["--drafter", "medusa"]) == 2  # --layer is for ht only

    at = argv.index("--layer")
    layer_free = argv[:at] + argv[at + 2 :]
    for kind, layer, parameters in (("medusa", 4, 2 * (64 * 64 + 64)), ("pass", 0, 2 * 64)):
        assert main(layer_free + ["--drafter", kind]) == 0
        summary = json.loads(out.with_suffix(".json").read_text())
        assert summary["config"] == {"layer": layer, "k": 2, "pseudo_attention": False, "kind": kind, "refine_layers": []}
        assert summary["parameters"] == parameters
        assert load(out, load_model(str(tiny_folder), torch.float32, "cpu")[0].args).config.kind == kind


# ------------------------------------------------------------------ distillation data


def test_batched_generation_matches_greedy(tiny_folder, model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    prompts = [[5, 9, 14, 3], [7, 1, 2, 3, 4, 5, 6, 100, 101], [42]]
    stops = {int(hf.config.eos_token_id or 2)}
    replies = distill.generate_batch(hf, prompts, 12, pad_id=0, stops=stops)
    cache = model.new_cache(64)
    for p, r in zip(prompts, replies):
        assert r == [t for s in generate_ar(model, cache, p, 12, stops) for t in s.tokens]


@pytest.mark.real_model
def test_teacher_forced_data_is_sharegpts_reply(tmp_path):
    """--data sharegpt: each prompt's ShareGPT reply as tokens, cut at max_new_tokens, the
    end-of-turn token after a whole one; prompts without a reply are skipped; cached apart.
    No model runs: the real checkpoint is here for its tokenizer and chat template."""
    from workers.loading import load_tokenizer, resolve_checkpoint

    folder = resolve_checkpoint("default")
    tokenizer = load_tokenizer(folder)
    prompts = [("a_0", "Say hi."), ("b_0", "Tell a story."), ("c_0", "No reply here.")]
    replies = {"a_0": "Hi.", "b_0": "Once upon a time there was a long story that went on and on."}
    settings = distill.DistillSettings(max_prompt_tokens=256, max_new_tokens=6, source="sharegpt")
    got = distill.distill(folder, 5, "train", settings, data_dir=tmp_path, prompts=prompts, replies=replies, progress=False)
    assert [e["id"] for e in got] == ["a_0", "b_0"]
    assert got[0]["reply_ids"] == tokenizer.encode("Hi.", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert got[1]["reply_ids"] == tokenizer.encode(replies["b_0"], add_special_tokens=False)[:6]
    assert got[0]["prompt_ids"] == distill.encode_chat(tokenizer, "Say hi.")
    own = distill.DistillSettings(max_prompt_tokens=256, max_new_tokens=6)
    assert distill.cache_file(tmp_path, folder, settings, "train") != distill.cache_file(tmp_path, folder, own, "train")
    assert distill.distill(folder, 5, "train", settings, data_dir=tmp_path, prompts=[], replies={}) == got  # from the cache
    with pytest.raises(ValueError, match="data source"):
        distill.DistillSettings(source="web")
    assert sharegpt.first_reply({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "q"},
                                                    {"from": "gpt", "value": "a"}]}) == "a"


def test_cache_file_survives_interruption(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a", "prompt_ids": [1], "reply_ids": [2]}\n{"id": "b", "prompt_ids": [1')
    assert [r["id"] for r in distill.read_cache(path)] == ["a"]
    assert path.read_text().endswith("]}\n")  # the cut line is gone; appends start clean
    assert distill.cut_at_stop([4, 5, 2, 7, 2], {2}) == [4, 5, 2]
    prompts = [(str(i), str(i)) for i in range(100)]
    train_p, val_p = distill.split_prompts(prompts, "train"), distill.split_prompts(prompts, "val")
    assert train_p + val_p == prompts and len(val_p) == 5


# ------------------------------------------------------------------ ShareGPT


def test_sharegpt_split():
    convs = sharegpt.all_conversations()
    assert len(convs) == sharegpt.EXPECTED_CONVERSATIONS == 17_671
    train_c, held = sharegpt.train_conversations(), sharegpt.heldout_conversations()
    assert len(held) == 1000 and held[0]["id"] == "aLHtGu3_23"
    assert len(train_c) == 16_671 and list(convs) == train_c + held
    held_text = {t for _, t in sharegpt.heldout_prompts()}
    for split in ("train", "val"):
        prompts = distill.sharegpt_prompts(split)
        assert prompts and not held_text & {t for _, t in prompts}
    train_ids = {c["id"] for c in train_c}
    assert {cid for cid, _ in distill.sharegpt_prompts("val")} <= train_ids
    # aLHtGu3 is cut in two by the split: its training parts are not distilled either
    assert not any(cid.startswith("aLHtGu3_") for cid, _ in distill.sharegpt_prompts("train"))
    assert sharegpt.first_prompt({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": " "}]}) is None
    assert sharegpt.first_prompt({"conversations": [{"from": "human", "value": "hi"}]}) == "hi"


def test_truncated_array_parser():
    assert sharegpt.parse_truncated_array('[ {"a": 1},\n {"b": [2, 3]} , {"c": "cut') == [{"a": 1}, {"b": [2, 3]}]
    assert sharegpt.parse_truncated_array("[1, 2]") == [1, 2]


def test_refine_layers_train_from_init_and_decode_losslessly(tiny_folder, model, examples, tmp_path):
    """FIRP-style ht: a second transfer at a later layer, started from plain ht weights
    (refine maps at zero: the same drafts), trained, then lossless in decoding."""
    from configs.schema import PseudoStateModeConfig
    from runtime.decoding.speculative import SpeculativeDecoder
    from workers.drafters.pseudo_proposer import PseudoStateProposer
    from workers.sampling import Greedy

    train_ex, val_ex = examples
    base = tmp_path / "base.safetensors"
    cfg = TrainConfig(layer=1, k=2, steps=2, batch=2, positions_per_seq=4, out=str(base), eval_every=0, progress=False)
    train(model, train_ex, val_ex, cfg, log=lambda *_: None)
    firp = tmp_path / "firp.safetensors"
    cfg = TrainConfig(layer=1, k=2, refine_layers=(3,), init=str(base), steps=0, batch=2, positions_per_seq=4,
                      out=str(firp), eval_every=0, progress=False)
    _, summary = train(model, train_ex, val_ex, cfg, log=lambda *_: None)
    plain = evaluate(model, load(base, model.args), val_ex)
    assert summary["val"]["top1"] == plain["top1"]  # zero refine maps: the drafts of the base weights
    cfg.steps, cfg.init = 4, str(base)
    trained, _ = train(model, train_ex, val_ex, cfg, log=lambda *_: None)
    assert trained.refine_maps.abs().sum() > 0 and load(firp, model.args).config.refine_layers == (3,)
    cache = model.new_cache(256)
    prompt = train_ex[0]["prompt_ids"]
    ar = [t for s in generate_ar(model, cache, prompt, 16, set()) for t in s.tokens]
    proposer = PseudoStateProposer(trained, PseudoStateModeConfig(budget=6, top_k=3, pseudo_nodes=3), model.args)
    decoder = SpeculativeDecoder(model, cache, [proposer])
    assert [t for s in decoder.generate(prompt, 16, set(), Greedy()) for t in s.tokens] == ar
    with pytest.raises(TrainError, match="refine layers must increase"):
        train(model, train_ex, val_ex, TrainConfig(layer=2, refine_layers=(2,), out=str(firp)), log=lambda *_: None)
