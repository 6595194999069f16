"""Security: who may enter, running as an ordinary user, a private store, a read-only
base, and no name that reaches outside BASE_DIR."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from cowfs.base import BaseDir
from cowfs.mounts import find_mount

from ..conftest import MountFactory
from ..helpers import fd_flags, is_mounted, read_base, run, sha256, wait_for_pid_exit
from .test_core import make_file
from .users import NOBODY, as_user, dev_fuse_open_to_all, fresh_user

MiB = 1 << 20


def _as_nobody(*argv: str) -> tuple[int, str]:
    result = run(as_user(NOBODY, NOBODY, argv), check=False)
    return result.returncode, result.stdout + result.stderr


def _world_readable_base(visible_tmp: Path) -> Path:
    base = visible_tmp / "base"
    base.mkdir()
    (base / "public.img").write_bytes(b"for everyone")
    (base / "private.img").write_bytes(b"root only")
    (base / "private.img").chmod(0o600)
    return base


def test_default_mount_lets_no_other_user_in(visible_tmp: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(_world_readable_base(visible_tmp), mountpoint=visible_tmp / "mnt")
    for argv in (["ls", str(m.path)], ["cat", str(m.path / "public.img")], ["stat", str(m.path)]):
        code, output = _as_nobody(*argv)
        assert code != 0 and "Permission denied" in output, (argv, output)


def test_allow_other_lets_others_in_with_normal_permission_checks(
    visible_tmp: Path, mount_factory: MountFactory
) -> None:
    m = mount_factory(_world_readable_base(visible_tmp), "--allow-other", mountpoint=visible_tmp / "mnt")
    entry = find_mount(m.path)
    assert entry is not None and "allow_other" in entry.options
    code, output = _as_nobody("cat", str(m.path / "public.img"))
    assert code == 0 and output == "for everyone"
    code, output = _as_nobody("cat", str(m.path / "private.img"))
    assert code != 0 and "Permission denied" in output  # default_permissions: the modes apply
    code, output = _as_nobody("sh", "-c", f"echo x > {m.path / 'public.img'}")
    assert code != 0 and "Permission denied" in output  # 0644 root's: not theirs to write
    code, output = _as_nobody("touch", str(m.path / "new-file"))
    assert code != 0 and "Permission denied" in output  # the root directory is root's 0755
    assert (m.path / "private.img").read_bytes() == b"root only"  # the owner still can


def test_ordinary_user_mounts_writes_and_unmounts(
    visible_tmp: Path, cowfs_for_others: tuple[list[str], dict[str, str]]
) -> None:
    """End to end as a fresh unprivileged user, through the setuid fusermount3.  The user runs a
    world-readable copy of cowfs with the system Python and Debian's stock pyfuse3."""
    cowfs_argv, cowfs_env = cowfs_for_others
    base = visible_tmp / "base"
    base.mkdir()
    data = make_file(base / "disk.raw", 2 * MiB)
    before = sha256(base / "disk.raw")
    with fresh_user() as user, dev_fuse_open_to_all():
        home = visible_tmp / "home"
        (home / "mnt").mkdir(parents=True)
        (home / "store").mkdir()
        for path in (home, home / "mnt", home / "store"):
            os.chown(path, user.pw_uid, user.pw_gid)
        mnt = home / "mnt"

        def as_them(*argv: str) -> str:
            result = run(
                as_user(user.pw_uid, user.pw_gid, argv), check=False, env={**os.environ, **cowfs_env, "HOME": str(home)}
            )
            assert result.returncode == 0, (argv, result.stderr)
            return result.stdout

        try:
            as_them(*cowfs_argv, "mount", "--store", str(home / "store"), str(base), str(mnt))
            assert is_mounted(mnt)
            entry = find_mount(mnt)
            assert entry is not None and entry.option("user_id") == str(user.pw_uid)
            as_them(
                "dd",
                "if=/dev/zero",
                f"of={mnt / 'disk.raw'}",
                "bs=4096",
                "count=2",
                "seek=10",
                "conv=notrunc,fsync",
                "status=none",
            )
            as_them("sh", "-c", f"echo new > {mnt / 'created.txt'}")
            expected = data[:40960] + bytes(8192) + data[49152:]
            assert as_them("sha256sum", str(mnt / "disk.raw")).split()[0] == hashlib.sha256(expected).hexdigest()
            assert as_them("cat", str(mnt / "created.txt")) == "new\n"
            # Debian's pyfuse3 is a stock build: cowfs runs on it and says which features are off.
            status = json.loads(as_them(*cowfs_argv, "status", "--json", str(mnt)))
            features = {f["name"]: f for f in status["features"]}
            assert sorted(features) == ["compiled_reads", "fallocate", "killpriv_v2", "lseek", "passthrough"]
            assert not any(f["enabled"] for f in features.values())
            assert "is a stock build without it" in features["passthrough"]["detail"]
            assert "is a stock build without it" in features["fallocate"]["detail"]
            reads_off = features["compiled_reads"]["detail"]  # READs in Python: no request filter, or no module
            assert "stock build without request filters" in reads_off or "is not built" in reads_off, reads_off
            pid = int(
                as_them("getfattr", "--only-values", "-n", "user.cowfs.control", str(mnt))
                .split('"pid": ')[1]
                .split(",")[0]
            )
            assert Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0] == str(user.pw_uid)
            as_them(*cowfs_argv, "umount", str(mnt))
            assert not is_mounted(mnt)
            assert wait_for_pid_exit(pid, timeout=10)
        finally:
            if is_mounted(mnt):
                run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    assert sha256(base / "disk.raw") == before
    assert sorted(os.listdir(base)) == ["disk.raw"]
    assert os.listdir(home / "store") == []


