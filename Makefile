# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test parity clean-venv

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the pinned requirements (idempotent)

demo: setup  ## teacher + KD and WTTM students on the bundled digits set (CPU, a few minutes)
	$(PY) scripts/demo.py

test: setup  ## the whole pytest suite
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
