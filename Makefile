# Two commands on a fresh machine: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: a bare `torch` requirement would pull the newest release with gigabytes of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
DATA_DIR ?= data
STAMP := $(VENV)/.robustune-installed

.PHONY: setup data demo test test-slow test-faults test-ui benchmark benchmark-gpu clean help

help:
	@echo "make demo       set up, get Fashion-MNIST, run the default study (LAS-AT vs tuned baselines) -> leaderboard"
	@echo "make test       set up, get Fashion-MNIST, run the tests"
	@echo "make test-slow  the longer accuracy checks (real training on Fashion-MNIST)"
	@echo "make test-faults  only the fault-injection tests: killed Ray worker, dead MLflow server, bad checkpoints, full disk"
	@echo "make test-ui    the browser tests: the HTML report and the MLflow UI on a tiny study (installs Chromium if missing)"
	@echo "make benchmark  every benchmark (defense cost, overhead, scaling, search efficiency) -> benchmarks/RESULTS.md"
	@echo "make benchmark-gpu  the GPU variant (PreActResNet-18, CIFAR-shaped data) -> benchmarks/RESULTS-gpu.md"
	@echo "make setup      only create $(VENV) and install the project"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

data:
	bash scripts/get_fashion_mnist.sh $(DATA_DIR)

demo: setup data
	$(VENV)/bin/robustune study

# Includes the `faults` tests (about 4 min of the total on 2 cores); `make test-faults` runs only those.
test: setup data
	$(PY) -m pytest -q -m "not slow and not ui"

test-slow: setup data
	$(PY) -m pytest -q -m slow

test-faults: setup data
	$(PY) -m pytest -q -m faults

# Headless Chromium opens the HTML report; Debian's package (apt-get, as root) when it is not installed yet.
test-ui: setup
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(PY) -m pytest -q -m ui

benchmark: setup data
	$(PY) benchmarks/run_all.py

benchmark-gpu: setup data
	$(PY) benchmarks/run_all.py --gpu

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts .pytest_cache
