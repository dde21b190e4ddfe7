# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint format bench suite-data clean

# Real image data from two Debian packages, for the 8-task suite (benchmarks/quality.py
# --suite images8): downloaded from the Debian archive and unpacked without root or dpkg -i.
DEBIAN_DATA ?= $(HOME)/.cache/mu2net/debian

venv: $(STAMP)

$(STAMP): requirements/lock.txt requirements/nodeps.txt setup.py
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.13.9
	$(VENV)/bin/uv pip install --python $(PY) --compile-bytecode -r requirements/lock.txt
	$(VENV)/bin/uv pip install --python $(PY) --compile-bytecode --no-deps -r requirements/nodeps.txt
	$(VENV)/bin/uv pip install --python $(PY) --no-deps -e .
	touch $(STAMP)

demo: venv
	$(VENV)/bin/mu2net demo

lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	@# import-linter reads the installed layout (the top-level folders mapped into mu2net.*).
	rm -rf build/lint
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps --target build/lint .
	cd build/lint && PYTHONPATH=. ../../$(VENV)/bin/lint-imports --no-cache ../../pyproject.toml

test: venv lint
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: venv
	$(PY) benchmarks/throughput.py

suite-data:
	mkdir -p $(DEBIAN_DATA)/deb
	cd $(DEBIAN_DATA)/deb && apt-get download dataset-fashion-mnist opencv-doc
	dpkg-deb -x $(DEBIAN_DATA)/deb/dataset-fashion-mnist_*.deb $(DEBIAN_DATA)
	dpkg-deb --fsys-tarfile $(DEBIAN_DATA)/deb/opencv-doc_*.deb | tar -x -C $(DEBIAN_DATA) \
		./usr/share/doc/opencv-doc/examples/data/digits.png
	rm -rf $(DEBIAN_DATA)/deb

clean:
	rm -rf $(VENV) build *.egg-info
