"""Training the EAGLE peer (runtime.training.eagle_trainer) on the tiny model (conftest.py):
training rows are decoding's rows, the loss reads the right targets, it learns, it resumes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from configs.training import TrainConfig, TrainError
from runtime.training.eagle_trainer import Objective, draft_vocabulary, start_model, train_eagle
from runtime.training.feature_cache import features
from runtime.training.loop import weights_paths
from workers.drafters.eagle import EagleDrafter, EagleModel

from tiny_training import examples, model, tiny_folder  # noqa: F401 - fixtures


def config(tmp_path, **kw):
    base = dict(drafter="eagle", out=str(tmp_path / "eagle.safetensors"), steps=30, lr=1e-2, batch=4, vocab=100,
                log_every=10, eval_every=0, checkpoint_every=10, progress=False, threads=1, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_draft_vocabulary_is_the_most_frequent_reply_tokens():
    examples = [{"prompt_ids": [9, 9, 9], "reply_ids": [1, 2, 2, 3, 3, 3]}, {"prompt_ids": [], "reply_ids": [3, 4]}]
    ids, covered = draft_vocabulary(examples, 2, 10)
    assert ids.tolist() == [2, 3] and covered == pytest.approx(6 / 8)  # prompt tokens do not count
    ids, covered = draft_vocabulary(examples, 6, 10)
    assert ids.tolist() == [0, 1, 2, 3, 4, 5] and covered == 1.0  # padded with unseen tokens


def test_training_rows_are_decoding_rows(model, examples):
    """The training outputs and their draft log-probabilities equal what the drafter computes
    after catching up on the same features and tokens: o_q drafts a root's children, o2_q
    (row q fed the drafter's own o_{q-1}) the children of a depth-1 node; the targets are x_{q+2}."""
    train_ex, _ = examples
    e = train_ex[0]
    vocab_ids, _ = draft_vocabulary(train_ex, 100, model.args.vocab_size)
    eagle = start_model(model, vocab_ids)
    for p in eagle.parameters():
        p.data += 0.05 * torch.randn_like(p)
    objective = Objective(model, eagle)
    feats = features(model, [e])[0]
    ids = e["prompt_ids"] + e["reply_ids"]
    with torch.no_grad():
        r = objective.rows([e], [feats])
    first = r.first[0]
    assert first == len(e["prompt_ids"]) - 2 and r.rows == [len(ids) - 1]  # the prompt fits in the context: rows from 0
    torch.testing.assert_close(r.f_next[0], feats[1:].float())
    expected = [objective.draft_index[t].item() for t in ids[2:]] + [-100]
    assert r.targets[0, first:].tolist() == expected[first:] and (r.targets[0, :first] == -100).all()
    feats = feats.float()

    everything = len(vocab_ids)  # every draft token a child, every depth-1 node expanded
    drafter = EagleDrafter(copy.deepcopy(eagle), model, 128, depth=2, top_k=everything, budget=1 + everything * (1 + everything))
    checked = 0
    for q in (first, first + 5, len(ids) - 3):
        drafter.start(ids[: q + 1])
        drafter.feed(feats[: q + 1].to(model.dtype))
        tree = drafter.propose(ids[q + 1])  # rows 0..q; the last drafts the token after ids[q + 1]
        children = tree.children()
        lp = torch.log_softmax(objective.logits(r.o[0, q]), -1)
        for child in children[0]:
            assert tree.scores[child] == pytest.approx(lp[objective.draft_index[tree.tokens[child]]].item(), abs=1e-4)
        node = tree.child(0, ids[q + 2])  # the true next token, a depth-1 node: row q + 1 fed o_q
        if node is None:
            continue
        lp2 = torch.log_softmax(objective.logits(r.o2[0, q]), -1)
        for child in children[node]:
            got = tree.scores[child] - tree.scores[node]
            assert got == pytest.approx(lp2[objective.draft_index[tree.tokens[child]]].item(), abs=1e-4)
        checked += 1
    assert checked >= 2


def test_a_batch_is_its_sequences_alone(model, examples):
    """Sequences of different lengths in one right-padded forward: the same features, rows,
    losses and accuracy as each sequence alone (padding and other sequences change nothing)."""
    train_ex, _ = examples
    group = sorted(train_ex[:4], key=lambda e: len(e["reply_ids"]))
    group[0] = {**group[0], "prompt_ids": list(range(3, 3 + 70)) + group[0]["prompt_ids"]}  # past the context: rows start later
    assert len({len(e["prompt_ids"]) + len(e["reply_ids"]) for e in group}) > 1
    eagle = start_model(model, draft_vocabulary(train_ex, 100, model.args.vocab_size)[0])
    for p in eagle.parameters():
        p.data += 0.05 * torch.randn_like(p)
    objective = Objective(model, eagle)
    together = features(model, group)
    alone = [features(model, [e])[0] for e in group]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)  # bfloat16 features, batched matmuls
    with torch.no_grad():
        r = objective.rows(group, alone)
        total, count = objective.loss(group, alone, unroll=2)
        singles = [objective.loss([e], [f], unroll=2) for e, f in zip(group, alone)]
        for b, (e, f) in enumerate(zip(group, alone)):
            one = objective.rows([e], [f])
            k = one.rows[0]
            assert r.rows[b] == k and r.first[b] == one.first[0]
            torch.testing.assert_close(r.o[b, :k], one.o[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(r.o2[b, : k - 1], one.o2[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(r.targets[b, :k], one.targets[0]) and (r.targets[b, k:] == -100).all()
    assert count == sum(c for _, c in singles)
    assert total.item() == pytest.approx(sum(t.item() for t, _ in singles), rel=1e-5)
    assert objective.accuracy(group, alone, batch=4) == pytest.approx(objective.accuracy(group, alone, batch=1))


def test_training_learns_and_resumes(model, examples, tmp_path):
    train_ex, _ = examples
    val_ex = train_ex[:10]  # a random tiny model's replies are too few to generalise from: check the fit
    quiet = lambda *_: None  # noqa: E731
    straight = train_eagle(model, train_ex, val_ex, config(tmp_path / "a", schedule="constant"), log=quiet)
    first, last = straight["validation"][0]["top1"], straight["validation"][-1]["top1"]
    assert last > first + 0.05, straight["validation"]  # it learnt to draft the tiny model's replies
    assert straight["history"][-1]["loss"] < straight["history"][0]["loss"]

    cfg = config(tmp_path / "b", steps=10, schedule="constant")
    train_eagle(model, train_ex, val_ex, cfg, log=quiet)
    out, summary_path, ckpt = weights_paths(cfg.out)
    assert out.is_file() and ckpt.is_file() and json.loads(summary_path.read_text())["steps"] == 10
    messages = []
    resumed = train_eagle(model, train_ex, val_ex, config(tmp_path / "b", schedule="constant", resume=True),
                          log=messages.append)
    assert any("resumed" in m and "step 10" in m for m in messages)
    assert any("0 computed" in m for m in messages)  # the features were read back, not computed again
    assert resumed["validation"][-1] == pytest.approx(straight["validation"][-1])  # ten, a checkpoint, twenty more
    loaded = EagleModel.load(out, model.args)
    assert loaded.training_summary["steps"] == 30 and loaded.config.vocab == 100

    # From those weights, training depth 2 on the draft model's own features (--unroll 2) lifts depth 2.
    messages = []
    unrolled = train_eagle(model, train_ex, val_ex, config(tmp_path / "c", init=str(out), unroll=2), log=messages.append)
    assert any("started from" in m for m in messages)
    before, after = unrolled["validation"][0], unrolled["validation"][-1]
    assert before["top1"] == pytest.approx(resumed["validation"][-1]["top1"])  # it started where the weights were
    assert after["top1_depth2"] > before["top1_depth2"] + 0.03, unrolled["validation"]


def test_eagle_settings_are_checked():
    with pytest.raises(TrainError, match="not eagle"):
        TrainConfig(drafter="eagle", k=4).validate()
    with pytest.raises(TrainError, match="unroll"):
        TrainConfig(drafter="ht", unroll=2).validate()
    with pytest.raises(TrainError, match="unroll"):
        TrainConfig(drafter="eagle", unroll=3).validate()
    with pytest.raises(TrainError, match="vocab"):
        TrainConfig(drafter="eagle", vocab=0).validate()
