# One-command setup and use. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
OUT ?= out/demo

.PHONY: setup demo test lint bench reference

setup: $(STAMP)

# uv (pinned in constraints.txt like everything else) resolves, downloads and byte-compiles in
# parallel: a fresh install (empty cache) took 35-66 s here against pip's 1m41s-2m08s. The venv
# keeps pip for later changes (the README's GPU steps).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -qq -c constraints.txt uv
	$(VENV)/bin/uv pip install --python $(VENV)/bin/python -q -c constraints.txt --compile-bytecode -e ".[test]"
	touch $(STAMP)

# The main job: render the example prompt table with the embedded default model, as the batch job
# on a local Ray that the job starts (and stops) itself. Rerunning resumes (nothing left: no writes).
demo: $(STAMP)
	$(VENV)/bin/sd3 generate --prompts examples/prompts.parquet --output $(OUT)
	@echo "images: $(OUT)/images/  manifest: $(OUT)/manifest.parquet  job: $(OUT)/job.json  contact sheet: $(OUT)/contact_sheet.png"

# The whole test suite (what CI runs), one pytest-xdist worker per core (at most 4). Whole files go
# to a worker (--dist loadfile), so a module's fixtures (a Ray cluster, a loaded model) are built
# once. xdist hands out the files with the most tests first; the longest files first was no
# faster (637 s, against 606-621 s for this order in the same hour, 2026-12-08).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/step_time.py

# Rebuild the tiny checkpoints and diffusers reference outputs (needs the pinned torch venv).
reference:
	bash tools/reference/build_venv.sh .refvenv
	.refvenv/bin/python tools/reference/make_tiny_checkpoints.py --out tests/fixtures
