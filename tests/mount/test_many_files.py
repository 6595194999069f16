"""A mount used as a scratch directory: tens of thousands of changed files.

20,000 created files in `make test`, 200,000 in `make soak`: every file reads back, status lists
every change, diff works, and the daemon's descriptors stay under a bound that does not grow with
the number of files (the store is a few shared logs, not one store file per changed file)."""

from __future__ import annotations

import errno
import json
import os
import resource
from collections import Counter
from pathlib import Path

import pytest

from ..conftest import MountFactory
from ..helpers import COWFS, SOAK, CommandLineMount, private_tmpfs, run, status_json

CREATED = 200_000 if SOAK else 20_000
PER_DIRECTORY = 1000
BASE_NAMES = 100  # base files renamed, and as many deleted
FD_BOUND = 256  # descriptors of the daemon, beyond its open file handles


def _content(number: int) -> bytes:
    return f"file {number}\n".encode()


def _created_path(root: Path, number: int) -> Path:
    return root / "many" / f"d{number // PER_DIRECTORY:03d}" / f"f{number:06d}"


def _descriptors(m: CommandLineMount) -> int:
    return len(os.listdir(f"/proc/{m.pid}/fd"))


@pytest.mark.daemon_untraced
@pytest.mark.timeout(7200 if SOAK else 1200)  # 200,000 files through one FUSE daemon take a while
def test_many_created_files_renames_and_deletes_with_few_descriptors(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    for index in range(2 * BASE_NAMES):
        (base_dir / f"base{index:03d}").write_bytes(f"base {index}\n".encode())
    m = mount_factory(base_dir)
    rss_before = m.rss_kib()
    (m.path / "many").mkdir()
    for number in range(CREATED):
        if number % PER_DIRECTORY == 0:
            _created_path(m.path, number).parent.mkdir()
        _created_path(m.path, number).write_bytes(_content(number))
    for index in range(BASE_NAMES):
        os.rename(m.path / f"base{index:03d}", m.path / "many" / f"renamed{index:03d}")
        os.unlink(m.path / f"base{index + BASE_NAMES:03d}")
    assert _descriptors(m) <= FD_BOUND
    per_name = (m.rss_kib() - rss_before) * 1024 // (CREATED + 2 * BASE_NAMES)
    print(f"daemon memory per changed name: {per_name} bytes")  # reported, not a target

    handles = [os.open(_created_path(m.path, number), os.O_RDWR) for number in range(0, CREATED, CREATED // 50)]
    try:
        assert _descriptors(m) <= FD_BOUND + len(handles)
    finally:
        for handle in handles:
            os.close(handle)

    for number in range(CREATED):
        assert _created_path(m.path, number).read_bytes() == _content(number), number
    for index in range(BASE_NAMES):
        assert (m.path / "many" / f"renamed{index:03d}").read_bytes() == f"base {index}\n".encode()
        assert not (m.path / f"base{index + BASE_NAMES:03d}").exists()

    status = status_json(m.path)
    changes = status["changes"]
    states = Counter(change["state"] for change in changes)
    directories = CREATED // PER_DIRECTORY + 1
    assert states == {"created": CREATED + directories, "renamed": BASE_NAMES, "deleted": BASE_NAMES}, states
    created = {change["path"] for change in changes if change["state"] == "created"}
    assert all(str(_created_path(Path("/"), number)) in created for number in range(CREATED))
    assert status["store_bytes"] == sum(len(_content(number)) for number in range(CREATED))
    # A page each (and the store filesystem's own blocks: its extent tree).
    assert CREATED * 4096 <= status["store_disk_bytes"] <= CREATED * 4096 * 1.01
    assert _descriptors(m) <= FD_BOUND

    last = _created_path(m.path, CREATED - 1)
    diff = json.loads(run([COWFS, "diff", "--json", str(last)]).stdout)
    assert diff["ranges"] == [[0, len(_content(CREATED - 1))]] and diff["base_size"] is None
    renamed = json.loads(run([COWFS, "diff", "--json", str(m.path / "many" / "renamed000")]).stdout)
    assert renamed["ranges"] == [] and renamed["base_size"] == len(b"base 0\n")
    listed = json.loads(run([COWFS, "list", "--json"]).stdout)["mounts"]
    assert [row["store_bytes"] for row in listed if row["mountpoint"] == str(m.path)] == [status["store_bytes"]]
    os.sync()  # the kernel writes the files' times back now (a SETATTR each), not within umount's timeout


def test_a_daemon_with_few_descriptors_still_takes_thousands_of_changed_files(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    """At its open-file limit the daemon used to fail the next create with EIO (one store file
    per changed file): now the limit does not matter to the number of files."""
    m = mount_factory(base_dir)
    assert m.pid is not None
    resource.prlimit(m.pid, resource.RLIMIT_NOFILE, (64, 64))
    for number in range(2000):
        path = m.path / f"f{number:04d}"
        with open(path, "wb") as f:
            f.write(_content(number))
            os.fsync(f.fileno())
    assert all((m.path / f"f{number:04d}").read_bytes() == _content(number) for number in range(2000))


def test_chmod_and_rename_of_thousands_of_base_files_hold_no_descriptor_each(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    """A base file whose metadata or name changed (chmod -R, mv) used to hold its base open for
    the life of the mount: at the open-file limit the next chmod failed with EMFILE."""
    count = 2000
    for number in range(count):
        (base_dir / f"b{number:04d}").write_bytes(_content(number))
    m = mount_factory(base_dir)
    assert m.pid is not None
    resource.prlimit(m.pid, resource.RLIMIT_NOFILE, (64, 64))
    (m.path / "moved").mkdir()
    for number in range(count):
        path = m.path / f"b{number:04d}"
        os.chmod(path, 0o600)
        if number % 2:
            os.rename(path, m.path / "moved" / path.name)
    for number in range(count):
        path = m.path / ("moved" if number % 2 else "") / f"b{number:04d}"
        assert path.read_bytes() == _content(number), path
        assert path.stat().st_mode & 0o777 == 0o600
    with open(m.path / "b0000", "r+b") as f:  # and a write to one of them
        f.write(b"F")
    assert (m.path / "b0000").read_bytes() == b"F" + _content(0)[1:]
    states = Counter(change["state"] for change in status_json(m.path)["changes"])
    assert states == {"modified": count // 2, "renamed": count // 2, "created": 1}, states
    assert _descriptors(m) <= FD_BOUND


def test_writes_to_thousands_of_base_files_hold_few_descriptors(base_dir: Path, mount_factory: MountFactory) -> None:
    """A base file whose bytes changed used to hold its base open for the life of the mount: at
    the open-file limit the next write failed with EMFILE.  Now only the few used last do."""
    count = 2000
    for number in range(count):
        (base_dir / f"b{number:04d}").write_bytes(_content(number))
    m = mount_factory(base_dir)
    assert m.pid is not None
    resource.prlimit(m.pid, resource.RLIMIT_NOFILE, (FD_BOUND, FD_BOUND))
    for number in range(count):
        with open(m.path / f"b{number:04d}", "r+b") as f:
            f.write(b"W")
    assert _descriptors(m) <= FD_BOUND
    for number in range(count):
        assert (m.path / f"b{number:04d}").read_bytes() == b"W" + _content(number)[1:], number
    states = Counter(change["state"] for change in status_json(m.path)["changes"])
    assert states == {"modified": count}, states
    assert _descriptors(m) <= FD_BOUND


@pytest.mark.parametrize("full", ["store filesystem", "max-store"])
def test_a_full_store_fails_new_files_with_enospc_not_eio(
    full: str, base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    with private_tmpfs(tmp_path / "store", "4m") as store:
        args = ["--store", str(store)] + (["--max-store", "1M"] if full == "max-store" else [])
        m = mount_factory(base_dir, *args)
        errors: Counter[int] = Counter()
        written = []
        for number in range(3000):  # 4 KiB of store each: the store is full long before
            path = m.path / f"f{number:04d}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.write(fd, b"x" * 400)
                os.fsync(fd)
                written.append(path)
            except OSError as error:
                errors[error.errno or 0] += 1
            finally:
                os.close(fd)
        assert written and set(errors) == {errno.ENOSPC}, errors
        assert all(path.read_bytes() == b"x" * 400 for path in written)
        for path in written[: len(written) // 2]:
            path.unlink()  # space comes back at once
        with open(m.path / "after", "wb") as f:
            f.write(b"y" * 400)
            os.fsync(f.fileno())
        m.stop()
