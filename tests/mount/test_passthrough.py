"""Passthrough mode: on XFS and btrfs each file is served by the kernel from an unnamed
reflink clone of its base.  What only this mode has to prove: the choice of mode and its reasons,
that no sequence of opens can write a base, one backing per inode, writes through a mapping after
close, the store freed at unmount and SIGKILL, df, reset of open files, and block-granular diffs.
(The mount suite's core, namespace, control, holes and fault tests run in this mode as well.)"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import stat
import threading
from pathlib import Path

import pytest

from ..conftest import MountFactory
from ..filesystems import DEFAULT, REFLINK_FILESYSTEMS
from ..helpers import COWFS, private_tmpfs, read_base, run, sha256, wait_until, write_at
from .users import NOBODY, as_user

FILESYSTEMS = REFLINK_FILESYSTEMS
MiB = 1 << 20


def passthrough(m: object) -> dict[str, object]:
    features = {feature["name"]: feature for feature in m.status()["features"]}  # type: ignore[attr-defined]
    return dict(features["passthrough"])


def free_bytes(path: Path) -> int:
    vfs = os.statvfs(path)
    return vfs.f_bfree * vfs.f_frsize


def base_state(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return sha256(path), st.st_mtime_ns, st.st_atime_ns


# -- the choice of mode ------------------------------------------------------------------------


def test_the_mode_is_on_beside_the_images_and_says_so(
    base_dir: Path, filesystem: str, mount_factory: MountFactory
) -> None:
    (base_dir / "disk.raw").write_bytes(b"d" * MiB)
    m = mount_factory(base_dir)
    assert passthrough(m) == {"name": "passthrough", "enabled": True, "detail": f"{filesystem} reflink"}
    assert f"passthrough on ({filesystem} reflink)" in run([COWFS, "status", str(m.path)]).stdout
    assert f"INFO cowfs.passthrough: passthrough on ({filesystem} reflink)" in m.log.read_text()


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["-o", "passthrough=off"], "turned off with -o passthrough=off"),
        (["--passthrough", "off"], "turned off with -o passthrough=off"),
        (["--max-store", "1G"], "--max-store needs every write to pass through the daemon"),
    ],
)
def test_the_mode_can_be_turned_off(args: list[str], reason: str, base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "disk.raw").write_bytes(b"d" * MiB)
    m = mount_factory(base_dir, *args)
    assert passthrough(m) == {"name": "passthrough", "enabled": False, "detail": reason}
    write_at(m.path / "disk.raw", 0, b"w")
    assert m.status()["requests"]["write"] >= 1  # the byte store, through the daemon


def test_a_store_elsewhere_keeps_the_byte_mode(base_dir: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    with private_tmpfs(tmp_path / "tmpfs", "16m") as tmpfs:
        m = mount_factory(base_dir, "--store", str(tmpfs))
        assert passthrough(m)["detail"] == (
            "the store's filesystem (tmpfs) cannot clone files: Operation not supported"
        )
        m.stop()
    elsewhere = tmp_path / "store"  # another filesystem than the base's, that can clone or not
    elsewhere.mkdir()
    detail = str(passthrough(mount_factory(base_dir, "--store", str(elsewhere)))["detail"])
    assert detail.startswith("the store's filesystem") or detail.startswith("BASE_DIR and the store are on different")


@pytest.mark.filesystems(DEFAULT)
def test_ext4_keeps_the_byte_mode_and_says_why(base_dir: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(base_dir)
    assert passthrough(m) == {
        "name": "passthrough",
        "enabled": False,
        "detail": "the store's filesystem (ext4) cannot clone files: Operation not supported",
    }
    assert (
        "passthrough off (the store's filesystem (ext4) cannot clone files"
        in run([COWFS, "status", str(m.path)]).stdout
    )


# -- the base is never written ------------------------------------------------------------------


def _every_kind_of_open(view: Path) -> None:
    """Every way a program may open the view for writing, each one writing through it."""
    fd = os.open(view, os.O_RDWR)
    os.pwrite(fd, b"rdwr", 0)
    reader = os.open(view, os.O_RDONLY)  # a second handle of the same inode meanwhile
    assert os.pread(reader, 4, 0) == b"rdwr"
    os.close(reader)
    os.close(fd)
    fd = os.open(view, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"appended")
    os.close(fd)
    fd = os.open(view, os.O_RDWR | os.O_DIRECT)
    with mmap.mmap(-1, 4096) as block:
        block.write(b"direct" * 10)
        os.pwritev(fd, [block], 4096)
    os.close(fd)
    fd = os.open(view, os.O_RDWR)
    mapping = mmap.mmap(fd, 4096 * 4, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)  # the mapping outlives its handle
    mapping[8192:8198] = b"mapped"
    mapping.flush()
    mapping.close()
    os.truncate(view, 3 * 4096)  # by path, no handle
    fd = os.open(view, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"truncated and rewritten")
    os.close(fd)


def test_no_open_reaches_the_base_for_writing(base_dir: Path, mount_factory: MountFactory) -> None:
    """The kernel reopens a backing file with each open's flags: were a base registered, a
    writable open would write it.  Whatever the opens, the base keeps its bytes and times."""
    (base_dir / "disk.raw").write_bytes(os.urandom(4 * MiB))
    before = base_state(base_dir / "disk.raw")
    m = mount_factory(base_dir)
    view = m.path / "disk.raw"
    reader = os.open(view, os.O_RDONLY)  # open before, during and after all of it
    _every_kind_of_open(view)
    assert view.read_bytes() == b"truncated and rewritten"
    assert os.pread(reader, 100, 0) == b"truncated and rewritten"  # one inode, one backing: it sees it all
    os.close(reader)
    run([COWFS, "reset", str(view)])  # and once more on a fresh clone
    _every_kind_of_open(view)
    assert base_state(base_dir / "disk.raw") == before


def test_opens_racing_resets_never_write_the_base(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "disk.raw").write_bytes(os.urandom(MiB))
    before = base_state(base_dir / "disk.raw")
    m = mount_factory(base_dir)
    view = m.path / "disk.raw"
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            while not stop.is_set():
                fd = os.open(view, os.O_RDWR)
                os.pwrite(fd, os.urandom(4096), 4096 * (os.getpid() % 16))
                os.close(fd)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for index in range(16):
            force = ["--force"] if index % 2 else []
            result = run([COWFS, "reset", *force, str(view)], check=False)
            assert result.returncode == 0 or "open in the mount" in result.stderr or "not changed" in result.stderr
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert base_state(base_dir / "disk.raw") == before


def test_another_user_writing_clears_setuid(base_dir: Path, mount_factory: MountFactory) -> None:
    """The kernel still asks the daemon to clear setuid before a write by someone without
    CAP_FSETID, though the write itself passes through."""
    (base_dir / "tool").write_bytes(b"#!/bin/sh\n")
    mountpoint = base_dir.parent / "visible-mnt"
    m = mount_factory(base_dir, "--allow-other", mountpoint=mountpoint)
    tool = m.path / "tool"
    tool.chmod(0o6777)
    write_at(tool, 0, b"#")  # root keeps them
    assert stat.S_IMODE(tool.stat().st_mode) == 0o6777
    run(as_user(NOBODY, NOBODY, ["sh", "-c", f"echo x >> {tool}"]))
    assert stat.S_IMODE(tool.stat().st_mode) == 0o777
    assert tool.read_bytes() == b"#!/bin/sh\nx\n"


# -- what the daemon learns of writes it never saw ---------------------------------------------


def test_writes_through_a_mapping_after_close_stay(base_dir: Path, mount_factory: MountFactory) -> None:
    """A mapping writes the clone directly, also after its handle was closed (a kernel that lets
    the mapping hold only the clone sends RELEASE then): a file opened for writing keeps its clone."""
    (base_dir / "disk.raw").write_bytes(bytes(64 * 1024))
    m = mount_factory(base_dir)
    view = m.path / "disk.raw"
    fd = os.open(view, os.O_RDWR)
    mapping = mmap.mmap(fd, 64 * 1024)
    os.close(fd)
    try:
        mapping[40000:40006] = b"mapped"
        mapping.flush()
    finally:
        mapping.close()
    assert view.read_bytes()[40000:40006] == b"mapped"
    assert wait_until(lambda: m.status()["requests"].get("release", 0) >= 2)  # every handle released
    assert json.loads(run([COWFS, "diff", "--json", str(view)]).stdout)["ranges"] == [[36864, 40960]]


def test_the_clones_times_and_size_show_in_stat(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "disk.raw").write_bytes(bytes(8192))
    old = (base_dir / "disk.raw").stat().st_mtime_ns
    m = mount_factory(base_dir)
    view = m.path / "disk.raw"
    fd = os.open(view, os.O_RDWR)
    try:
        os.pwrite(fd, b"grown", 20000)
        assert os.fstat(fd).st_size == 20005
        assert wait_until(lambda: view.stat().st_mtime_ns > old)
        ctime = view.stat().st_ctime_ns
        os.fchmod(fd, 0o600)
        assert view.stat().st_ctime_ns >= ctime  # never backwards
    finally:
        os.close(fd)


def test_a_diff_names_whole_blocks(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "disk.raw").write_bytes(os.urandom(MiB))
    m = mount_factory(base_dir)
    write_at(m.path / "disk.raw", 5000, b"1")
    write_at(m.path / "disk.raw", 65536 * 3 + 10, b"2" * 5000)
    assert m.status()["changes"][0]["bytes_written"] == 4096 + 8192
    report = json.loads(run([COWFS, "diff", "--json", str(m.path / "disk.raw")]).stdout)
    assert report["ranges"] == [[4096, 8192], [196608, 204800]]


def test_reopening_an_untouched_file_reuses_its_clone(base_dir: Path, mount_factory: MountFactory) -> None:
    """A clone costs ~35 µs per extent of its base: the clone of a file nothing changed is kept for
    its next open (until the base changes)."""
    (base_dir / "disk.raw").write_bytes(os.urandom(MiB))
    m = mount_factory(base_dir)

    def clone_of_open_file() -> str:
        with open(m.path / "disk.raw", "rb") as f:
            f.read(4096)
            (target,) = [target for target, _, _ in m.store_fds()]
            return target

    first = clone_of_open_file()
    assert wait_until(lambda: m.status()["requests"].get("release", 0) >= 1)
    assert clone_of_open_file() == first
    assert m.status()["changes"] == []


# -- reset ------------------------------------------------------------------------------------


def test_reset_force_gives_open_handles_the_base_again(base_dir: Path, mount_factory: MountFactory) -> None:
    """(A reset that changes the size of a file the kernel holds gives the name a new inode
    instead, as in every mode: test_namespace.)"""
    base = os.urandom(3 * MiB + 100)  # a partial last block
    (base_dir / "disk.raw").write_bytes(base)
    m = mount_factory(base_dir)
    view = m.path / "disk.raw"
    fd = os.open(view, os.O_RDWR)
    try:
        os.pwrite(fd, b"mine" * 1024, MiB)
        os.pwrite(fd, b"tail", len(base) - 4)  # the last, partial block
        refused = run([COWFS, "reset", str(view)], check=False)
        assert refused.returncode != 0 and "open in the mount" in refused.stderr
        run([COWFS, "reset", "--force", str(view)])
        assert os.fstat(fd).st_size == len(base)
        assert os.pread(fd, len(base) + 1, 0) == base  # the same handle, the same clone: the base again
        os.pwrite(fd, b"again", 0)  # and it stays writable
    finally:
        os.close(fd)
    assert view.read_bytes()[:5] == b"again"
    assert [change["path"] for change in m.status()["changes"]] == ["/disk.raw"]


# -- the store ----------------------------------------------------------------------------------


def test_df_in_the_mount_counts_what_the_clones_take(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "disk.raw").write_bytes(os.urandom(8 * MiB))
    m = mount_factory(base_dir)
    store = Path(m.status()["store_dir"])
    os.sync()  # btrfs counts free space at its transaction commits
    free_before = free_bytes(m.path)
    fd = os.open(m.path / "disk.raw", os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(8 * MiB), 0)  # every block copied on write
        os.fsync(fd)
        os.sync()
        taken = free_before - free_bytes(m.path)
        assert free_bytes(m.path) == free_bytes(store)
        assert 8 * MiB <= taken < 12 * MiB, taken
        assert m.store_bytes_on_disk() >= 8 * MiB
    finally:
        os.close(fd)
    m.stop()

    def freed() -> bool:
        os.sync()
        return free_bytes(store) >= free_before - MiB

    assert wait_until(freed), f"only {free_bytes(store) - free_before + taken} bytes came back at unmount"
    assert os.listdir(store) == []


def test_sigkill_frees_the_clones_with_the_dead_mount(base_dir: Path, mount_factory: MountFactory) -> None:
    """The kernel holds the clone of a file that was open when the daemon died (its backing file
    stays registered with the dead mount): it comes back when `cowfs umount` clears that mount."""
    (base_dir / "disk.raw").write_bytes(os.urandom(4 * MiB))
    before = base_state(base_dir / "disk.raw")
    m = mount_factory(base_dir)
    store = Path(m.status()["store_dir"])
    os.sync()
    free_before = os.statvfs(store).f_bfree
    fd = os.open(m.path / "disk.raw", os.O_RDWR)
    os.pwrite(fd, os.urandom(16 * MiB), 0)
    os.fsync(fd)
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)
    assert m.wait_for_daemon_exit(timeout=10)
    with contextlib.suppress(OSError):  # ENOTCONN: its FLUSH finds no daemon; the handle is closed all the same
        os.close(fd)
    run([COWFS, "umount", str(m.path)])

    def freed() -> bool:
        os.sync()  # btrfs frees at its transaction commits
        return os.statvfs(store).f_bfree >= free_before - 256

    assert wait_until(freed, timeout=20)
    assert base_state(base_dir / "disk.raw") == before


@pytest.mark.base_may_change  # the tree seen at the start has a filesystem mounted inside it
def test_a_file_that_cannot_be_cloned_is_served_by_the_daemon(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    """A file on another filesystem inside BASE_DIR (a mount there) cannot be cloned into the store:
    the daemon serves it from the byte store, and says so once."""
    (base_dir / "here.raw").write_bytes(b"h" * 8192)
    inner = base_dir / "inner"
    with private_tmpfs(inner, "8m"):
        (inner / "there.raw").write_bytes(b"t" * 8192)
        m = mount_factory(base_dir)
        m.expect_passthrough = False  # this file's bytes go through the daemon
        write_at(m.path / "inner" / "there.raw", 0, b"T")
        write_at(m.path / "here.raw", 0, b"H")
        assert (m.path / "inner" / "there.raw").read_bytes() == b"T" + b"t" * 8191
        assert read_base(inner / "there.raw") == b"t" * 8192
        assert "inner/there.raw cannot be cloned" in m.log.read_text()
        requests = m.status()["requests"]
        assert requests["write"] >= 1 and passthrough(m)["enabled"]
        m.stop()
