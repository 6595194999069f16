"""One benchmark run: its settings, its results, the base image, and fresh views of it."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import BLOCK, Config, MiB, human
from .harness import BenchError, CommandMount, Process, df_free
from .results import Results, Target

log = logging.getLogger("cowfs-bench")

BASE_SEED = 0xC0F5


@dataclass
class View:
    """The file a workload runs on, and the mount that shows it (None for the native copy)."""

    file: Path
    mount: CommandMount | None = None
    daemons: list[Process] = field(default_factory=list)


class Bench:
    """The run in progress: phases record into `results` and report failed checks with error()."""

    def __init__(self, config: Config, results: Results) -> None:
        self.config = config
        self.results = results
        # a block a quarter into the image, away from its start and end
        self.probe_offset = (config.size // 4 // BLOCK) * BLOCK + 7 * BLOCK

    def error(self, message: str) -> None:
        log.error("%s", message)
        self.results.errors.append(message)

    @contextlib.contextmanager
    def view(self, target: Target) -> Iterator[View]:
        """A fresh view: the native copy, or a new cowfs mount of the base."""
        config = self.config
        if target == "native":
            try:
                yield View(config.native)
            finally:
                os.sync()
            return
        mount = CommandMount(config, config.base.parent, config.size).up()
        try:
            self.results.mount.mount_ms.append(round(mount.mount_seconds * 1e3, 3))
            mismatching = blocks_differ(mount.file, config.base, sample_offsets(config.size, self.probe_offset))
            self.results.checks.fresh_view_mismatching_blocks.append(mismatching)
            if mismatching:
                self.error(f"fresh cowfs view differs from the base in {mismatching} sampled blocks")
            yield View(mount.file, mount, mount.daemons)
        finally:
            mount.down()


# --------------------------------------------------------------------------- the base image


def sample_offsets(size: int, probe_offset: int, count: int = 16, seed: int = 7) -> list[int]:
    """Block offsets to compare: both ends, both neighbours of the probe, and `count` random ones."""
    rng = random.Random(seed)
    offsets = [0, size - BLOCK, probe_offset - BLOCK, probe_offset + BLOCK]
    return offsets + [rng.randrange(size // BLOCK) * BLOCK for _ in range(count)]


def blocks_differ(first: Path, second: Path, offsets: Sequence[int]) -> int:
    fd1, fd2 = os.open(first, os.O_RDONLY), os.open(second, os.O_RDONLY)
    try:
        return sum(os.pread(fd1, BLOCK, offset) != os.pread(fd2, BLOCK, offset) for offset in offsets)
    finally:
        os.close(fd1)
        os.close(fd2)


def make_images(config: Config) -> None:
    """The base image of incompressible data and its native copy (reused when they fit), both
    read once so that the page cache is warm."""
    for directory in (config.base.parent, config.native.parent, config.store, config.raw, config.run_dir):
        directory.mkdir(parents=True, exist_ok=True)
    for old in config.raw.iterdir():
        old.unlink()
    if config.base.exists() and config.base.stat().st_size == config.size:
        log.info("reusing base image %s (%s)", config.base, human(config.size))
    else:
        need = config.size * 3
        if df_free(config.work) < need:
            raise BenchError(
                f"{config.work}: need about {human(need)} free for the base, its "
                f"native copy and the store; {human(df_free(config.work))} free"
            )
        log.info("generating base image %s (%s of incompressible data)", config.base, human(config.size))
        config.native.unlink(missing_ok=True)
        partial = config.base.with_suffix(".tmp")
        rng = random.Random(BASE_SEED)
        with open(partial, "wb") as image:
            left = config.size
            while left:
                chunk = min(left, 8 * MiB)
                image.write(rng.randbytes(chunk))
                left -= chunk
            image.flush()
            os.fsync(image.fileno())
        partial.rename(config.base)
    base_stat = config.base.stat()
    native_stat = config.native.stat() if config.native.exists() else None
    if (
        native_stat is None
        or native_stat.st_size != base_stat.st_size
        or native_stat.st_mtime_ns < base_stat.st_mtime_ns
    ):
        log.info("copying the base to %s", config.native)
        shutil.copyfile(config.base, config.native)
        os.sync()
    log.info("warming the page cache (base + native copy)")
    for path in (config.base, config.native):
        with open(path, "rb", buffering=0) as image:
            buffer = bytearray(8 * MiB)
            while image.readinto(buffer):
                pass


def base_fingerprint(path: Path, size: int) -> tuple[int, int, str]:
    """(size, mtime_ns, sha256 of 68 sampled blocks): equal before and after when nothing wrote the base."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as image:
        for offset in sample_offsets(size, size // 2, count=64, seed=99):
            image.seek(offset)
            digest.update(image.read(BLOCK))
    return stat.st_size, stat.st_mtime_ns, digest.hexdigest()
