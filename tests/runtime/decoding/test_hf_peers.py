"""The transformers peers (runtime.decoding.hf_peers: hf, hf-pld): a tiny temperature decodes
greedily instead of drawing from logits divided into infinities."""

import pytest

from configs.schema import ModelConfig, SamplingConfig
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
