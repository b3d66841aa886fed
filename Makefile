# The two commands of the README, plus the pieces they are made of.
PY := .venv/bin/python

.PHONY: install test test-slow demo demo-seg lint bench compare swap-sweep

install:
	bash tools/install.sh

test: install
	$(PY) -m pytest tests

# the sweeps left out of `make test` (pytest -m slow)
test-slow: install
	$(PY) -m pytest tests -m slow

# backbone swap over every upstream model family -> results/backbone_swap.md
swap-sweep: install
	$(PY) tools/swap_sweep.py

demo: install
	$(PY) tools/demo.py det

demo-seg: install
	$(PY) tools/demo.py seg

lint: install
	$(PY) -m flake8 mmsetformer tools tests configs
	$(PY) -m isort --check-only mmsetformer tools tests

bench: install
	$(PY) tools/benchmark.py

compare: install
	$(PY) tools/compare_backbones.py
