# The two commands of the README, plus the pieces they are made of.
PY := .venv/bin/python

.PHONY: install test demo demo-seg lint bench compare

install:
	bash tools/install.sh

test: install
	$(PY) -m pytest tests

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
