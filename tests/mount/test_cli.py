"""The command as people coming from other FUSE filesystems use it: --version, -o options,
-v/-f on either side of `mount`, closed pipes, `cowfs list`."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import cowfs
from cowfs.mounts import find_mount

from ..conftest import MountFactory
from ..helpers import COWFS, CommandLineMount, force_unmount, is_mounted, run, status_json, wait_until
from .users import NOBODY, as_user, visible_tmp  # noqa: F401 (a fixture)

MiB = 1 << 20


def _options_of(mountpoint: Path) -> list[str]:
    entry = find_mount(mountpoint)
    assert entry is not None and entry.fstype == "fuse.cowfs"
    return list(entry.options)


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_comes_from_the_one_version_source(flag: str) -> None:
    result = run([COWFS, flag])
    assert result.stdout == f"cowfs {cowfs.__version__}\n" and result.stderr == ""
    assert cowfs.__version__ == "0.2.0"
    assert importlib.metadata.version("cowfs-disposable") == cowfs.__version__  # pyproject reads it


def test_import_cowfs_imports_no_api_until_used() -> None:
    probe = (
        "import sys, cowfs; before = sorted(m for m in sys.modules if m.startswith('cowfs')); "
        "cowfs.mount, cowfs.UserError; print(before, 'cowfs.api' in sys.modules)"
    )
    result = run([sys.executable, "-c", probe], cwd="/")
    assert result.stdout == "['cowfs'] True\n", result.stdout


def test_mount_parent_imports_nothing_it_does_not_need_before_the_fork(base_dir: Path, tmp_path: Path) -> None:
    """`-X importtime` output of the parent only: the daemon's stderr is /dev/null after the fork."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        result = run([sys.executable, "-X", "importtime", "-m", "cowfs", "mount", str(base_dir), str(mountpoint)])
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import")}
        assert "cowfs.cli" in imported and "cowfs.store" in imported
        assert not imported & {
            "cowfs.api",
            "cowfs.control_cli",
            "cowfs.transfer",
            "cowfs.daemon",
            "pyfuse3",
            "trio",
            "tempfile",
        }, sorted(imported)
        assert is_mounted(mountpoint)
    finally:
        run([COWFS, "umount", str(mountpoint)], check=False)
        force_unmount(mountpoint)


@pytest.mark.parametrize("verbose_first", [True, False], ids=["cowfs -v mount", "cowfs mount -v"])
def test_verbose_works_before_and_after_mount(base_dir: Path, tmp_path: Path, verbose_first: bool) -> None:
    runs: dict[str, str] = {}
    for verbosity in ([], ["-v"], ["-vv"]):
        mountpoint, log = tmp_path / f"mnt{len(runs)}", tmp_path / f"log{len(runs)}"
        mountpoint.mkdir()
        argv = [*verbosity, "mount"] if verbose_first else ["mount", *verbosity]
        try:
            run([COWFS, *argv, "--log-file", str(log), str(base_dir), str(mountpoint)])
            os.listdir(mountpoint)
        finally:
            run([COWFS, "umount", str(mountpoint)], check=False)
            force_unmount(mountpoint)
        runs["".join(verbosity)] = log.read_text()
    assert runs[""] == ""
    assert " INFO cowfs.daemon: mounted " in runs["-v"] and " DEBUG " not in runs["-v"]
    assert " DEBUG " in runs["-vv"]


def test_verbose_before_and_after_mount_add_up(base_dir: Path, tmp_path: Path) -> None:
    mountpoint, log = tmp_path / "mnt", tmp_path / "log"
    mountpoint.mkdir()
    try:
        run([COWFS, "-v", "mount", "-v", "--log-file", str(log), str(base_dir), str(mountpoint)])
        os.listdir(mountpoint)
    finally:
        run([COWFS, "umount", str(mountpoint)], check=False)
        force_unmount(mountpoint)
    assert " DEBUG " in log.read_text()


@pytest.mark.parametrize("argv", [["-f", "mount"], ["mount", "-f"]], ids=["cowfs -f mount", "cowfs mount -f"])
def test_foreground_works_before_and_after_mount(base_dir: Path, tmp_path: Path, argv: list[str]) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    daemon = subprocess.Popen(
        [COWFS, "-v", *argv, str(base_dir), str(mountpoint)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: is_mounted(mountpoint) or daemon.poll() is not None, timeout=30)
        assert daemon.poll() is None, "a foreground mount returned"
        pid = int(json.loads(os.getxattr(mountpoint, "user.cowfs.control"))["pid"])
        assert pid == daemon.pid  # no fork: this very process serves the mount
        run([COWFS, "umount", str(mountpoint)])
        _, stderr = daemon.communicate(timeout=30)
        assert daemon.returncode == 0
        assert "INFO cowfs.daemon: mounted" in stderr  # -f logs to stderr
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        force_unmount(mountpoint)


@pytest.mark.parametrize(
    "argv", [["--help"], ["list"], ["status", "MNT"], ["status", "--json", "MNT"], ["diff", "MNT/disk.raw"]]
)
def test_a_closed_pipe_ends_a_command_quietly(mounted: CommandLineMount, base_dir: Path, argv: list[str]) -> None:
    """A real pipe whose reader is gone: the first write gets EPIPE. The command ends as
    `cat` would, by SIGPIPE (or, for --help, which argparse writes ignoring errors, exit 0),
    and says nothing (also where `status --json` prints changes as they arrive: 300 of them)."""
    (mounted.path / "disk.raw").write_bytes(b"x" * 8192)
    (mounted.path / "new").mkdir()
    for n in range(300):
        (mounted.path / "new" / str(n)).touch()
    argv = [word.replace("MNT", str(mounted.path)) for word in argv]
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [COWFS, *argv], stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60, check=False
        )
    finally:
        os.close(writer)
    assert result.stderr == ""
    assert result.returncode in ((0, -signal.SIGPIPE) if argv == ["--help"] else (-signal.SIGPIPE,))


