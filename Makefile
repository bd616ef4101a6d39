# One-command setup and use. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
OUT ?= out/demo

.PHONY: setup demo test lint bench reference

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -qq -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The main job: render the example prompt table with the embedded default model, as the batch job
# on a local Ray that the job starts (and stops) itself. Rerunning resumes (nothing left: no writes).
demo: $(STAMP)
	$(VENV)/bin/sd3 generate --prompts examples/prompts.parquet --output $(OUT)
	@echo "images: $(OUT)/images/  manifest: $(OUT)/manifest.parquet  job: $(OUT)/job.json  contact sheet: $(OUT)/contact_sheet.png"

# The whole test suite (what CI runs).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/step_time.py

# Rebuild the tiny checkpoints and diffusers reference outputs (needs the pinned torch venv).
reference:
	bash tools/reference/build_venv.sh .refvenv
	.refvenv/bin/python tools/reference/make_tiny_checkpoints.py --out tests/fixtures
