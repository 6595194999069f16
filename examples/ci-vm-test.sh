#!/usr/bin/env bash
# Throw-away CI test of a VM image: boot it headless from a cowfs mount, let
# it run its tests, and pass if its serial console shows the success line.
# Nothing the VM writes survives, so every CI run starts from the same image.
#
#   usage: ci-vm-test.sh IMAGE_DIR IMAGE EXPECT [QEMU ARGS...]
#   e.g.:  ci-vm-test.sh /srv/images app.qcow2 'ALL TESTS PASSED'
#
# EXPECT is an extended regular expression (grep -E) looked for in the
# console.  The VM must power off when done (or it is killed after TIMEOUT
# seconds, default 600, and the test fails).  Exit status: 0 pass, 1 the
# line was not there, 124 timeout.  Environment: COWFS (the cowfs command;
# default: cowfs on PATH), QEMU (default: qemu-system-x86_64), MEMORY (MiB,
# default 1024), ACCEL (default kvm:tcg), CACHE (default writeback),
# CONSOLE_LOG (keep the console here; default: a temporary file).
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: $0 IMAGE_DIR IMAGE EXPECT [QEMU ARGS...]" >&2
    exit 2
fi
image_dir=$1
image=$2
expect=$3
shift 3
cowfs=${COWFS:-cowfs}
qemu=${QEMU:-qemu-system-x86_64}

work=$(mktemp -d "${TMPDIR:-/tmp}/ci-vm-test.XXXXXX")
mkdir "$work/mnt"
console=${CONSOLE_LOG:-$work/console.log}
cleanup() {
    if mountpoint -q "$work/mnt"; then
        "$cowfs" umount "$work/mnt" || "$cowfs" umount -l "$work/mnt" || true
    fi
    rm -f "$work/console.log"
    rmdir "$work/mnt" "$work" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$cowfs" mount "$image_dir" "$work/mnt"
disk=$work/mnt/$image
format=$(qemu-img info "$disk" | awk '/^file format:/ {print $3}')
accel=()
IFS=: read -r -a accel_list <<< "${ACCEL:-kvm:tcg}"
for a in "${accel_list[@]}"; do accel+=(-accel "$a"); done

status=0
timeout --kill-after=10 "${TIMEOUT:-600}" \
    "$qemu" "${accel[@]}" -m "${MEMORY:-1024}" -nodefaults -nographic -no-reboot \
    -monitor none -serial "file:$console" \
    -drive "file=${disk//,/,,},format=$format,if=virtio,cache=${CACHE:-writeback}" "$@" </dev/null || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "ci-vm-test: FAIL: the VM did not power off within ${TIMEOUT:-600}s" >&2
    tail -n 20 "$console" >&2 || true
    exit 124
fi
if grep -Eq -- "$expect" "$console"; then
    echo "ci-vm-test: PASS ($image)"
    exit 0
fi
echo "ci-vm-test: FAIL: no line matching '$expect' (QEMU exit status $status); console tail:" >&2
tail -n 20 "$console" >&2 || true
exit 1
