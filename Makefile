# Fresh machine: `make demo` (main job) and `make test` (whole suite). Both build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FIXTURE ?= tests/fixtures/e_style

.PHONY: venv test test-fast demo demo-fixture lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@py=$$(scripts/find_python.sh) || exit 1; \
	  [ -x $(PY) ] || $$py -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,real,plots]"
	@touch $(STAMP)

TUNIX_STAMP := $(VENV)/.tunix

# the tunix extra (google-tunix, about 1 GB with its dependencies) only for the full suite
$(TUNIX_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test,real,plots,tunix]"
	@touch $@

test: venv $(TUNIX_STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

# without the tests marked slow: under 4 minutes on 2 cores
test-fast: venv
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow"

# The main job: real text from Google's released Gemma 3 270M weights (GGUF, via the `real` extra).
DEMO_PROMPT ?= The capital of France is
demo: venv
	@ckpt=$$($(PY) scripts/gemma3_270m_path.py) && \
	  $(VENV)/bin/gemma4 generate --checkpoint "$$ckpt" --prompt "$(DEMO_PROMPT)" \
	  --max-new-tokens 48

# Generation from the smallest reference fixture (no download needed).
demo-fixture: venv
	$(VENV)/bin/gemma4 generate --checkpoint $(FIXTURE) --prompt-ids 2,17,5,9,33,101,7 \
	  --max-new-tokens 16

lint: venv
	$(VENV)/bin/ruff check gemma pallas_kernels scripts tests configs

clean:
	rm -rf $(VENV)
