# Fresh machine: `make demo` (main job) and `make test` (whole suite). Both build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FIXTURE ?= tests/fixtures/e_style

.PHONY: venv test demo lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@py=$$(scripts/find_python.sh) || exit 1; \
	  [ -x $(PY) ] || $$py -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

test: venv
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/gemma4 generate --checkpoint $(FIXTURE) --prompt-ids 2,17,5,9,33,101,7 \
	  --max-new-tokens 16

lint: venv
	$(VENV)/bin/ruff check gemma pallas_kernels scripts tests

clean:
	rm -rf $(VENV)
