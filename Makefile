# The two commands of the README. Both create .venv and install moc-jax into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/tiny

.PHONY: install train test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# Train the tiny MoC model on the embedded corpus (this Python's standard library) and
# print its validation perplexity. Re-running resumes; `make train WORKDIR=runs/other`.
train: install
	$(BIN)/python train.py --config=configs/default.py --workdir=$(WORKDIR)

# CI (CI=true) also installs TensorFlow (CPU, ~40 s) so the tf.data tests of the TFDS source
# run there once, and Triton for the ptxas in its wheel: the CPU tests of the inline-PTX
# kernels (tests/_ptxas.py) assemble their PTX for sm_90a with it. Without them they skip. They run in their own process, so that the rest of
# the suite never shares one with TensorFlow (TensorFlow and jaxlib in one process are a known
# source of crashes, jax-ml/jax#120).
TF_TESTS := tests/test_data_tfdata.py

# The suite runs on TEST_WORKERS processes (pytest-xdist), each test module on one of them so
# that its module fixtures are built once: ~7 min on 2 cores (14 on one process, before the
# cheap-compile flags of tests/_fast_compile.py).
TEST_WORKERS ?= 2

test: install
	@if [ -n "$$CI" ]; then $(BIN)/pip install -q "tensorflow-cpu>=2.18" "triton==3.6.0"; fi
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=15 --ignore=$(TF_TESTS)
	$(BIN)/python -m pytest -q $(TF_TESTS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
