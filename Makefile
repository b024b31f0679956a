# medres — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast fuzz bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/medres demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q -n logical --dist loadfile --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -n logical --dist loadfile -m "not slow"

fuzz: install
	MEDRES_FUZZ_EXAMPLES=50000 $(BIN)/python -m pytest -q tests/reliability/test_fuzz.py

bench: install
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/report.py
	$(BIN)/python bench/pointing.py

clean:
	rm -rf runs .pytest_cache build *.egg-info
