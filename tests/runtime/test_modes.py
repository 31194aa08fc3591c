"""Decoding modes by name (runtime.modes): the one mode check, and every single-engine
mode building from the engine's config and decoding `ar`'s tokens."""

import pytest

from configs.schema import (
    ConfigError,
    DraftModelConfig,
    DrafterConfigs,
    EagleModeConfig,
    EarlyExitConfig,
    ModelConfig,
    PipelineConfig,
    TreeSizingConfig,
)
from runtime.engine import Engine
from runtime.modes import MODES, PIPELINED_MODES, UnknownModeError, check_mode
from workers.drafters.loading import DrafterWeightsError, weights_file


# Modes `draft` and `draft-pld` with the model drafting for itself (no second model in memory;
# tests/workers/drafters/test_draft_model.py has a real pair, tiny).
SELF_DRAFT = DraftModelConfig(checkpoint="default", vocab=0)  # vocab: test_engine.py cuts it


@pytest.fixture(scope="module")
def engine():
    e = Engine(ModelConfig(dtype="float32", device="cpu", max_context=512), DrafterConfigs(draft=SELF_DRAFT),
               PipelineConfig(transport="local", workers=2))
    yield e
    e.close()


def test_check_mode_names_the_modes_there_are():
    for name in MODES:
        check_mode(name)
    with pytest.raises(UnknownModeError, match="unknown mode 'HT'; available: ar, ht, "):
        check_mode("HT")
    assert set(PIPELINED_MODES) <= set(MODES)


@pytest.mark.parametrize("mode", [m for m in MODES if not m.startswith(("hf", "llama.cpp"))])  # the peers: their own tests
def test_every_mode_builds_and_decodes_ar_tokens(engine, mode):
    ids = engine.encode_chat("Name two rivers.")
    ar = [t for s in engine.steps(ids, "ar", 12) for t in s.tokens]
    steps = list(engine.steps(ids, mode, 12))
    assert [t for s in steps for t in s.tokens] == ar
    assert all(len(s.margins) == len(s.tokens) for s in steps)
    info = getattr(engine.mode(mode), "drafter_info", None)
    assert info is None or info["parameters"] > 0


def test_early_exit_layer_beyond_the_model_is_refused(engine):
    from configs.schema import ConfigError

    engine.set_drafter_config("early_exit", EarlyExitConfig(layer=31))
    with pytest.raises(ConfigError, match="beyond this model's 30 layers"):
        engine.mode("early-exit")
    engine.set_drafter_config("early_exit", EarlyExitConfig())


def test_draft_mode_without_a_paired_draft_model_is_refused(engine):
    engine.set_drafter_config("draft", DraftModelConfig())  # checkpoint "auto": none is paired with the default model
    with pytest.raises(ConfigError, match="no draft model is paired with the checkpoint 'default'"):
        engine.mode("draft")
    engine.set_drafter_config("draft", SELF_DRAFT)
    assert list(engine.steps(engine.encode_chat("Hi."), "draft", 3))


def test_eagle_weights_that_are_missing_or_for_another_checkpoint_are_refused(engine, tmp_path):
    engine.set_drafter_config("eagle", EagleModeConfig(weights=str(tmp_path / "none.safetensors")))
    with pytest.raises(DrafterWeightsError, match="do not exist.*train --drafter eagle"):
        engine.mode("eagle")
    engine.set_drafter_config("eagle", EagleModeConfig())
    with pytest.raises(DrafterWeightsError, match="no eagle weights ship for this checkpoint"):
        weights_file("some/folder", "eagle", "default")


@pytest.fixture(scope="module")
def bfloat16_engine():
    # The configured trees, unsized: which drafts a sized tree keeps depends on this machine's
    # measured step cost, and these tests need drafts accepted to check the rows verified together.
    e = Engine(ModelConfig(dtype="bfloat16", device="cpu", max_context=512, kernels="native"),
               DrafterConfigs(tree_sizing=TreeSizingConfig(cost="off"), draft=SELF_DRAFT), PipelineConfig(transport="local", workers=2))
    yield e
    e.close()


@pytest.mark.parametrize("mode", ["ht", "ht-pld", "pld", "medusa", "early-exit", "token-recycling", "eagle", "eagle-pld", "draft", "pipeline"])
def test_bfloat16_tree_modes_are_token_identical_with_native_kernels(bfloat16_engine, mode):
    """The native kernels compute every row of a step as a one-row step would, and every
    mode computes the prompt positions alike (prompt rows: PyTorch's GEMM), so in bfloat16
    too a tree mode's tokens are `ar`'s, not merely close (with PyTorch's kernels, rows
    verified together round differently and near ties flip). The pipeline's workers catch
    up prompt and reply tokens in their steps."""
    e = bfloat16_engine
    prompts = ["Name two rivers.", "Write a haiku about the sea, then explain it.", "List three prime numbers and add them."]
    for prompt in prompts:
        ids = e.encode_chat(prompt)
        ar = [t for s in e.steps(ids, "ar", 48) for t in s.tokens]
        steps = list(e.steps(ids, mode, 48))
        assert [t for s in steps for t in s.tokens] == ar, prompt
    assert any(len(s.tokens) > 1 for s in steps)  # drafts were accepted: the tree rows were used
