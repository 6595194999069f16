"""QEMU helper processes: one ``qemu-nbd`` per open guest disk, read-only, and our connection to it.

How a helper is started (`open_guest_disk`):

* a listening unix socket is made in a fresh 0700 directory, our client
  connects to it at once (the backlog takes the connection before the server
  runs), and the socket's name is unlinked: no one else can ever connect;
* ``qemu-nbd`` gets that listening socket as fd 3 by systemd socket activation
  (``LISTEN_FDS=1``, ``LISTEN_PID``; started through ``sh`` only to learn its
  own pid), the chain's descriptors as fds 4, 5, ... and the ``json:`` options
  of `cowfs.images.qemu_options`: the driver of every file is given, nothing is
  probed, every file is one we opened, ``--read-only``;
* it is spawned with ``posix_spawn`` (safe beside other threads, unlike a
  fork with a pre-exec hook), in its own process group (a terminal's Ctrl-C
  is the daemon's to handle), through ``setpriv --pdeathsig KILL`` so that it
  dies with the daemon even on SIGKILL; and since it serves one client and is
  not ``--persistent``, it also exits when our connection closes -- which
  covers the moment before ``setpriv`` arms the signal.

Startup waits for the NBD handshake, which qemu-nbd answers only once it has
opened the image: a damaged or hostile image fails there, and the helper's
first line of stderr becomes the error.  Nothing here blocks the daemon's trio
thread: the handshake, reads and the wait for the helper's exit are awaits.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass, field

import trio

from .images import Chain, extent_links, qemu_options
from .nbd import Extent, TrioNbdClient

log = logging.getLogger(__name__)

QEMU_NBD = "qemu-nbd"
SETPRIV = "setpriv"
START_TIMEOUT = 30.0  # opening an image may read its tables; a hostile one is cut off here
EXIT_TIMEOUT = 5.0  # after our hang-up, before SIGKILL
FIRST_FD = 4  # fd 3 is the listening socket (LISTEN_FDS_START)
_ACTIVATE = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise OSError(errno.ENOENT, f"{name} is missing (install qemu-utils and util-linux)")
    return path


@dataclass
class GuestDisk:
    """A guest disk served by one qemu-nbd helper."""

    name: str  # for log lines
    client: TrioNbdClient
    pid: int
    pidfd: int
    stderr_fd: int
    closed: bool = field(default=False)

    @property
    def size(self) -> int:
        return self.client.size

    async def read_into(self, offset: int, buffer: memoryview) -> None:
        await self.client.read_into(offset, buffer)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.client.block_status(offset, length)

    def close(self) -> None:
        """Hang up; a system task reaps the helper (SIGKILL if it lingers).  Never blocks."""
        if self.closed:
            return
        self.closed = True
        self.client.close()
        trio.lowlevel.spawn_system_task(_reap, self.pid, self.pidfd, self.stderr_fd, self.name)

    async def aclose(self) -> None:
        """Hang up and wait until the helper has exited (SIGKILL if it lingers)."""
        if not self.closed:
            self.closed = True
            self.client.close()
            await _reap(self.pid, self.pidfd, self.stderr_fd, self.name)

    def kill_now(self) -> None:
        """For shutdown without a trio loop: SIGKILL and reap at once."""
        if not self.closed:
            self.closed = True
            self.client.close()
        _kill_and_reap(self.pid, self.pidfd, self.stderr_fd)


async def _reap(pid: int, pidfd: int, stderr_fd: int, name: str) -> None:
    with trio.move_on_after(EXIT_TIMEOUT) as waited:
        await trio.lowlevel.wait_readable(pidfd)
    if waited.cancelled_caught:
        log.warning("qemu-nbd for %s did not exit after the hang-up: killed", name)
    _kill_and_reap(pid, pidfd, stderr_fd)


async def _kill(pid: int, pidfd: int) -> None:
    """SIGKILL a helper and reap it, without blocking."""
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    await trio.lowlevel.wait_readable(pidfd)  # readable once it has exited
    _collect(pid)


def _collect(pid: int) -> None:
    """Reap a helper that has exited (its pidfd was readable): returns at once."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _kill_and_reap(pid: int, pidfd: int, stderr_fd: int) -> None:
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    for fd in (pidfd, stderr_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


def _first_line(stderr_fd: int) -> str:
    """What the helper said (it has exited or is killed: the pipe holds all of it)."""
    try:
        text = os.read(stderr_fd, 65536).decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    # "qemu-nbd: Failed to blk_new_open 'json:{...}': Image is too big": the options are ours.
    return lines[0].rsplit("}': ", 1)[-1].removeprefix("qemu-nbd: ")


def _spawn(argv: list[str], fds: list[int], listen_fd: int, stderr_fd: int) -> int:
    """Start argv with ``listen_fd`` as fd 3, ``fds`` as 4, 5, ... and stderr into the pipe."""
    # Move every descriptor above all of them first, so that no dup2 overwrites one not yet moved.
    sources = [listen_fd, *fds, stderr_fd]
    spare = max([*sources, FIRST_FD + len(fds)]) + 1
    actions: list[tuple[int | str, ...]] = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
    actions += [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
    actions += [(os.POSIX_SPAWN_DUP2, fd, spare + index) for index, fd in enumerate(sources)]
    targets = [3, *range(FIRST_FD, FIRST_FD + len(fds)), 2]
    actions += [(os.POSIX_SPAWN_DUP2, spare + index, target) for index, target in enumerate(targets)]
    actions += [(os.POSIX_SPAWN_CLOSE, spare + index) for index in range(len(sources))]
    env = {key: value for key, value in os.environ.items() if not key.startswith("LISTEN_")}
    return os.posix_spawn("/bin/sh", ["sh", "-c", _ACTIVATE, "sh", *argv], env, file_actions=actions, setpgroup=0)


async def open_guest_disk(chain: Chain, name: str) -> GuestDisk:
    """Start a helper for ``chain`` and connect to it; OSError (EIO, with the helper's own
    message) if QEMU cannot open the image.  The chain's descriptors stay the caller's."""
    fds = chain.fds()
    fd_path = {fd: f"/proc/self/fd/{FIRST_FD + index}" for index, fd in enumerate(fds)}
    private = tempfile.mkdtemp(prefix="cowfs-qemu-")  # 0700
    pid = -1
    pidfd = stderr_read = -1
    try:
        extent_dir = None
        links = list(extent_links(chain, fd_path))
        if links:
            extent_dir = os.path.join(private, "extents")
            for relative, target in links:
                path = os.path.join(extent_dir, relative)
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                os.symlink(target, path)
        argv = [_tool(SETPRIV), "--pdeathsig", "KILL", "--", _tool(QEMU_NBD), "--read-only", "--shared=1"]
        argv.append(qemu_options(chain, fd_path, extent_dir))
        socket_path = os.path.join(private, "nbd.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        stderr_read, stderr_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            listener.bind(socket_path)
            listener.listen(1)
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await sock.connect(socket_path)  # taken by the backlog: returns at once
                os.unlink(socket_path)  # from now on no one else can connect
                pid = _spawn(argv, fds, listener.fileno(), stderr_write)
            except BaseException:
                sock.close()
                raise
        finally:
            listener.close()
            os.close(stderr_write)
        pidfd = os.pidfd_open(pid)
        try:
            with trio.fail_after(START_TIMEOUT):
                client = await TrioNbdClient.connect(sock)
        except (OSError, trio.TooSlowError) as error:
            await _kill(pid, pidfd)
            pid = -1
            said = _first_line(stderr_read)
            reason = said or (
                "it did not open the image in time" if isinstance(error, trio.TooSlowError) else str(error)
            )
            raise OSError(errno.EIO, f"QEMU cannot read it: {reason}") from None
        return GuestDisk(name, client, pid, pidfd, stderr_read)
    except BaseException:
        if pid > 0:  # cancelled, or failed before the handshake: leave no helper behind
            if pidfd < 0:
                pidfd = os.pidfd_open(pid)
            with trio.CancelScope(shield=True):
                await _kill(pid, pidfd)
        for fd in (pidfd, stderr_read):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)  # the helper has opened every file it needs
