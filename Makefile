# The README's two commands: `make demo` and `make test`. Both create .venv
# on first use and install exactly the pinned versions in constraints.txt.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test lint typecheck pytest bench proto fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,demo,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/tether demo

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src/tether/wire src/tether/policy

typecheck: $(STAMP)
	$(BIN)/mypy

# pytest exits 5 when it collected no tests; that is not a failure of the code.
pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench.isolate $(if $(findstring --quick,$(BENCH_ARGS)),--quick)

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

# The gateway fuzz target for FUZZ_SECONDS (default 600); summary in
# .hypothesis/fuzz-summary.txt, found examples kept in .hypothesis/examples.
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
