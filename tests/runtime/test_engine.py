"""The engine (runtime.engine): built from a config, the prompt checks, modes built once
and rebuilt when their settings change."""

import pytest
import torch

from configs.files import load_config
from configs.schema import PseudoStateModeConfig
from runtime.engine import Engine, PromptTooLongError
from runtime.modes import UnknownModeError


@pytest.fixture(scope="module")
def engine():
    config = load_config()
    config.model.device, config.model.max_context, config.runtime.threads = "cpu", 256, 1
    return Engine.from_config(config)


def test_from_config_takes_every_section_it_reads(engine):
    assert torch.get_num_threads() == 1
    assert engine.config.max_context == 256 and engine.drafters.ht.budget == load_config().drafters.ht.budget
    assert engine.cache.max_len > 256  # room for a tree step's pending rows beyond the context
    assert engine.stop_ids and len(engine.encode_chat("Hi")) > 5  # the chat template is around the message


def test_prompts_that_do_not_fit_are_refused(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.check_fits([], 8)
    with pytest.raises(PromptTooLongError, match="exceeds the context of 256"):
        engine.steps([1] * 250, "ar", 7)
    engine.check_fits([1] * 250, 6)


def test_modes_are_built_once_and_rebuilt_after_new_settings(engine):
    ar, ht = engine.mode("ar"), engine.mode("ht")
    assert engine.mode("ar") is ar and engine.mode("ht") is ht
    engine.set_drafter_config("ht", PseudoStateModeConfig(budget=4))
    assert engine.mode("ar") is ar and engine.mode("ht") is not ht  # drafting modes rebuilt, ar kept
    assert engine.mode("ht").decoder.pseudo.settings.budget == 4
    with pytest.raises(UnknownModeError, match="unknown mode 'warp'"):
        engine.mode("warp")


def test_siblings_share_the_weights_not_the_cache(engine):
    sibling = engine.sibling()
    params = dict(engine.model.named_parameters())
    assert sibling.model is engine.model and all(
        p.data_ptr() == params[name].data_ptr() for name, p in sibling.model.named_parameters()
    )
    assert sibling.cache.k.data_ptr() != engine.cache.k.data_ptr() and sibling.tokenizer is not engine.tokenizer
    assert sibling.mode("ht") is not engine.mode("ht")  # drafter state is per engine
    assert sibling.batcher is engine.batcher  # their ar steps can share a pass (workers.batched_step)


def decode_at_once(engines: list[Engine], jobs: list[tuple]) -> list[list[int]]:
    """Each engine decodes its job (prompt, mode, sampling; 40 tokens) in a thread of its
    own, all started together; the replies' tokens in job order."""
    import threading

    together: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def decode(i: int) -> None:
        (prompt, mode, sampling), e = jobs[i], engines[i]
        ids = e.encode_chat(prompt)
        start.wait()  # the decodes overlap
        together[i] = [t for s in e.steps(ids, mode, 40, sampling) for t in s.tokens]

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return together


@pytest.mark.parametrize("prompt_chunk", [None, 8])
def test_siblings_decoding_at_once_give_each_request_its_own_reply(prompt_chunk, monkeypatch):
    """Float32: five siblings decode different prompts in five threads, in different modes
    (tree steps, ar steps and prefills share passes, workers.batched_step, with trees sized
    for the pass), greedy and sampled; each reply is that prompt's ar reply decoded alone.
    With a prompt chunk of 8 rows, every prompt shares several passes (Lane.lead_in)."""
    from configs.schema import SamplingConfig
    from runtime.batching import step_batcher

    config = load_config()
    config.model.device, config.model.dtype, config.model.max_context, config.runtime.threads = "cpu", "float32", 256, 1
    config.drafters.tree_sizing.shared = "sized"  # trees in shared passes (a CPU's "auto" steps plain there)
    first = Engine.from_config(config)
    engines = [first] + [first.sibling() for _ in range(4)]
    jobs = [("Name three colors.", "ht", None), ("Count from one to ten.", "pld", None),
            ("Write a haiku about rain.", "eagle-pld", SamplingConfig(0.8, 0, 0.95, seed=3)),
            ("Name a fruit.", "ar", None), ("Say hi twice.", "ar", SamplingConfig(0.7, 0, 0.9, seed=4))]
    alone = [[t for s in first.steps(first.encode_chat(p), "ar", 40, sampling) for t in s.tokens] for p, _, sampling in jobs]
    if prompt_chunk:
        monkeypatch.setattr(step_batcher, "PROMPT_CHUNK", prompt_chunk)
    first.batcher.stats = step_batcher.BatchStats()
    assert decode_at_once(engines, jobs) == alone
    stats = first.batcher.stats
    assert stats.trees_shared > 0 and stats.prefills_shared > 0  # they ran in passes with other replies' steps
    # steps with prompt rows: each prompt's chunks of 8 rows (ht's prompt rows end before its last token)
    rows = [len(first.encode_chat(p)) - (mode == "ht") for p, mode, _ in jobs]
    assert stats.prompt_steps == (sum(-(-n // 8) for n in rows) if prompt_chunk else len(jobs))


def test_shared_passes_step_plain_on_a_cpu_unless_told_to_size_trees(engine):
    """[tree_sizing] shared: "auto" steps plain on a CPU while other replies decode, "sized"
    keeps trees, "plain" steps plain anywhere; a reply alone keeps its trees."""
    import dataclasses

    sizing = engine.drafters.tree_sizing
    try:
        assert engine.plain_when_shared() and engine.lane.plain_when_shared  # the default, "auto", on a CPU
        other = engine.sibling().lane
        assert not engine.lane.plain_now()  # alone
        held = other.decoding(iter([None]))
        next(held)  # another reply decodes
        assert engine.lane.plain_now()
        engine.set_drafter_config("tree_sizing", dataclasses.replace(sizing, shared="sized"))
        assert not engine.lane.plain_now()
        engine.set_drafter_config("tree_sizing", dataclasses.replace(sizing, shared="plain"))
        assert engine.lane.plain_now()
        held.close()
        assert not engine.lane.plain_now()
    finally:
        engine.set_drafter_config("tree_sizing", sizing)


def test_replies_stay_lossless_stepping_plain_or_not():
    """Float32: sibling engines decode at once in the tree modes while each step is plain or
    not at random (Lane.plain_now); each reply is that prompt's ar reply decoded alone, and
    a drafter that skipped proposals (EAGLE catches up on them) drafts on."""
    import random

    from configs.schema import SamplingConfig

    config = load_config()
    config.model.device, config.model.dtype, config.model.max_context, config.runtime.threads = "cpu", "float32", 256, 1
    first = Engine.from_config(config)
    jobs = [("Name three colors.", "ht", None), ("Count from one to ten.", "pld", None),
            ("Write a haiku about rain.", "eagle-pld", SamplingConfig(0.8, 0, 0.95, seed=3)),
            ("List two animals.", "eagle", None), ("Say hi twice.", "ht-pld", SamplingConfig(0.7, 0, 0.9, seed=4)),
            ("Name a fruit.", "token-recycling", None)]
    engines = [first] + [first.sibling() for _ in jobs[1:]]
    alone = [[t for s in first.steps(first.encode_chat(p), "ar", 40, sampling) for t in s.tokens] for p, _, sampling in jobs]
    plain = []
    for i, e in enumerate(engines):
        rng = random.Random(i)
        e.lane.plain_now = lambda rng=rng: plain.append(rng.random() < 0.5) or plain[-1]
    assert decode_at_once(engines, jobs) == alone
    assert True in plain and False in plain
