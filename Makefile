# Two commands on a fresh machine: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch pinned (pip takes it first): a bare `torch` requirement would pull the newest release with gigabytes of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
# Every other package's exact version, for both installers (a constraints file); `make lock` rewrites it.
LOCK ?= requirements.lock
# uv installs the same versions as pip, faster (README); `make setup INSTALLER=pip` uses pip alone.
# uv itself comes from PyPI through pip, into $(VENV)/.uv, outside the project's packages.
INSTALLER ?= uv
UV_SPEC ?= uv==0.13.9
UV := $(VENV)/.uv/bin/uv
CONSTRAINTS := $(if $(LOCK),-c $(LOCK))
DATA_DIR ?= data
STAMP := $(VENV)/.robustune-installed

.PHONY: setup lock data demo test test-slow test-faults test-ui benchmark benchmark-gpu clean help

help:
	@echo "make demo       set up, get Fashion-MNIST, run the default study (LAS-AT vs tuned baselines) -> leaderboard"
	@echo "make test       set up, get Fashion-MNIST, run the tests"
	@echo "make test-slow  the longer accuracy checks (real training on Fashion-MNIST)"
	@echo "make test-faults  only the fault-injection tests: killed Ray worker, dead MLflow server, bad checkpoints, full disk"
	@echo "make test-ui    the browser and terminal tests: the HTML report, the MLflow UI and the live display of a tiny study (installs Chromium and tmux if missing)"
	@echo "make benchmark  every benchmark (defense cost, overhead, scaling, search efficiency) -> benchmarks/RESULTS.md"
	@echo "make benchmark-gpu  the GPU variant (PreActResNet-18, CIFAR-shaped data) -> benchmarks/RESULTS-gpu.md"
	@echo "make setup      only create $(VENV) and install the project (uv; INSTALLER=pip for pip), versions from $(LOCK)"
	@echo "make lock       rewrite $(LOCK) from the versions in $(VENV)"

$(STAMP): pyproject.toml $(LOCK)
ifeq ($(INSTALLER),pip)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip --quiet
	$(PY) -m pip install --quiet $(CONSTRAINTS) $(TORCH_SPEC)
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e ".[test]"
else ifeq ($(INSTALLER),uv)
# The venv gets no pip of its own (installing it takes seconds): uv installs into it, and the system's pip
# installs uv and tells uv where packages come from.
	test -x $(PY) || $(PYTHON) -m venv --without-pip $(VENV)
	test -x $(UV) || $(PYTHON) -m pip install --quiet --root-user-action=ignore --target $(VENV)/.uv $(UV_SPEC)
# uv does not read pip's configuration: it is given the package sources pip has here, from `pip config list`
# (a PIP_* variable, else [install], else [global]), and like pip takes the best version among all of them
# (unsafe-best-match: torch 2.13.0+cpu from a find-links folder beats PyPI's CUDA build of 2.13.0). Like pip it
# writes the .pyc files at install (--compile-bytecode): else every process, each Ray worker included, compiles
# what it imports, every time where PYTHONDONTWRITEBYTECODE is set (about 6 s of CPU for torch, Ray and MLflow).
	@conf=$$($(PYTHON) -m pip config list 2>/dev/null); \
	opt() { for s in :env: install global; do \
	  v=$$(printf '%s\n' "$$conf" | sed -n "s/^$$s\.$$1='\(.*\)'$$/\1/p" | tail -n 1); \
	  if [ -n "$$v" ]; then printf '%s\n' "$$v" | sed 's/\\n/ /g'; return 0; fi; \
	done; }; \
	args=""; \
	for v in $$(opt 'index[-_]url'); do args="$$args --index-url $$v"; done; \
	for v in $$(opt 'extra[-_]index[-_]url'); do args="$$args --extra-index-url $$v"; done; \
	for v in $$(opt 'find[-_]links'); do args="$$args --find-links $$v"; done; \
	for v in $$(opt 'constraints*'); do args="$$args --constraints $$v"; done; \
	for v in $$(opt 'trusted[-_]host'); do args="$$args --allow-insecure-host $$v"; done; \
	case "$$(opt 'no[-_]index')" in 1|[Tt]rue|yes|on) args="$$args --no-index";; esac; \
	v=$$(opt cert); if [ -n "$$v" ]; then export SSL_CERT_FILE="$$v"; fi; \
	v=$$(opt '[a-z_-]*timeout'); if [ -n "$$v" ]; then export UV_HTTP_TIMEOUT="$$v"; fi; \
	set -x; $(UV) pip install --quiet --compile-bytecode --python $(PY) --index-strategy unsafe-best-match $$args \
	  $(CONSTRAINTS) $(TORCH_SPEC) -e ".[test]"
else
	$(error INSTALLER is uv or pip, not $(INSTALLER))
endif
	touch $(STAMP)

setup: $(STAMP)

# The versions in $(VENV), minus robustune, pip and torch (TORCH_SPEC), as $(LOCK), each for that venv's Python
# version only. To move to the newest releases: `make setup VENV=/tmp/newest LOCK= && make lock VENV=/tmp/newest`.
lock:
	v=$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	{ sed -n '/^#/p' $(LOCK); { $(PY) -m pip freeze --all --exclude-editable 2>/dev/null \
	  || $(UV) pip freeze --exclude-editable --python $(PY); } \
	  | grep -v -i -E '^(pip|torch|robustune)(==| @)' | LC_ALL=C sort -t= -k1,1 -f \
	  | sed "s/\$$/ ; python_version == \"$$v\"/"; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

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

# Headless Chromium opens the HTML report and the MLflow UI, tmux runs a study in a terminal; Debian's packages
# (apt-get, as root) when they are not installed yet.
test-ui: setup
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	command -v tmux >/dev/null || (apt-get update && apt-get install -y tmux)
	$(PY) -m pytest -q -m ui

benchmark: setup data
	$(PY) benchmarks/run_all.py

benchmark-gpu: setup data
	$(PY) benchmarks/run_all.py --gpu

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts .pytest_cache
