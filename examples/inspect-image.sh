#!/usr/bin/env bash
# Look into (and poke at) the filesystem inside a disk image without any risk:
# the image is mounted through cowfs, attached to a loop device and mounted;
# every change is thrown away at the end, and the image itself never changes.
#
#   usage: inspect-image.sh IMAGE_DIR IMAGE [COMMAND [ARGS...]]
#   e.g.:  inspect-image.sh /srv/images rootfs.raw cat etc/os-release
#          PARTITION=2 inspect-image.sh /srv/images disk.raw     # a shell in partition 2
#
# COMMAND runs inside the image's filesystem (its working directory; $FS names
# it too); without one you get a shell there.  Raw images only (convert a
# qcow2 with qemu-img, or use qemu-nbd).  Environment: COWFS (the cowfs
# command; default: cowfs on PATH), PARTITION (partition number, default:
# the whole image is one filesystem).  Needs root (losetup, mount).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 IMAGE_DIR IMAGE [COMMAND [ARGS...]]" >&2
    exit 2
fi
image_dir=$1
image=$2
shift 2
cowfs=${COWFS:-cowfs}

work=$(mktemp -d "${TMPDIR:-/tmp}/inspect-image.XXXXXX")
mkdir "$work/image" "$work/fs"
loop=
cleanup() {
    # Innermost first: filesystem, loop device, cowfs mount.
    if mountpoint -q "$work/fs"; then umount "$work/fs" || umount -l "$work/fs"; fi
    if [ -n "$loop" ]; then losetup --detach "$loop" || true; fi
    if mountpoint -q "$work/image"; then
        "$cowfs" umount "$work/image" || "$cowfs" umount -l "$work/image" || true
    fi
    rmdir "$work/fs" "$work/image" "$work" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$cowfs" mount "$image_dir" "$work/image"
disk=$work/image/$image
if [ -n "${PARTITION:-}" ]; then
    # partx reads the table itself, so this works without partition scanning.
    read -r start sectors < <(partx --show --noheadings --bytes --output START,SECTORS --nr "$PARTITION" "$disk")
    loop=$(losetup --find --show --offset $((start * 512)) --sizelimit $((sectors * 512)) "$disk")
else
    loop=$(losetup --find --show "$disk")
fi
mount "$loop" "$work/fs"

export FS=$work/fs
status=0
if [ $# -gt 0 ]; then
    (cd "$FS" && "$@") || status=$?
else
    echo "inside $image (changes are thrown away on exit)" >&2
    (cd "$FS" && "${SHELL:-/bin/sh}") || status=$?
fi
exit "$status"
