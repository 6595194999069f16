"""Lifecycle of one mount: start, readiness, signals, clean unmount.

`serve` runs in the daemon process: ``cowfs mount --foreground`` itself, or the
child that the background mode forks.  It reports readiness, or the one-line
reason it could not mount, through a callback, so that the parent ``cowfs
mount`` returns only once the mount is usable.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from . import counters, heap, readpath
from .base import BaseDir
from .config import MountConfig
from .control import ControlServer
from .copies import Copies
from .features import Pyfuse3Features, describe, install_compiled_reads, log_missing
from .fuse_ops import CowfsOperations
from .guest import GuestViews
from .kernel_cache import KernelCache
from .namespace import Namespace
from .passthrough import FileDataFactory, plan
from .protocol import CONTROL_XATTR, ControlInfo
from .store import Store

log = logging.getLogger(__name__)

TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each unmounts cleanly


def _raise_fd_limit() -> None:
    """Each changed file holds a base and a store descriptor: allow many."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fuse_options(config: MountConfig) -> set[str]:
    options = set(pyfuse3.default_options) | {"fsname=cowfs", "subtype=cowfs"}
    if config.allow_other:
        options.add("allow_other")
    if config.allow_root:
        options.add("allow_root")
    if config.noexec:
        options.add("noexec")
    return options


class _AbandonedReplyFilter(logging.Filter):
    """pyfuse3 logs an ERROR when a reply finds no request waiting for it (ENOENT):
    the kernel dropped the request, as it does for the last RELEASE after
    ``umount -l`` or for an interrupted call.  Nothing is lost; keep it at debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "fuse_reply_" in message and "No such file or directory" in message:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def _granted_init_flags(found: Pyfuse3Features) -> int | None:
    """The INIT flags the patched pyfuse3 added to its reply (None before INIT or on a stock build)."""
    if not found.init_flags:
        return None
    offered, granted = getattr(pyfuse3, "negotiated_init_flags")()  # noqa: B009 (absent from stock stubs)
    return int(granted) if offered else None


def serve(config: MountConfig, report: Callable[[str | None], None]) -> int:
    """Mount and serve until unmounted or signalled.  ``report(None)`` says
    "ready", ``report(message)`` says why mounting failed.  Returns the exit code."""
    try:
        return _serve(config, report)
    finally:
        if config.remove_mountpoint:  # unmounted by now
            _remove_directory(config.mountpoint)


def _serve(config: MountConfig, report: Callable[[str | None], None]) -> int:
    _raise_fd_limit()
    logging.getLogger("pyfuse3").addFilter(_AbandonedReplyFilter())
    try:
        base = BaseDir(config.base_dir)
        store = Store(config.store_dir, config.max_store)
    except OSError as error:
        report(f"cannot open {error.filename}: {error.strerror}")
        return 1
    found = Pyfuse3Features.of(pyfuse3)
    # Before mounting: the INIT reply fixes the mode for the whole mount.
    passthrough = plan(config, found)
    views = GuestViews(base) if config.view == "guest" else None
    file_data = FileDataFactory(store, passthrough)
    namespace: Namespace | Copies
    if config.copies:  # (no passthrough, no guest view: the CLI saw to it)
        namespace = Copies(base, config.store_dir, config.max_store)
    else:
        namespace = Namespace(base, store, views=views, new_file_data=file_data)
    compiled_reads_off: str | None = "not mounted yet"  # why READs go through Python (None: they do not)
    kernel_cache = KernelCache()
    control_server = ControlServer(
        namespace,
        kernel_cache,
        lambda: [*describe(found, _granted_init_flags(found), compiled_reads_off), passthrough.feature()],
        lambda: {name: int(c["count"]) for name, c in counters.snapshot().items()},
        lambda: operations.settle_forgets(),  # (an async call)
        lambda: operations.forgets_held(),
    )
    control = ControlInfo(
        os.getpid(), control_server.name, str(config.base_dir), str(config.store_dir), config.max_store, config.copies
    ).to_json()
    operations = CowfsOperations(namespace, lambda: {CONTROL_XATTR.encode(): control}, kernel_cache, passthrough)
    operations.mountpoint = str(config.mountpoint)
    operations.untouched_direct = config.copies
    if views is not None:
        operations.serve_guest_views(views)
    try:
        pyfuse3.init(operations, str(config.mountpoint), fuse_options(config))
    except RuntimeError:
        report(f"cannot mount on {config.mountpoint}: FUSE refused the mount (see the daemon log, or run with -f)")
        control_server.close()
        file_data.close()
        return 1
    compiled_reads_off = install_compiled_reads(pyfuse3, found)
    log_missing(found, compiled_reads_off)
    # FORGETs then reach Python gathered, not as tens of thousands of requests after a reset.
    gathered_forgets = readpath.gather_forgets() if compiled_reads_off is None else None
    log.info(
        "mounted %s on %s, store in %s%s",
        config.base_dir,
        config.mountpoint,
        config.store_dir,
        ", images as their guest disks" if views else "",
    )
    code = 0
    try:
        trio.run(_main, report, control_server, views, operations, gathered_forgets)
    except Exception:
        log.exception("the FUSE main loop failed")
        code = 1
    finally:
        pyfuse3.close(unmount=True)
        if views is not None:
            views.close()
        control_server.close()
        namespace.close()
        file_data.close()
        store.close()
        base.close()
    counters.log_summary()
    log.info("unmounted %s", config.mountpoint)
    return code


async def _main(
    report: Callable[[str | None], None],
    control_server: ControlServer,
    views: GuestViews | None,
    operations: CowfsOperations,
    gathered_forgets: int | None,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signals)
        if gathered_forgets is not None:
            nursery.start_soon(operations.apply_gathered_forgets, gathered_forgets)
        nursery.start_soon(heap.keep_collections_short)  # no second-long pauses with a big namespace
        nursery.start_soon(control_server.serve)
        if views is not None:
            nursery.start_soon(views.stop_idle_helpers)
        report(None)
        try:
            await pyfuse3.main()
        except* ConnectionAbortedError:
            # The kernel aborted the connection (fusectl's abort, or an unmount racing our reads
            # on some kernels): the mount is gone, as after an unmount.
            log.info("the kernel aborted the FUSE connection: the mount is gone")
        if views is not None:
            await views.aclose()
        nursery.cancel_scope.cancel()


def _remove_directory(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError as error:
        log.warning("could not remove the temporary mountpoint %s: %s", path, error.strerror)


async def _terminate_on_signals() -> None:
    with trio.open_signal_receiver(*TERMINATING_SIGNALS) as signals:
        # `cowfs run` starts the daemon with these blocked, so that one that comes early waits
        # for this receiver instead of ending the daemon with the mount still there.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINATING_SIGNALS)
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
