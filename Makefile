# psearch: `make demo` runs the pipeline on the embedded synthetic dataset; `make test` runs the suite.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The installed marker is rebuilt only when the dependency set changes.
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs bench install clean images pipeline

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks components pipelines
	$(BIN)/ruff format --check src tests benchmarks components pipelines
	$(BIN)/lint-imports

# The documentation site (mkdocs.yml, docs/): --strict fails on a broken link or a page
# missing from the nav. Browse it while editing with `.venv/bin/mkdocs serve`.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The Kubeflow images, tagged as the pipeline names them (params.yaml `pipeline`, or
# $PSEARCH_IMAGE_CPU / $PSEARCH_IMAGE_GPU), built by scripts/build_images.sh with Docker, or
# with podman where there is no Docker (a local Debian base from debootstrap; no registry
# needed). Push with `docker push` / `podman push` after.
images: $(STAMP)
	PIP=$(BIN)/pip bash scripts/build_images.sh \
		$$($(BIN)/python -m pipelines.settings cpu) $$($(BIN)/python -m pipelines.settings gpu)

# pipelines/person_search.yaml, the compiled Kubeflow pipeline that users submit (committed;
# tests/test_pipeline_compile.py fails when it is stale).
pipeline: $(STAMP)
	$(BIN)/python -m pipelines compile

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
