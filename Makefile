# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --config-settings editable_mode=compat -e .
	touch $(STAMP)

setup: $(STAMP)  ## create .venv, install the pinned requirements and this project (editable; idempotent)

demo: setup  ## teacher + KD and WTTM students on the bundled digits set (CPU, a few minutes; THREADS=N to choose)
	$(PY) scripts/demo.py $(if $(THREADS),--threads $(THREADS))

test: setup  ## the whole pytest suite
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
