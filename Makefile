# Every target installs what it needs: system packages via apt-get (when
# missing), then a virtual environment with cowfs and its Python packages.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv \
	qemu-system-x86 qemu-utils busybox-static e2fsprogs fio util-linux fdisk parted cpio attr \
	python3-pyfuse3 python3-trio
PYTEST_ARGS ?=
# make iotests: unpacking and patching the QEMU source package
IOTESTS_PACKAGES := dpkg-dev patch xz-utils
IOTESTS_ARGS ?=

.PHONY: setup system-packages test demo bench soak iotests lint typecheck clean

setup: system-packages $(VENV)/.installed

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,bench]'
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./examples/demo.sh

bench: setup
	$(PY) bench/bench.py $(BENCH_ARGS)

soak: setup
	COWFS_SOAK=1 $(PY) -m pytest tests/unit tests/mount $(PYTEST_ARGS)

# QEMU's qemu-iotests (quick group, raw and qcow2) on local ext4 and in a cowfs mount; not part of
# `make test`. The QEMU source is cached in /var/cache/cowfs-iotests. See tests/iotests/README.md.
iotests: setup
	@$(MAKE) --no-print-directory system-packages SYSTEM_PACKAGES="$(IOTESTS_PACKAGES)"
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" nice -n 15 $(PY) tests/iotests/run.py $(IOTESTS_ARGS)

lint: setup
	$(VENV)/bin/ruff check cowfs tests bench examples

typecheck: setup
	$(VENV)/bin/mypy cowfs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .hypothesis
