"""llama.cpp as a peer mode (runtime.decoding.llama_cpp_peer): a clear error without the
optional package; with it (`make llama-cpp`), a reply of the right length that the
benchmark does not compare token by token, and an F32 requantization of the same weights
that decodes what `ar` decodes in float32."""

import importlib.util
import sys
from types import SimpleNamespace

import pytest

from configs.schema import ModelConfig, SamplingConfig
from runtime.bench.harness import compared_with_ar
from runtime.cli import EXIT_USAGE, main
from runtime.decoding.llama_cpp_peer import LlamaCppMode, LlamaCppUnavailable, gguf_file

INSTALLED = importlib.util.find_spec("llama_cpp") is not None


def test_without_the_package_the_mode_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now fails
    engine = SimpleNamespace(config=ModelConfig(), stop_ids={0})
    with pytest.raises(LlamaCppUnavailable, match="make llama-cpp"):
        LlamaCppMode(engine, "llama.cpp", None)


def test_without_the_package_the_bench_ends_with_the_hint(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    code = main(["bench", "--modes", "ar,llama.cpp-bf16", "--limit", "1", "--max-new-tokens", "4", "--threads", "1",
                 "--no-progress"])
    assert code == EXIT_USAGE
    assert "mode llama.cpp-bf16 needs llama-cpp-python: run `make llama-cpp`" in capsys.readouterr().err


def test_only_gguf_checkpoints_have_a_peer(tmp_path):
    assert gguf_file("default").suffix == ".gguf"
    with pytest.raises(LlamaCppUnavailable, match="need a GGUF checkpoint"):
        gguf_file(str(tmp_path))


@pytest.fixture(scope="module")
def engine():
    from runtime.engine import Engine

    return Engine(ModelConfig(dtype="float32", device="cpu", max_context=512))


@pytest.mark.skipif(not INSTALLED, reason="llama-cpp-python is optional: `make llama-cpp`")
def test_the_peer_decodes_and_is_not_compared_with_ar(engine):
    ids = engine.encode_chat("Name three colours.")
    mode = engine.mode("llama.cpp")
    steps = list(engine.steps(ids, "llama.cpp", 12))
    assert len(steps) <= 12 and all(len(s.tokens) == 1 for s in steps)
    assert engine.tokenizer.decode([t for s in steps for t in s.tokens]).strip()
    assert not compared_with_ar(mode, SamplingConfig()) and compared_with_ar(engine.mode("ar"), SamplingConfig())
    again = [t for s in engine.steps(ids, "llama.cpp", 12) for t in s.tokens]
    assert again == [t for s in steps for t in s.tokens]  # greedy, and no state left from the last reply


@pytest.mark.skipif(not INSTALLED, reason="llama-cpp-python is optional: `make llama-cpp`")
def test_f32_requantization_decodes_the_same_weights(engine):
    """Our float weights are the GGUF's de-quantized ones: llama.cpp in F32 computes the same
    function in another summation order, so its greedy reply starts as ar's."""
    ids = engine.encode_chat("What is the capital of France?")
    ar = [t for s in engine.steps(ids, "ar", 16) for t in s.tokens]
    peer = [t for s in engine.steps(ids, "llama.cpp-f32", 16) for t in s.tokens]
    assert peer[:8] == ar[:8]
    assert engine.mode("llama.cpp-f32").path.name.endswith("-F32.gguf")
