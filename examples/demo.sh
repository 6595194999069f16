#!/usr/bin/env bash
# cowfs in one minute, on example images this script makes itself:
# mount a directory of images, wreck them in the mount, unmount, and show
# that the base images were never touched.
set -euo pipefail

cd "$(dirname "$0")/.."  # the project root: the transcript shows paths relative to it
cowfs=${COWFS:-cowfs}
images=examples/images

if [ ! -f "$images/disk.raw" ] || [ ! -f "$images/disk.qcow2" ]; then
    echo "making example images in $images"
    mkdir -p "$images"
    seed=$(mktemp -d)
    echo "hello from the base image" > "$seed/hello.txt"
    truncate -s 64M "$images/disk.raw.tmp"
    mkfs.ext4 -q -F -L base -d "$seed" "$images/disk.raw.tmp"
    qemu-img convert -O qcow2 "$images/disk.raw.tmp" "$images/disk.qcow2"
    mv "$images/disk.raw.tmp" "$images/disk.raw"
    rm -rf "$seed"
fi

mnt=$(mktemp -d /tmp/cowfs-demo.XXXXXX)
cleanup() {
    if grep -qs " $mnt fuse" /proc/mounts; then "$cowfs" umount "$mnt"; fi
    rmdir "$mnt"
}
trap cleanup EXIT

run() { echo "\$ $*"; "$@"; echo; }

fingerprint=$(sha256sum "$images/disk.raw" "$images/disk.qcow2")
scratch=$mnt
run "$cowfs" mount "$images" "$scratch"
run ls -l "$scratch"
run debugfs -R 'cat /hello.txt' "$scratch/disk.raw"
run mkfs.ext4 -q -F -L scratch "$scratch/disk.raw"
run e2label "$scratch/disk.raw"
run qemu-img resize -q "$scratch/disk.qcow2" 1G
run qemu-img info --output=human "$scratch/disk.qcow2"
run "$cowfs" umount "$scratch"
run e2label "$images/disk.raw"
if [ "$fingerprint" = "$(sha256sum "$images/disk.raw" "$images/disk.qcow2")" ]; then
    echo "base images unchanged: every write went to the mount's deleted store and is gone"
else
    echo "BASE IMAGES CHANGED: this is a bug in cowfs" >&2
    exit 1
fi
