# lesion-kd: two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# The real datasets: $LESION_KD_DATA if set, else ../shared/datasets when it exists.
SHARED_DATA := $(abspath $(wildcard ../shared/datasets))
export LESION_KD_DATA ?= $(SHARED_DATA)
PROFILE ?= cpu
LABELS ?= 0.1

.PHONY: install test test-fast demo lint clean-runs reproduce-table readme-results

# The help texts of `lesion-kd fit/validate/test/predict --help`, built ahead so that even the first one prints
# without importing Lightning (lesion_kd/help_cache.py); a no-op while the code is unchanged.
install: $(VENV)/.installed
	@$(PY) -m lesion_kd.commands.help_texts

# Re-runs only when pyproject.toml changes; torch is pinned in the same pip command as the packages that
# need torchvision (see docs), so pip cannot pull a different torch.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "sweeps==0.3.0"
	@touch $@

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The method against its supervised student on Kvasir-SEG (experiments/profile/demo.yaml): fills the teacher
# cache of a 300-image training subset, trains SemiKD+ and semikd_sup side by side (one thread each), prints
# both test Dice and their paired difference, writes runs/demo/overlay.png (lesion_kd/commands/demo.py).
demo: install
	@test -n "$$LESION_KD_DATA" || { echo "set LESION_KD_DATA to the folder that holds Kvasir-SEG/"; exit 1; }
	$(VENV)/bin/lesion-kd demo --out runs/demo

# The comparison table, ablation, efficiency table and HTML report (experiments/reproduce/$(PROFILE).yaml):
# runs every cell without a finished result, then writes table.md/.csv, ablation.md, efficiency.md, paired.md, report.html.
reproduce-table: install
	@test -n "$$LESION_KD_DATA" || { echo "set LESION_KD_DATA to the folder that holds Kvasir-SEG/ and BUSI/"; exit 1; }
	$(VENV)/bin/lesion-kd reproduce-table --profile $(PROFILE) $(if $(OUT),--out $(OUT)) $(REPRODUCE_ARGS)

# The generated results blocks (between their markers) from experiments/results/$(PROFILE)/: README.md's
# headline table, docs/results.md's full results table and paired summary (lesion_kd/reporting/readme.py).
readme-results: install
	$(PY) -m lesion_kd.reporting.readme --profile $(PROFILE) --readme README.md docs/results.md

lint: install
	$(VENV)/bin/ruff check lesion_kd tests benchmarks
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.cuda

clean-runs:
	rm -rf runs
