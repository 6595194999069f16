# Every target installs what it needs: system packages via apt-get (when
# missing), then a virtual environment with cowfs and its Python packages.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv \
	qemu-system-x86 qemu-utils busybox-static e2fsprogs fio util-linux fdisk parted cpio attr \
	python3-pyfuse3 python3-trio perl openssl
PYTEST_ARGS ?=

PJDFSTEST := build/pjdfstest
# What pjdfstest's configure script finds on Linux with glibc (chflags and fchflags are glibc
# stubs, so it leaves them out); writing them down lets a plain cc build it, with no autotools.
PJDFSTEST_DEFINES := _GNU_SOURCE HAVE_SYS_SYSMACROS_H HAVE_FACCESSAT HAVE_FCHMODAT HAVE_FCHOWNAT \
	HAVE_FSTATAT HAVE_LCHMOD HAVE_LINKAT HAVE_MKDIRAT HAVE_MKFIFOAT HAVE_MKNODAT HAVE_OPENAT \
	HAVE_POSIX_FALLOCATE HAVE_READLINKAT HAVE_RENAMEAT HAVE_SYMLINKAT HAVE_UTIMENSAT \
	HAVE_STRUCT_STAT_ST_ATIM HAVE_STRUCT_STAT_ST_CTIM HAVE_STRUCT_STAT_ST_MTIM

.PHONY: setup system-packages test demo bench soak lint typecheck clean pjdfstest

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

test: setup pjdfstest
	$(PY) -m pytest $(PYTEST_ARGS)

# The POSIX suite run by tests/mount/test_pjdfstest.py: its .t files find the pjdfstest
# program in a directory above them, hence the link to the vendored tests beside it.
pjdfstest: $(PJDFSTEST)/pjdfstest $(PJDFSTEST)/tests

$(PJDFSTEST)/pjdfstest: tests/pjdfstest/pjdfstest.c Makefile | system-packages
	mkdir -p $(@D)
	printf '#define %s 1\n' $(PJDFSTEST_DEFINES) > $(@D)/config.h
	cc -O2 -Wall -Werror -I$(@D) -o $@ $<

$(PJDFSTEST)/tests:
	mkdir -p $(@D)
	ln -sfn ../../tests/pjdfstest/tests $@

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./examples/demo.sh

bench: setup
	$(PY) bench/bench.py $(BENCH_ARGS)

soak: setup
	COWFS_SOAK=1 $(PY) -m pytest tests/unit tests/mount $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check cowfs tests bench examples

typecheck: setup
	$(VENV)/bin/mypy cowfs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .hypothesis $(PJDFSTEST)
