# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test test-unit test-comfy test-e2e test-gpu bench

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest tests -q -m "not gpu"

test-unit: setup
	$(PY) -m pytest tests/unit -q

test-comfy: setup
	$(PY) -m pytest tests/comfy -q

test-e2e: setup
	$(PY) -m pytest tests/e2e -q

# On a CUDA machine (see README: GPU tests).
test-gpu:
	python3 -m pytest tests/gpu -q -m gpu
