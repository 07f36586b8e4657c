# Two commands set everything up on a machine that has only Python 3.11:
#   make demo   create the environment, then `dvc repro report@demo`
#   make test   create the environment, then run the whole test suite
# The environment is .venv, made by uv from uv.lock (uv itself is bootstrapped into .tools).

PYTHON ?= python3.11
UV_VERSION := 0.13.9
TOOLS := .tools
VENV := .venv
UV := $(TOOLS)/bin/uv
RUN := PATH="$(CURDIR)/$(VENV)/bin:$$PATH"

.PHONY: env env-torch env-gpu demo test test-fast ui server plots clean-outputs

env: $(VENV)/.synced

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --python $(PYTHON)
	touch $@

# PyTorch (for KERAS_BACKEND=torch) is optional, and not in uv.lock: PyPI's Linux build carries
# CUDA (gigabytes). This installs the CPU build into .venv; a wheel folder given as
# TORCH_FIND_LINKS (CI's machine has one) is used instead of PyTorch's index. A later
# `uv sync` (after uv.lock changes) removes it again: run `make env-torch` once more.
TORCH_VERSION := 2.13.0+cpu
TORCH_FIND_LINKS ?=
env-torch: env
	$(UV) pip install --python $(VENV)/bin/python "torch==$(TORCH_VERSION)" \
	  $(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS),--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)

# On a machine with an NVIDIA GPU: the CUDA builds of JAX and TensorFlow, at the versions uv.lock
# installed (PyPI's nvidia-* wheels, about 5 GB; the GPU's driver must be there already). Without
# them JAX runs on the CPU only, and TensorFlow finds a GPU only where CUDA is installed system-wide.
# A later `uv sync` puts the plain builds back: run `make env-gpu` once more.
locked = $(shell $(VENV)/bin/python -c 'import importlib.metadata as m; print(m.version("$(1)"))' 2>/dev/null)
env-gpu: env
	$(UV) pip install --python $(VENV)/bin/python "jax[cuda12]==$(call locked,jax)" "tensorflow[and-cuda]==$(call locked,tensorflow)"

demo: env
	$(RUN) dvc repro report@demo
	@echo
	@cat reports/leaderboard/demo.md
	@echo
	@echo "Figures: reports/figures/digits/ (make plots)  Validation: reports/validation/digits/docs/index.html"
	@echo "Runs:    make ui, then open http://127.0.0.1:5000"

# Two processes (pytest-xdist), each given whole test files (--dist loadfile: a file's shared
# fixtures, such as the demo that test_pipeline's tests read, are built once). Much of an
# end-to-end test's time is one process waiting on a DVC or stage subprocess that uses one core;
# TEST_WORKERS=1 runs the suite in one process.
# --durations: the 25 slowest tests close the report, to see where a long suite's time goes.
TEST_WORKERS ?= 2
PYTEST := $(RUN) python -m pytest -n $(TEST_WORKERS) --dist loadfile
test: env
	$(PYTEST) --durations=25

test-fast: env
	$(PYTEST) -m "not slow"

ui: env
	$(RUN) mlflow ui --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" --host 127.0.0.1 --port 5000

# A tracking server for a team: PostgreSQL (Debian's) + `mlflow server`, kept in .mlflow-server/.
# Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
server: env
	$(RUN) python -m stages.server

# `dvc plots show` as a page that opens offline: dvc_plots/index.html
plots: env
	$(RUN) python -m stages.plots show

# A fresh start: everything the pipeline wrote, MLflow's store included, and what would let DVC
# bring the outputs back without running a stage (dvc.lock, and its run cache): brought back so,
# they would have no MLflow runs, and report would stop on the missing registered versions. The
# next `dvc repro` runs every stage again. DVC's file cache stays (`dvc gc` empties it). A
# committed dvc.lock comes back with `git checkout dvc.lock`.
clean-outputs:
	rm -rf data/raw data/interim data/processed data/weights models reports/figures reports/predictions \
	  reports/validation reports/metrics reports/leaderboard reports/evaluation mlflow.db mlartifacts dvc.lock
	cache="$$($(RUN) dvc cache dir 2>/dev/null)"; rm -rf "$${cache:-.dvc/cache}/runs"