def test_a_closed_pipe_in_a_shell_pipeline_says_nothing(mounted: CommandLineMount) -> None:
    result = run(["bash", "-c", f"{COWFS} status {mounted.path} | true; {COWFS} --help | head -1"])
    assert result.stderr == ""
    assert result.stdout.startswith("usage: cowfs")


def test_o_options_mean_what_the_long_options_mean(base_dir: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    (base_dir / "disk.raw").write_bytes(bytes(4 * MiB))
    store = tmp_path / "store"
    store.mkdir()
    log = tmp_path / "o.log"
    # What fstab, mount(8) and mount.fuse3 add on the way is accepted and ignored.
    passed_along = (
        "rw,nofail,_netdev,noauto,auto,user,users,nouser,defaults,x-systemd.automount,"
        "x-systemd.requires=/srv,comment=scratch,default_permissions,dev,suid,nodev,nosuid,exec"
    )
    by_o = mount_factory(base_dir, "-o", f"store={store},max_store=1M,log_file={log},allow_other,{passed_along}")
    by_long = mount_factory(base_dir, "--store", str(store), "--max-store", "1M", "--allow-other")
    # (What differs: the mountpoint, and the FUSE requests each served, as the kernel sent them.)
    unlike = {"mountpoint": None, "requests": None}
    assert status_json(by_o.path) | unlike == status_json(by_long.path) | unlike
    assert status_json(by_o.path)["store_dir"] == str(store) and status_json(by_o.path)["max_store"] == MiB
    assert " INFO cowfs.daemon: mounted " in log.read_text()  # log_file= (and -v) took effect
    options = _options_of(by_o.path)
    assert "allow_other" in options and "nosuid" in options and "nodev" in options  # dev,suid: ignored
    assert options == _options_of(by_long.path)
    for m in (by_o, by_long):  # the limit holds: 1 MiB written, the next MiB refused
        with open(m.path / "disk.raw", "r+b", buffering=0) as image:
            image.write(bytes(MiB))
            with pytest.raises(OSError, match="No space left"):
                image.write(b"y" * MiB)
                os.fsync(image.fileno())


def test_o_noexec_and_allow_root_reach_fuse(visible_tmp: Path, mount_factory: MountFactory) -> None:  # noqa: F811
    base = visible_tmp / "base"
    base.mkdir()
    (base / "tool.sh").write_text("#!/bin/sh\necho ran\n")
    (base / "tool.sh").chmod(0o755)
    plain = mount_factory(base, mountpoint=visible_tmp / "plain")
    assert run([str(plain.path / "tool.sh")]).stdout == "ran\n"
    noexec = mount_factory(base, "-o", "noexec,allow_root", mountpoint=visible_tmp / "noexec")
    assert "noexec" in _options_of(noexec.path)
    with pytest.raises(PermissionError):  # EACCES from execve: noexec
        run([str(noexec.path / "tool.sh")])
    other = mount_factory(base, "-o", "allow_other", mountpoint=visible_tmp / "other")
    # allow_root: root (and the owner, here root too) get in, everyone else is refused by FUSE.
    assert run(as_user(NOBODY, NOBODY, ["cat", str(other.path / "tool.sh")]), check=False).returncode == 0
    refused = run(as_user(NOBODY, NOBODY, ["cat", str(noexec.path / "tool.sh")]), check=False)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    assert (noexec.path / "tool.sh").read_text().startswith("#!/bin/sh")


def test_bare_form_as_mount_fuse3_runs_it_means_mount(base_dir: Path, tmp_path: Path) -> None:
    """`cowfs SOURCE MOUNTPOINT -o OPTIONS`, exactly what mount.fuse3 runs (with its `,dev,suid`)."""
    (base_dir / "disk.raw").write_bytes(b"base")
    mountpoint, store = tmp_path / "mnt", tmp_path / "store"
    mountpoint.mkdir()
    store.mkdir()
    try:
        run([COWFS, str(base_dir), str(mountpoint), "-o", f"rw,store={store},max_store=2M,dev,suid"])
        assert (mountpoint / "disk.raw").read_bytes() == b"base"
        assert status_json(mountpoint)["store_dir"] == str(store) and status_json(mountpoint)["max_store"] == 2 * MiB
    finally:
        run([COWFS, "umount", str(mountpoint)], check=False)
        force_unmount(mountpoint)


# -- cowfs list ------------------------------------------------------------------------------


def _ours(listing: dict[str, list[dict[str, object]]], mounts: list[CommandLineMount]) -> list[dict[str, object]]:
    """Our rows only: other mounts on this machine are listed too (root sees all)."""
    paths = [str(m.path) for m in mounts]
    return sorted(
        (row for row in listing["mounts"] if row["mountpoint"] in paths),
        key=lambda row: paths.index(str(row["mountpoint"])),
    )


def test_a_dead_mount_given_as_a_directory_is_one_clear_line(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    dead = mount_factory(base_dir)
    assert dead.pid is not None
    os.kill(dead.pid, signal.SIGKILL)
    assert dead.wait_for_daemon_exit(timeout=10)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for argv, role in (([str(dead.path), str(elsewhere)], "BASE_DIR"), ([str(base_dir), str(dead.path)], "MOUNTPOINT")):
        result = run([COWFS, "mount", *argv], check=False)
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == f"cowfs: {role} {dead.path} is a dead mount: run cowfs umount {dead.path}\n"
    assert not is_mounted(elsewhere)


def test_list_shows_live_and_dead_mounts(base_dir: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    (base_dir / "disk.raw").write_bytes(bytes(4 * MiB))
    store = tmp_path / "store"
    store.mkdir()
    first = mount_factory(base_dir, "--max-store", "1G")
    second = mount_factory(base_dir, "-o", f"store={store}")
    dead = mount_factory(base_dir)
    with open(second.path / "disk.raw", "r+b") as image:
        image.write(bytes(MiB))
    assert dead.pid is not None
    os.kill(dead.pid, signal.SIGKILL)
    assert dead.wait_for_daemon_exit(timeout=10)

    listing = json.loads(run([COWFS, "list", "--json"]).stdout)
    assert _ours(listing, [first, second, dead]) == [
        {
            "mountpoint": str(first.path),
            "state": "live",
            "pid": first.pid,
            "base_dir": str(base_dir),
            "store_dir": status_json(first.path)["store_dir"],
            "store_bytes": 0,
            "max_store": 1 << 30,
        },
        {
            "mountpoint": str(second.path),
            "state": "live",
            "pid": second.pid,
            "base_dir": str(base_dir),
            "store_dir": str(store),
            "store_bytes": MiB,
            "max_store": None,
        },
        {
            "mountpoint": str(dead.path),
            "state": "dead",
            "pid": None,
            "base_dir": None,
            "store_dir": None,
            "store_bytes": None,
            "max_store": None,
            "clear": f"cowfs umount {dead.path}",
        },
    ]
    assert _ours(json.loads(run([COWFS, "status", "--json"]).stdout), [first, second, dead]) == _ours(
        listing, [first, second, dead]
    )

    text = run([COWFS, "list"]).stdout.splitlines()
    assert text[0].split() == ["MOUNTPOINT", "STATE", "PID", "WRITTEN", "LIMIT", "BASE", "STORE"]
    row = {line.split()[0]: line.split() for line in text[1:]}
    assert row[str(first.path)] == [
        str(first.path),
        "live",
        str(first.pid),
        "0",
        "B",
        "1.0",
        "GiB",
        str(base_dir),
        str(status_json(first.path)["store_dir"]),
    ]
    assert row[str(second.path)][3:6] == ["1.0", "MiB", "none"]
    assert row[str(dead.path)][1:] == ["dead", "-", "-", "-", "-", "-"]
    assert f"{dead.path}: its daemon is gone; clear it with cowfs umount {dead.path}" in text
    # (Split: the columns are as wide as the widest row, and other mounts of the machine may come
    # and go between the two commands.)
    assert run([COWFS, "status"]).stdout.splitlines()[0].split() == text[0].split()

    run([COWFS, "umount", str(dead.path)])  # what the list says clears it
    assert str(dead.path) not in run([COWFS, "list"]).stdout


def test_list_shows_only_the_callers_mounts(visible_tmp: Path, mounted: CommandLineMount) -> None:  # noqa: F811
    """Root's mount is not listed for nobody (who has none). Nobody runs a copy of the
    package it can read: the checkout may be in a directory only root may enter."""
    assert any(
        row["mountpoint"] == str(mounted.path) for row in json.loads(run([COWFS, "list", "--json"]).stdout)["mounts"]
    )
    shutil.copytree(
        Path(cowfs.__file__).parent, visible_tmp / "pkg" / "cowfs", ignore=shutil.ignore_patterns("__pycache__")
    )
    as_nobody = as_user(NOBODY, NOBODY, ["/usr/bin/python3", "-m", "cowfs", "list"])
    env = {**os.environ, "PYTHONPATH": str(visible_tmp / "pkg")}
    assert json.loads(run([*as_nobody, "--json"], cwd=visible_tmp, env=env).stdout) == {"mounts": []}
    assert run(as_nobody, cwd=visible_tmp, env=env).stdout == "no cowfs mounts\n"
