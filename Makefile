# Every target installs what it needs: system packages via apt-get (when
# missing), then a virtual environment with cowfs and the Python packages that
# target uses: `make demo` only cowfs (.venv/.installed), `make setup` and the
# test targets the test and lint tools too (.venv/.installed-dev), `make bench`
# matplotlib besides (.venv/.installed-bench).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# -qq: errors only. pip's warnings here are never about cowfs (a find-links or
# index location of the machine's pip configuration that does not exist, the
# build backend's notice on every editable install), and they filled the first
# screen of a fresh `make demo`.
PIP := $(PY) -m pip -qq --disable-pip-version-check
SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config gcc patch python3-dev python3-venv \
	qemu-system-x86 qemu-utils busybox-static e2fsprogs fio util-linux fdisk parted cpio attr \
	python3-pyfuse3 python3-trio perl openssl nbdkit fuse2fs xfsprogs btrfs-progs
PYTEST_ARGS ?=
# make iotests: unpacking and patching the QEMU source package
IOTESTS_PACKAGES := dpkg-dev patch xz-utils
IOTESTS_ARGS ?=

# pyfuse3 is built from its pinned sdist with the patches in patches/pyfuse3
# (see patches/pyfuse3/README.md); the local version label marks the build.
PYFUSE3_VERSION := 3.5.0
PYFUSE3_SHA256 := 88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_BUILD_VERSION := $(PYFUSE3_VERSION)+cowfs.4
PYFUSE3_PATCH_DIR := patches/pyfuse3
PYFUSE3_PATCHES := $(addprefix $(PYFUSE3_PATCH_DIR)/,$(shell cat $(PYFUSE3_PATCH_DIR)/series))
PYFUSE3_SDIST := build/pyfuse3/pyfuse3-$(PYFUSE3_VERSION).tar.gz
PYFUSE3_TREE := build/pyfuse3/pyfuse3-$(PYFUSE3_VERSION)
PYFUSE3_INSTALLED := $(VENV)/.pyfuse3-$(PYFUSE3_BUILD_VERSION)

PJDFSTEST := build/pjdfstest
# What pjdfstest's configure script finds on Linux with glibc (chflags and fchflags are glibc
# stubs, so it leaves them out); writing them down lets a plain cc build it, with no autotools.
PJDFSTEST_DEFINES := _GNU_SOURCE HAVE_SYS_SYSMACROS_H HAVE_FACCESSAT HAVE_FCHMODAT HAVE_FCHOWNAT \
	HAVE_FSTATAT HAVE_LCHMOD HAVE_LINKAT HAVE_MKDIRAT HAVE_MKFIFOAT HAVE_MKNODAT HAVE_OPENAT \
	HAVE_POSIX_FALLOCATE HAVE_READLINKAT HAVE_RENAMEAT HAVE_SYMLINKAT HAVE_UTIMENSAT \
	HAVE_STRUCT_STAT_ST_ATIM HAVE_STRUCT_STAT_ST_CTIM HAVE_STRUCT_STAT_ST_MTIM

.PHONY: setup system-packages test demo bench bench-xfs soak iotests lint typecheck clean pjdfstest

setup: system-packages $(VENV)/.installed-dev

# Without the recommended packages: qemu-system-x86 alone recommends a desktop's worth
# (GTK, sound, OVMF, ...): 465 packages and 374 MB on a fresh Debian 12 against about 200
# and 190 MB, and nothing here uses them (guests run -nodefaults -nographic). debconf's note
# that it cannot preconfigure without apt-utils (minimal images) is dropped, nothing else.
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:" $$missing; \
		set -o pipefail; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing 2>&1 >/dev/null | { grep -v '^debconf: delaying' >&2 || true; }; \
	fi

$(PY): | system-packages
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(PYFUSE3_SDIST): | $(PY)
	mkdir -p $(@D)
	$(PIP) download --no-deps --no-binary pyfuse3 -d $(@D) pyfuse3==$(PYFUSE3_VERSION)

