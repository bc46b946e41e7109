# softnic — two commands: `make demo` and `make test`. Each sets itself up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
# Debian packages the build and the tests use (headers for OpenSSL and intel-ipsec-mb,
# iproute2 for namespaces, iperf3 for throughput, QEMU and busybox for guest tests).
APT_PKGS := gcc python3-dev python3-venv libssl-dev libipsec-mb-dev iproute2 iperf3 \
            qemu-system-x86 busybox-static procps kmod iputils-ping

.PHONY: all sysdeps venv build test lint demo demo-short bench fuzz clean

all: build

sysdeps:
	@bash scripts/sysdeps.sh $(APT_PKGS)

$(VENV)/.deps: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "setuptools>=65" wheel "Cython>=3.0" cffi cryptography dpkt \
	    pytest hypothesis scapy ruff mypy cython-lint
	@touch $@

venv: sysdeps $(VENV)/.deps

build: venv
	$(PY) setup.py -q build_ext --inplace
	@# The tree itself is the installed package (in-place extensions): a .pth puts it on the
	@# venv's path and two wrappers give the console commands, without a second build.
	@$(PY) -c 'import site, sys; open(site.getsitepackages()[0] + "/softnic-tree.pth", "w").write(sys.argv[1] + "\n")' $(abspath .)
	@for c in softnic:softnic.daemon softnicctl:softnic.cli; do \
	    printf '#!/bin/sh\nexec "%s" -m %s "$$@"\n' $(abspath $(PY)) $${c#*:} > $(VENV)/bin/$${c%%:*}; \
	    chmod +x $(VENV)/bin/$${c%%:*}; done

lint: venv
	$(VENV)/bin/ruff check softnic vhost tests benchmarks
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/cython-lint softnic vhost
	$(VENV)/bin/mypy softnic vhost

test: build lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: build
	$(PY) -m softnic.demo

demo-short: build
	$(PY) -m softnic.demo --short

# Benchmarks print each figure beside a reference measured in the same run. The packet
# core needs nothing; the end-to-end and vhost-user ones build namespaces (root).
bench: build
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/lanes.py
	@if [ "$$(id -u)" -eq 0 ]; then $(PY) benchmarks/underlay.py && $(PY) benchmarks/e2e.py \
	    && $(PY) benchmarks/vhost.py; \
	else echo "benchmarks/underlay.py, e2e.py and vhost.py need root: skipped"; fi

# A sanitized (ASan + UBSan) fuzzing campaign over every compiled entry point.
fuzz: venv
	PYTHON=$(abspath $(PY)) bash scripts/fuzz.sh $(FUZZ_ARGS)

clean:
	rm -rf build $(VENV) softnic/*.so vhost/*.so softnic/*.c vhost/*.c .pytest_cache .mypy_cache
