# Every target sets itself up: a fresh clone needs only python3 (3.10+) and, for the real-data sources, apt as root.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow lint demo demo-fine bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# 12.5 minutes for the stages, so that set-up included it ends within 15 on 2 cores: on a machine without bf16
# arithmetic the dVAE and the prior take fewer of their steps (bench/RESULTS.md, "`make demo` end to end"). 48-px
# images with 12×12 codes: small shapes keep their form, which the 64-px 8×8 grid turns into blobs
# (bench/RESULTS.md, "`make demo` at 48 px"). At most 4,000 dVAE and 2,600 prior updates: a machine fast enough to
# fit them in the budget draws better samples for held-out and training captions alike (bench/RESULTS.md, "A faster
# machine's spare minutes"); a slower one takes as many as fit.
demo: setup
	$(VENV)/bin/dalle pipeline --out runs/demo --dataset shapes --size 3000 --dvae-preset tiny-48 --time-budget 750 \
		--dvae-steps 4000 --prior-steps 2600

# The same job with 16×16 codes and the updates they need: samples with recognisable shapes, 23 minutes on 2 CPU
# cores with bf16 arithmetic (bench/RESULTS.md, "`make demo-fine` from a clean clone").
demo-fine: setup
	$(VENV)/bin/dalle pipeline --out runs/demo-fine --dataset shapes --size 3000 --dvae-preset tiny-64-16 \
		--dvae-steps 3000 --prior-steps 2000

# Each benchmark rewrites its own section of bench/RESULTS.md; the peer (DALLE-pytorch) is compared where it is
# installed in .peer/site (see bench/dvae_train.py). About an hour in all on 2 cores.
bench: setup
	$(PY) bench/data_loading.py --write
	$(PY) bench/prior_attention.py
	$(PY) bench/dvae_train.py --write
	$(PY) bench/prior_train.py --write
	$(PY) bench/gemm_bound.py
	$(PY) bench/generate.py --write
	$(PY) bench/prefill_sharing.py --write
	$(PY) bench/mfu.py --write

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
