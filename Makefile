# Quick start: `make demo`, then `make test`. Every target installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
CACHE := .cache
BUF := $(CACHE)/buf/node_modules/.bin/buf
INSTALLED := $(VENV)/.installed
EXPORT_INSTALLED := $(VENV)/.export-installed
TEST_INSTALLED := $(VENV)/.test-installed
MODELLER_INSTALLED := $(VENV)/.modeller-installed
LINT_INSTALLED := $(VENV)/.lint-installed
PYTEST_ARGS ?=

.PHONY: install install-export install-modeller models demo serve test test-fast bench protos check-stubs dashboards lint lint-protos ci clean prometheus

# The server runs from this checkout (editable); the API stubs (gen/) and the client (client/) are
# distributions of their own, installed here from their folders.
$(INSTALLED): requirements/serve.txt pyproject.toml gen/pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.8
	$(UV) pip install -q --python $(PY) -r requirements/serve.txt
	$(UV) pip install -q --python $(PY) --no-deps -e gen -e client -e .
	touch $@

install: $(INSTALLED)

# torch/timm for the modeller's exporter and the PyTorch reference tests. Installed with pip, whose
# configuration on a machine may point at a local copy of these large wheels (uv would ignore it).
$(EXPORT_INSTALLED): $(INSTALLED) requirements/export.txt
	$(PY) -m pip install -q -r requirements/export.txt
	touch $@

install-export: $(EXPORT_INSTALLED)

# The tests' own tools (pytest, hypothesis, kubectl, …): never in the serving image.
$(TEST_INSTALLED): $(INSTALLED) requirements/test.txt
	$(UV) pip install -q --python $(PY) -r requirements/test.txt
	touch $@

# The modeller tools' extras (matplotlib for tessera-evaluate's figures): never in the serving image.
$(MODELLER_INSTALLED): $(INSTALLED) requirements/modeller.txt
	$(UV) pip install -q --python $(PY) -r requirements/modeller.txt
	touch $@

install-modeller: $(MODELLER_INSTALLED)

# ruff, mypy and the stubs they read: never in the serving image.
$(LINT_INSTALLED): $(INSTALLED) requirements/lint.txt
	$(UV) pip install -q --python $(PY) -r requirements/lint.txt
	touch $@

models: $(INSTALLED)
	$(VENV)/bin/tessera-models --repo model_repository --cache $(CACHE)

demo: $(INSTALLED) models
	$(VENV)/bin/tessera-demo

serve: $(INSTALLED) models
	$(VENV)/bin/tessera-serve

# The deploy tests' real tools: Prometheus (and promtool) and docker-compose (v1, for
# `docker-compose config`), Debian's packages (Prometheus's system service is stopped, the tests
# start their own); the Compose Specification's JSON schema, as the npm package dclint ships it.
# kubectl (with kustomize) and kubernetes-validate come with requirements/serve.txt.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v docker-compose >/dev/null || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus docker-compose; }
	-@service prometheus stop >/dev/null 2>&1; true
	@test -f $(CACHE)/compose-spec/package/schemas/compose.schema.json || { \
	  mkdir -p $(CACHE)/compose-spec && cd $(CACHE)/compose-spec && npm pack --silent dclint@3.1.0 >/dev/null \
	  && tar xzf dclint-3.1.0.tgz package/schemas/compose.schema.json && rm dclint-3.1.0.tgz; }

test: $(TEST_INSTALLED) $(MODELLER_INSTALLED) $(EXPORT_INSTALLED) models prometheus
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The same without the torch extra (its tests skip).
test-fast: $(TEST_INSTALLED) $(MODELLER_INSTALLED) models prometheus
	$(PY) -m pytest -q -m "not slow and not torch" $(PYTEST_ARGS)

# Every benchmark writes its rows into bench/results.json; docs/benchmarks.md is generated from it
# last. The 30-minute soak (a suite of its own; it judges errors and memory, not time) runs in the
# background while the other slow tests, the burst and bench/prepare.py (the benchmarks' caches)
# run; the timed scripts run after it, alone (bench_backends --quick: it has no target). A failing
# step does not stop the others; the target fails at the end if any did. About 47 minutes on 2 cores.
bench: $(TEST_INSTALLED) $(EXPORT_INSTALLED) models
	@set -u; status=0; export TESSERA_BENCH_RECORD=1; mkdir -p $(CACHE); \
	echo "== soak (30 min) in the background: $(CACHE)/bench-soak.log"; \
	$(PY) -m pytest -q -s -m slow -k soak tests/suite/test_load.py $(PYTEST_ARGS) > $(CACHE)/bench-soak.log 2>&1 & soak=$$!; \
	trap 'kill $$soak 2>/dev/null; exit 130' INT TERM; \
	$(PY) -m pytest -q -m slow -k "not soak" $(PYTEST_ARGS) || status=1; \
	$(PY) -m pytest -q -m "not slow" -k burst tests/suite/test_load.py $(PYTEST_ARGS) || status=1; \
	$(PY) bench/prepare.py || status=1; \
	wait $$soak || status=1; tail -n 25 $(CACHE)/bench-soak.log; \
	for script in "backends.py --quick" emotion.py ensemble.py engagement.py shards.py recovery.py startup.py; do \
	  echo "== bench/bench_$$script"; $(PY) bench/bench_$$script || status=1; \
	done; \
	$(PY) bench/report.py || status=1; \
	exit $$status

protos: $(INSTALLED)
	$(PY) -m tools.codegen.gen_stubs

# The Grafana dashboard, from tools/codegen/dashboards.py and the recording rules it reads
# (tests/deploy/test_dashboards.py fails when the committed JSON differs from what this writes).
dashboards: $(INSTALLED)
	$(PY) -m tools.codegen.dashboards

# Fails when the committed stubs differ from what the protos generate.
check-stubs: protos
	git diff --exit-code --stat -- gen/ || { echo "gen/ is out of date with protos/: run make protos"; exit 1; }
	test -z "$$(git status --porcelain -- gen/)" || { git status --short -- gen/; echo "untracked generated files"; exit 1; }

$(BUF):
	mkdir -p $(CACHE)/buf
	npm install --silent --no-save --prefix $(CACHE)/buf @bufbuild/buf@1.75.0

# Lint, format check and types (strict on the serving core and the client; see pyproject.toml).
lint: $(LINT_INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

lint-protos: $(BUF)
	cd protos && ../$(BUF) lint

ci: lint-protos check-stubs lint test

clean:
	rm -rf $(VENV) $(CACHE) model_repository/*/[0-9]*
