"""`make bench-xfs`: the benchmark on XFS, where cowfs runs in passthrough mode.

    python -m bench.xfs [BENCH ARGUMENTS]        (as root)

Makes a sparse XFS image (reflink, mkfs.xfs's default), loop-mounts it, and runs the whole
benchmark (`python -m bench`) with its work directory there: the base image, the native copy it
is compared with, and the store (TMPDIR) all on that XFS, so native is a file on the same
filesystem and every cowfs mount of the run serves its file from a reflink clone.  It checks
first that a mount there really is in passthrough mode, and unmounts and removes the image at
the end, also after a failure or Ctrl-C.  The peers' harness runs the same way with its DATA_DIR
on such a filesystem (bench/README.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .__main__ import main as bench_main

log = logging.getLogger("cowfs-bench")

IMAGE_SIZE = 96 << 30  # sparse: room for the 4 GiB base, its copy, the stores and the 1 TiB scale image's writes
PLACE = Path("/var/tmp")


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def check_passthrough(root: Path) -> str:
    """Mount a tiny base there and return what `cowfs status` says of passthrough."""
    cowfs = str(Path(sys.executable).parent / "cowfs")
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=root))
    (probe / "base").mkdir()
    (probe / "store").mkdir()
    (probe / "mnt").mkdir()
    (probe / "base" / "probe.raw").write_bytes(bytes(4096))
    try:
        run([cowfs, "mount", "--store", str(probe / "store"), str(probe / "base"), str(probe / "mnt")])
        try:
            status = json.loads(run([cowfs, "status", "--json", str(probe / "mnt")]).stdout)
        finally:
            run([cowfs, "umount", str(probe / "mnt")])
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    feature = next((f for f in status["features"] if f["name"] == "passthrough"), None)
    if feature is None or not feature["enabled"]:
        raise SystemExit(f"bench-xfs: cowfs is not in passthrough mode on XFS here: {feature}")
    return str(feature["detail"])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if shutil.which("mkfs.xfs") is None:
        raise SystemExit("bench-xfs: mkfs.xfs is missing (apt-get install xfsprogs)")
    directory = Path(tempfile.mkdtemp(prefix="cowfs-bench-xfs-", dir=PLACE))
    image, root = directory / "xfs.img", directory / "xfs"
    root.mkdir()
    mounted = False
    try:
        with open(image, "wb") as sparse:
            sparse.truncate(IMAGE_SIZE)
        run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)])
        run(["mount", "-o", "loop", str(image), str(root)])
        mounted = True
        log.info("XFS on %s: cowfs says passthrough on (%s)", root, check_passthrough(root))
        return bench_main(["--work-dir", str(root / "bench"), *args])
    finally:
        if mounted and subprocess.run(["umount", str(root)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(root)], capture_output=True, check=False)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
