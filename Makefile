# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-0.1.0

.PHONY: demo test lint bench mutate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU build; a bare `torch` would pull several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sparta.demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/bench_mlp_cpu.py
	$(PY) bench/bench_propagation_bert.py

# Mutation testing with cosmic-ray (configs and the fast test subsets: bench/mutation/*.toml).
# Mutants are applied to the files in place, one at a time, and restored after each run: do not
# edit or commit while it runs. MUTATE picks the targets, SAMPLE the fraction of each target's
# mutants run (seeded); sessions and reports go to out/mutation/. To run on a scratch copy of the
# tree instead, link sparta/propagation_rules, sparta/codegen and sparta/kernels in the copy to its
# own folders: the editable install maps those packages to this checkout, so a mutant of the
# copy's propagation_rules/ or codegen/ would otherwise never be imported (and always survive).
# Kernels built by mutants go to a cache of their own (out/mutation/kernel-cache), never the
# user's.
#   make mutate MUTATE="emitter rules" SAMPLE=0.2
MUTATE ?= emitter rules engine shrink plan kernels
SAMPLE ?= 1.0
CR     := $(VENV)/bin/cosmic-ray
mutate: $(STAMP)
	$(PY) -m pip show cosmic-ray >/dev/null 2>&1 || $(PY) -m pip install -q "cosmic-ray>=8.7,<9"
	mkdir -p out/mutation
	set -e; for t in $(MUTATE); do \
	  $(CR) init bench/mutation/$$t.toml out/mutation/$$t.sqlite --force; \
	  $(VENV)/bin/cr-filter-operators out/mutation/$$t.sqlite bench/mutation/$$t.toml; \
	  $(PY) bench/mutation/sample.py out/mutation/$$t.sqlite $(SAMPLE); \
	  SPARTA_CACHE_DIR=$(CURDIR)/out/mutation/kernel-cache \
	    nice -n 10 $(CR) exec bench/mutation/$$t.toml out/mutation/$$t.sqlite; \
	done
	$(PY) bench/mutation/summary.py $(MUTATE:%=out/mutation/%.sqlite) \
	  --equivalent bench/mutation/equivalent.toml | tee out/mutation/summary.md

clean:
	rm -rf $(VENV) out .pytest_cache
