#!/usr/bin/env bash
# Boot a disposable VM from an image directory: the VM may write all it likes,
# every write is thrown away when it exits, and the image itself never changes.
#
#   usage: disposable-vm.sh IMAGE_DIR IMAGE [QEMU ARGS...]
#   e.g.:  disposable-vm.sh /srv/images debian-12.qcow2 -nographic
#
# Environment: COWFS (the cowfs command; default: cowfs on PATH),
# QEMU (default: qemu-system-x86_64), MEMORY (MiB, default 1024),
# ACCEL (default kvm:tcg, tried in order), CACHE (-drive cache mode:
# writeback (default), none, writethrough, directsync or unsafe all work).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 IMAGE_DIR IMAGE [QEMU ARGS...]" >&2
    exit 2
fi
image_dir=$1
image=$2
shift 2
cowfs=${COWFS:-cowfs}
qemu=${QEMU:-qemu-system-x86_64}

mountpoint=$(mktemp -d "${TMPDIR:-/tmp}/disposable-vm.XXXXXX")
cleanup() {
    # -l: even if something still holds a file open, the writes go away.
    "$cowfs" umount "$mountpoint" 2>/dev/null || "$cowfs" umount -l "$mountpoint" 2>/dev/null || true
    rmdir "$mountpoint" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$cowfs" mount "$image_dir" "$mountpoint"
disk=$mountpoint/$image
format=$(qemu-img info "$disk" | awk '/^file format:/ {print $3}')

accel=()
IFS=: read -r -a accel_list <<< "${ACCEL:-kvm:tcg}"
for a in "${accel_list[@]}"; do accel+=(-accel "$a"); done

# Not exec: the trap must still unmount when QEMU exits.
"$qemu" "${accel[@]}" -m "${MEMORY:-1024}" \
    -drive "file=${disk//,/,,},format=$format,if=virtio,cache=${CACHE:-writeback}" "$@"
