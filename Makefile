# Two commands do all set-up on a fresh machine:
#   make demo   - create the environment (idempotent) and run the main job
#   make test   - create the environment (idempotent) and run the tests, ruff and the import layers
#   make bench  - every benchmark (hours on 2 cores), then the README's results section
#   make data-fashion - Fashion-MNIST's IDX files into data/fashion-mnist (apt-get download, sha256 checked)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
DEMO_RECIPE ?= examples/digits.yaml
FASHION_DIR ?= data/fashion-mnist
# the demo needs only these; the tests (and every other plugin) need the rest
DEMO_EXTRAS := torch,hf,diffusion,plots
ALL_EXTRAS := torch,hf,diffusion,datasets,minilm,plots,privacy,flower-simulation,tensorboard,mlflow,dev

.PHONY: demo test bench lint clean data-fashion

# Packages go in with uv, bootstrapped into the venv by pip: the same versions as pip resolves, in 23 s
# instead of 164 s for the demo's set on an empty cache (2 cores, 2026-12-03). Where uv cannot be had, pip
# does it. uv reads no pip configuration, so pip's find-links (where a local CPU torch wheel may lie) are
# passed on; without them torch==2.13.0 comes from the index, as it would through pip. The demo's set goes
# in without bytecode (about 4 s instead of 25 s; its one process then imports in 16 s instead of 8 s, where
# PYTHONDONTWRITEBYTECODE keeps Python from writing it); the tests' stamp compiles the whole environment,
# since every test process would otherwise import torch, diffusers, transformers and flwr in 16-17 s.
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
INSTALL = if test -x $(BIN)/uv; then $(BIN)/uv pip install --quiet --python $(BIN)/python \
	$(foreach links,$(FIND_LINKS),--find-links $(links)) $(1); else $(BIN)/python -m pip install --quiet $(1); fi

$(DEMO_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv || echo "uv could not be installed: installing with pip (slower)"
	# torch first, from the CPU wheel pinned in constraints.txt, so nothing pulls a CUDA build
	$(call INSTALL,-c constraints.txt "torch==2.13.0")
	$(call INSTALL,-c constraints.txt -e ".[$(DEMO_EXTRAS)]")
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(call INSTALL,-c constraints.txt -e ".[$(ALL_EXTRAS)]" -e examples/fedmmkt-example-plugin)
	# -qq: a third-party file that does not compile (vendored Python 2, say) is imported from source, as pip does
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

demo: $(DEMO_STAMP)
	# a recipe reading data/fashion-mnist gets its files first (checked, fetched only when missing)
	if grep -q "data/fashion-mnist" $(DEMO_RECIPE); then $(MAKE) --no-print-directory data-fashion; fi
	HF_HUB_OFFLINE=1 $(BIN)/fedmmkt run $(DEMO_RECIPE) --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=12 -n auto --dist loadscope
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

# Fashion-MNIST's four IDX files (Debian's dataset-fashion-mnist, sha256 checked) for examples/fashion.yaml
data-fashion: $(DEMO_STAMP)
	$(BIN)/fedmmkt data verify fashion-mnist $(FASHION_DIR) 2>/dev/null || \
		$(BIN)/fedmmkt data fetch fashion-mnist $(FASHION_DIR)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks all

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
