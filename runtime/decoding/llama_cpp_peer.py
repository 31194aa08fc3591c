"""llama.cpp as a peer mode: the tool a CPU user would pick instead of us, in the same run.

    llama.cpp        the model's own GGUF file as it is (Q4_1 for the default model)
    llama.cpp-bf16   the same weights requantized to BF16: the precision of our bfloat16
    llama.cpp-f32    ... and to F32: the precision of our float32

It decodes the same prompt ids (the GGUF's vocabulary is the tokenizer's) through
llama-cpp-python with the engine's thread count, greedily unless a sampling config says
otherwise, and yields one Step per token. Its arithmetic is llama.cpp's, not ours
(4-bit weights, 8-bit activations in the Q4_1 products, its own summation order), so its
tokens are never compared with `ar`'s (`exact = False`): it is here for its speed.

The BF16 and F32 files are made once with llama.cpp's own quantizer and cached under
$LEAPFROG_CACHE/llama.cpp/. The package is optional: `make llama-cpp` installs it
(it compiles llama.cpp, a few minutes); without it these modes say so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from configs.schema import SamplingConfig
from runtime.decoding.hf_peers import peer_samples
from runtime.decoding.steps import Step
from workers.cache_dir import cache_dir
from workers import loading
from workers.loading import ModelLoadError

INSTALL_HINT = "mode {mode} needs llama-cpp-python: run `make llama-cpp` (it compiles llama.cpp, a few minutes)"
# llama.cpp's file types (llama.h: llama_ftype) of the requantized peers.
FILE_TYPES = {"bf16": 32, "f32": 0}


class LlamaCppUnavailable(ModelLoadError):
    """llama-cpp-python is not installed, or the checkpoint has no GGUF file."""


def gguf_file(checkpoint: str) -> Path:
    """The GGUF file of a checkpoint: the default model's, a named one's (joined from its
    parts: `make models`), or a .gguf checkpoint itself."""
    path = loading.gguf_file(checkpoint)
    if path is None:
        raise LlamaCppUnavailable(f"llama.cpp peers need a GGUF checkpoint; {checkpoint!r} is not one")
    return path


def requantized(source: Path, file_type: str, threads: int) -> Path:
    """`source` converted to BF16 or F32 by llama.cpp's quantizer (cached; made once)."""
    import llama_cpp

    out = cache_dir() / "llama.cpp" / f"{source.stem}-{source.stat().st_size}-{file_type.upper()}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # one per process: concurrent makers do not collide
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = FILE_TYPES[file_type], True, threads
    print(f"[leapfrog] requantizing {source.name} to {file_type.upper()} with llama.cpp (first use only)", flush=True)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
        tmp.unlink(missing_ok=True)
        raise LlamaCppUnavailable(f"llama.cpp could not requantize {source} to {file_type.upper()}")
    tmp.replace(out)
    return out


class LlamaCppMode:
    exact = False  # llama.cpp's arithmetic: its tokens are not expected to equal ar's
    same_draws_as_ar = False

    def __init__(self, engine, name: str, file_type: str | None):
        try:
            import llama_cpp
        except ImportError:
            raise LlamaCppUnavailable(INSTALL_HINT.format(mode=name)) from None
        import torch

        self.engine, self.threads = engine, torch.get_num_threads()
        path = gguf_file(engine.config.checkpoint)
        if file_type is not None:
            path = requantized(path, file_type, self.threads)
        self.path = path
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=engine.config.max_context, n_threads=self.threads,
            n_threads_batch=self.threads, verbose=False,
        )

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None) -> Iterator[Step]:
        greedy = not peer_samples(sampling)
        options = dict(temp=0.0) if greedy else dict(temp=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        if not greedy:
            self.llm.set_seed(sampling.seed)
        self.llm.reset()  # no prefix reuse across requests: every reply pays its prefill, as ours do
        produced = 0
        for token in self.llm.generate(prompt_ids, min_p=0.0, repeat_penalty=1.0, **options):
            produced += 1
            yield Step([token], None)
            if token in self.engine.stop_ids or produced == max_new_tokens:
                return