# Unpack afresh, check the hash, apply the series, drop the shipped C so that
# Cython regenerates it from the patched sources, and install into the venv.
# CFLAGS=-g0: no debug info in the extension, which halves gcc's time on the
# 3 MB of generated C (the tracebacks that matter are Python's).
$(PYFUSE3_INSTALLED): $(PYFUSE3_SDIST) $(PYFUSE3_PATCH_DIR)/series $(PYFUSE3_PATCHES) | system-packages $(PY)
	@echo "$(PYFUSE3_SHA256)  $<" | sha256sum --check --status 2>/dev/null || \
		{ echo "refusing $<: sha256 is not $(PYFUSE3_SHA256) (delete it to download again)"; exit 1; }
	@echo "building pyfuse3 $(PYFUSE3_BUILD_VERSION): its sdist with the patches in $(PYFUSE3_PATCH_DIR)"
	@rm -rf $(PYFUSE3_TREE)
	@tar -xzf $< -C $(dir $(PYFUSE3_TREE))
	@set -e; for patch in $(PYFUSE3_PATCHES); do patch -d $(PYFUSE3_TREE) -p1 --quiet --forward < $$patch; done
	@rm $(PYFUSE3_TREE)/src/pyfuse3/__init__.c
	CFLAGS=-g0 SETUPTOOLS_SCM_PRETEND_VERSION=$(PYFUSE3_BUILD_VERSION) $(PIP) install --force-reinstall --no-deps ./$(PYFUSE3_TREE)
	@rm -f $(VENV)/.pyfuse3-*
	@touch $@

# cowfs itself, editable; after the patched pyfuse3, so that pip sees the dependency as satisfied.
# Its compiled read path (cowfs/native/*.c) is optional for `pip install .`, but not here: the
# tests need it.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard cowfs/native/*.[ch]) $(PYFUSE3_INSTALLED)
	$(PIP) install -e .
	@$(PY) -c 'import cowfs._native' 2>/dev/null || \
		{ echo "cowfs._native (cowfs/native/*.c) did not build: $(PIP) install -v -e . shows why"; exit 1; }
	@touch $@

# The extras, each for the targets that need it (pyproject.toml: test, dev, bench).
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[test,dev]'
	@touch $@

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[bench]'
	@touch $@

# Under coverage (pyproject.toml [tool.coverage]): the report of what no test ran comes after
# pytest's summary, also when a test failed; make's status is pytest's.
test: setup lint typecheck pjdfstest
	@mkdir -p build/coverage && rm -f build/coverage/data*
	$(PY) -m coverage run -m pytest $(PYTEST_ARGS); status=$$?; \
		$(PY) -m coverage combine -q && $(PY) -m coverage report; exit $$status

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

demo: system-packages $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./examples/demo.sh

bench: SYSTEM_PACKAGES += fuse-overlayfs  # the metadata phase compares with it
bench: setup $(VENV)/.installed-bench
	$(PY) -m bench $(BENCH_ARGS)

# The same on a loop-mounted XFS (base, native copy and store there): cowfs in passthrough mode.
bench-xfs: SYSTEM_PACKAGES += fuse-overlayfs
bench-xfs: setup $(VENV)/.installed-bench
	$(PY) -m bench.xfs $(BENCH_ARGS)

soak: setup
	COWFS_SOAK=1 $(PY) -m pytest tests/unit tests/mount $(PYTEST_ARGS)

# QEMU's qemu-iotests (quick group, raw and qcow2) on local ext4 and in a cowfs mount; not part of
# `make test`. The QEMU source is cached in /var/cache/cowfs-iotests. See tests/iotests/README.md.
iotests: setup
	@$(MAKE) --no-print-directory system-packages SYSTEM_PACKAGES="$(IOTESTS_PACKAGES)"
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" nice -n 15 $(PY) tests/iotests/run.py $(IOTESTS_ARGS)

lint: setup
	$(VENV)/bin/ruff check cowfs tests bench examples
	$(VENV)/bin/ruff format --check cowfs tests bench examples

typecheck: setup
	$(VENV)/bin/mypy cowfs tests bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .hypothesis $(PYFUSE3_TREE) $(PJDFSTEST) cowfs/_native*.so
