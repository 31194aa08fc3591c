"""The transformers peers (runtime.decoding.hf_peers: hf, hf-pld, hf-draft): a tiny temperature decodes
greedily instead of drawing from logits divided into infinities."""

import pytest

from configs.schema import ConfigError, DrafterConfigs, DraftModelConfig, ModelConfig, SamplingConfig
from runtime.decoding.hf_peers import PEER_MIN_TEMPERATURE, peer_samples
from runtime.engine import Engine


def test_which_temperatures_the_peers_sample_at():
    assert not peer_samples(None) and not peer_samples(SamplingConfig())
    assert not peer_samples(SamplingConfig(temperature=1e-40))
    assert peer_samples(SamplingConfig(temperature=PEER_MIN_TEMPERATURE)) and peer_samples(SamplingConfig(temperature=0.7))


@pytest.mark.parametrize("mode", ["hf", "hf-pld"])
def test_a_tiny_temperature_gives_the_greedy_reply(mode):
    engine = Engine(ModelConfig(dtype="float32", device="cpu", max_context=512))
    ids = engine.encode_chat("Name two rivers.")
    greedy = [t for s in engine.steps(ids, mode, 24) for t in s.tokens]
    tiny = [t for s in engine.steps(ids, mode, 24, SamplingConfig(temperature=1e-40, seed=5)) for t in s.tokens]
    assert tiny == greedy


def test_assisted_generation_runs_the_draft_checkpoint():
    """hf-draft: transformers' assisted generation with the [draft] checkpoint (here the
    model itself, so every draft is accepted): greedy, it gives plain generate's reply."""
    engine = Engine(ModelConfig(dtype="float32", device="cpu", max_context=512), DrafterConfigs(draft=DraftModelConfig(checkpoint="default")))
    ids = engine.encode_chat("Name two rivers.")
    plain = [t for s in engine.steps(ids, "hf", 24) for t in s.tokens]
    steps = list(engine.steps(ids, "hf-draft", 24))
    assert [t for s in steps for t in s.tokens] == plain
    assert engine.mode("hf-draft").assistant is not None
    assert steps[-1].forward_passes < len(plain)  # the target verified several drafts a pass


def test_assisted_generation_needs_a_draft_checkpoint():
    engine = Engine(ModelConfig(dtype="float32", device="cpu", max_context=512))
    with pytest.raises(ConfigError, match="no draft model is paired"):
        engine.mode("hf-draft")
