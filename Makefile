# Every check is a target; CI (.ci/run) runs `make test`, the README's test command.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.onthefly-deps
PROTO_SRC := proto/onthefly_proto/onthefly.proto
EXT := vscode-extension
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup demo test test-py proto check-proto lint format typecheck bench ext ext-build ext-test system-deps clean

## setup: venv + pinned Python deps (CPU torch) + generated stubs + extension deps; idempotent
setup: $(STAMP) system-deps ext-deps

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	# The CPU wheel first: an unpinned torch pulled in later would be a 5 GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,lightning,explorer]'
	# A script saved as lightning.py must still be able to `import lightning` (see onthefly_pathfix.py).
	$(PY) -c "import os, site; open(os.path.join(site.getsitepackages()[0], 'onthefly_pathfix.pth'), 'w').write('import onthefly_pathfix\n')"
	touch $(STAMP)

## system-deps: Debian chromium for the dashboard browser tests (never a downloaded browser)
system-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  elif command -v sudo >/dev/null; then \
	    sudo apt-get update -qq; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "setup: /usr/bin/chromium is missing and apt-get is not usable; install Debian's chromium" >&2; exit 1; fi; \
	fi

ext-deps:
	@if [ -f $(EXT)/package.json ]; then \
	  if [ ! -d $(EXT)/node_modules ] || [ $(EXT)/package-lock.json -nt $(EXT)/node_modules/.stamp ]; then \
	    (cd $(EXT) && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.stamp); \
	  fi; \
	fi

## demo: the README's first command: set everything up, then run the main job on the embedded default
demo: setup
	$(VENV)/bin/onthefly run --automode --headless --port 0 examples/regimes.py

## test: the README's second command: set up, then run every test (Python + extension)
test: setup check-proto
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --durations=15
	@if [ -f $(EXT)/package.json ]; then $(MAKE) --no-print-directory ext-test; fi

test-py: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

## proto: regenerate the stubs from proto/ (never edit onthefly_proto/*_pb2*.py by hand)
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --mypy_out=. $(PROTO_SRC)

check-proto: $(STAMP)
	@tmp=$$(mktemp -d); \
	$(PY) -m grpc_tools.protoc -I proto --python_out=$$tmp --grpc_python_out=$$tmp \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --mypy_out=$$tmp $(PROTO_SRC); \
	for f in onthefly_pb2.py onthefly_pb2_grpc.py onthefly_pb2.pyi; do \
	  if ! cmp -s $$tmp/onthefly_proto/$$f onthefly_proto/$$f; then \
	    echo "check-proto: onthefly_proto/$$f differs from $(PROTO_SRC); run 'make proto'" >&2; rm -rf $$tmp; exit 1; fi; \
	done; rm -rf $$tmp; echo "check-proto: stubs match proto/"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP)
	$(VENV)/bin/mypy onthefly onthefly_supervisor onthefly_worker

bench: $(STAMP)
	$(PY) bench/overhead.py
	$(PY) bench/loop_overhead.py
	$(PY) bench/recorder_ab.py
	$(PY) bench/ingest.py
	$(PY) bench/load.py
	$(PY) bench/checkpoint.py
	$(PY) bench/cluster.py
	$(PY) bench/fork_latency.py
	$(PY) bench/merge_cost.py
	$(PY) bench/pause.py
	$(PY) bench/method.py

ext: ext-deps
	cd $(EXT) && npm run package

ext-build: ext-deps
	cd $(EXT) && npm run build

ext-test: ext-deps system-deps
	cd $(EXT) && npm test

clean:
	rm -rf .onthefly build *.egg-info