def test_store_is_private_and_planted_symlinks_are_not_followed(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    store = tmp_path / "store"
    store.mkdir(mode=0o1777)  # a shared, sticky directory like /var/tmp
    store.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_bytes(b"must stay")
    planted = [".cowfs-x", "tmp", "store", "0", "#0"]
    for name in planted:
        (store / name).symlink_to(victim)
    (store / "dir-link").symlink_to(tmp_path, target_is_directory=True)
    make_file(base_dir / "disk.raw", 4 * MiB)
    m = mount_factory(base_dir, "--store", str(store))
    with open(m.path / "disk.raw", "r+b") as f:
        f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
        (m.path / "new.img").write_bytes(b"n" * 10000)
        files = m.store_fds()
        assert len(files) == 1  # one log shared by both files
        for target, st, flags in files:
            assert target.startswith(f"{store}/") and target.endswith("(deleted)"), target
            assert st.st_nlink == 0 and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
            assert flags & os.O_TMPFILE == os.O_TMPFILE
    assert sorted(p.name for p in store.iterdir()) == sorted([*planted, "dir-link"])
    assert victim.read_bytes() == b"must stay"
    assert all((store / name).is_symlink() for name in planted)


def test_store_without_o_tmpfile_support_is_still_private_and_nameless(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    """A store directory on a filesystem without O_TMPFILE (here: another FUSE mount) falls back to
    a random name made with O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600, unlinked at once."""
    store_base = tmp_path / "store-base"
    store_base.mkdir()
    store_mount = mount_factory(store_base)
    store = store_mount.path / "store"
    store.mkdir(mode=0o1777)
    store.chmod(0o1777)
    make_file(base_dir / "disk.raw", MiB)
    m = mount_factory(base_dir, "--store", str(store))
    with open(m.path / "disk.raw", "r+b") as f:
        f.write(b"x" * 8192)
        f.flush()
        os.fsync(f.fileno())
        files = m.store_fds()
        assert files
        for target, st, flags in files:
            assert target.startswith(f"{store}/.cowfs-"), target
            assert st.st_nlink == 0 and stat.S_IMODE(st.st_mode) == 0o600
            assert flags & os.O_TMPFILE != os.O_TMPFILE  # really the fallback
        assert os.listdir(store) == []
    assert (m.path / "disk.raw").read_bytes()[:8192] == b"x" * 8192
    m.stop()  # before the store's own mount, which it keeps busy
    assert os.listdir(store) == []


def test_base_is_only_ever_opened_read_only(base_dir: Path, mount_factory: MountFactory) -> None:
    """Sample every descriptor of the daemon into BASE_DIR while a busy workload runs."""
    for i in range(8):
        (base_dir / f"d{i}" / "sub").mkdir(parents=True)
        make_file(base_dir / f"d{i}" / "sub" / "disk.raw", 256 * 1024, seed=i)
        os.setxattr(base_dir / f"d{i}" / "sub" / "disk.raw", "user.tag", b"t")
    m = mount_factory(base_dir)
    assert m.pid is not None
    base_real = os.path.realpath(base_dir)
    done = threading.Event()

    def workload() -> None:
        while not done.is_set():
            for i in range(8):
                path = m.path / f"d{i}" / "sub" / "disk.raw"
                os.listdir(m.path / f"d{i}")
                os.getxattr(path, "user.tag")
                with open(path, "r+b") as f:
                    f.read(4096)
                    f.seek(i * 4096)
                    f.write(b"w" * 100)
                    f.flush()
                    os.fsync(f.fileno())
                os.truncate(path, 200_000 + i)

    thread = threading.Thread(target=workload)
    thread.start()
    seen, writable = 0, []
    try:
        for _ in range(200):
            for fd_link in Path(f"/proc/{m.pid}/fd").iterdir():
                try:
                    target = os.readlink(fd_link)
                    flags = fd_flags(m.pid, int(fd_link.name))
                except (FileNotFoundError, IndexError):
                    continue  # closed meanwhile
                if target == base_real or target.startswith(base_real + "/"):
                    seen += 1
                    if flags & os.O_ACCMODE != os.O_RDONLY:
                        writable.append((target, oct(flags)))
    finally:
        done.set()
        thread.join(timeout=60)
    assert seen > 200 and not writable, (seen, writable)


@pytest.mark.base_may_change  # reading a symlink updates its atime (the kernel's readlink does): checked below
def test_no_name_in_the_mount_reaches_outside_base_dir(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    """A base symlink is shown as a symlink; following it is the caller's business (the kernel
    resolves it where the caller stands), never the daemon's."""
    for where, content in ((tmp_path / "outside", b"daemon side"), (tmp_path / "mnts" / "outside", b"caller side")):
        where.mkdir(parents=True)
        (where / "secret").write_bytes(content)
    (base_dir / "escape").symlink_to("../outside")  # relative: resolves differently from the mount
    (base_dir / "abs").symlink_to(tmp_path / "outside")
    (base_dir / "sub").mkdir()
    (base_dir / "sub" / "up").symlink_to("../../outside/secret")
    before = {path: (os.readlink(path) if path.is_symlink() else None) for path in base_dir.rglob("*")}
    m = mount_factory(base_dir, mountpoint=tmp_path / "mnts" / "mnt")
    assert (m.path / "escape").is_symlink() and os.readlink(m.path / "escape") == "../outside"
    assert os.readlink(m.path / "abs") == str(tmp_path / "outside")
    assert (m.path / "escape" / "secret").read_bytes() == b"caller side"  # resolved by the kernel from MNT
    assert os.readlink(m.path / "sub" / "up") == "../../outside/secret"
    assert sorted(os.listdir(m.path)) == ["abs", "escape", "sub"]
    assert os.path.realpath(m.path / "sub" / "..") == str(m.path)
    # `..` at the mount root is the mountpoint's parent (the kernel's), not BASE_DIR's.
    assert sorted(os.listdir(m.path / "..")) == sorted(os.listdir(tmp_path / "mnts"))
    # A write through the symlink lands where the kernel resolved it, never behind the daemon's back.
    (m.path / "escape" / "secret").write_bytes(b"written")
    assert (tmp_path / "mnts" / "outside" / "secret").read_bytes() == b"written"
    assert read_base(tmp_path / "outside" / "secret") == b"daemon side"
    assert {path: (os.readlink(path) if path.is_symlink() else None) for path in base_dir.rglob("*")} == before


def test_base_access_layer_refuses_every_escape(base_dir: Path, tmp_path: Path) -> None:
    """The daemon's only way into BASE_DIR: components, one at a time, no symlink followed."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"s")
    (base_dir / "escape").symlink_to(tmp_path / "outside")
    (base_dir / "file-link").symlink_to(tmp_path / "outside" / "secret")
    (base_dir / "sub").mkdir()
    base = BaseDir(base_dir)
    try:
        attempts = [
            (base.lstat, (b"..",), errno.EINVAL),
            (base.lstat, (b"sub", b"..", b".."), errno.EINVAL),
            (base.lstat, (b"a/b",), errno.EINVAL),
            (base.lstat, (b".",), errno.EINVAL),
            (base.lstat, (b"escape", b"secret"), errno.ENOTDIR),
            (base.list, (b"escape",), errno.ENOTDIR),
            (base.open_file, (b"file-link",), errno.ELOOP),
            (base.open_file, (b"escape", b"secret"), errno.ENOTDIR),
            (base.open_file, (b"..", b"outside", b"secret"), errno.EINVAL),
        ]
        for call, parts, expected in attempts:
            with pytest.raises(OSError) as failure:
                call(parts)
            assert failure.value.errno == expected, (call.__name__, parts, failure.value)
        assert stat.S_ISLNK(base.lstat((b"escape",)).st_mode)
        assert base.readlink((b"escape",)) == os.fsencode(tmp_path / "outside")
    finally:
        base.close()
