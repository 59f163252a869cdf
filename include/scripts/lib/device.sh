# shellcheck shell=bash
# Volume id -> block device, partition node names, and the "is this disk safe to wipe" checks.
# This file is the one place of the volume-id -> device mapping (docs/architecture.md).

# Test knobs (include/scripts/README.md, "Test seams"): AMIBAKE_SYS_BLOCK points the NVMe-serial
# lookup at a directory shaped like /sys/block (there is no NVMe disk off EC2); AMIBAKE_DEVICE_WAIT
# shortens the wait for an attachment (EBS and the offline emulator attach asynchronously).
SYS_BLOCK=${AMIBAKE_SYS_BLOCK:-/sys/block}
DEVICE_WAIT=${AMIBAKE_DEVICE_WAIT:-120}

# The Nitro by-id link of a volume id (contract.env's rule: prefix + volume id without its dash).
byid_link() {
    echo "$NVME_BYID_DIR/$NVME_BYID_PREFIX${1/-/}"
}

# Xen block device names for a requested /dev/sdX: xvdX, then -- only on a box whose kernel shifted its
# own root disk from xvda to xvde (older EL kernels; AWS "Device names on Linux instances": "the
# trailing letter of each device name is incremented the same number of times") -- the letter + 4.
xen_candidates() {
    local req=$1 letter
    letter=${req: -1}
    echo "/dev/xvd$letter"
    if [[ ! -b /dev/xvda && -b /dev/xvde && $letter < w ]]; then
        printf '/dev/xvd%b\n' "\\x$(printf '%x' $(($(printf '%d' "'$letter") + 4)))"
    fi
}

# One lookup round: print the device of the volume and return 0, or return 1 when not (yet) there.
find_device_once() {
    local volid=$1 devname=$2 nodash=${1/-/} link serial_file serial name cand
    link=$(byid_link "$volid")
    if [[ -L $link || -e $link ]]; then
        cand=$(readlink -f "$link")
        if [[ -b $cand ]]; then
            echo "$cand"
            return 0
        fi
    fi
    for serial_file in "$SYS_BLOCK"/nvme*/device/serial; do
        [[ -r $serial_file ]] || continue
        read -r serial <"$serial_file" || true
        if [[ $serial == "$nodash" ]]; then
            name=${serial_file%/device/serial}
            name=${name##*/}
            if [[ -b /dev/$name ]]; then
                echo "/dev/$name"
                return 0
            fi
        fi
    done
    if [[ -n $devname ]]; then
        while read -r cand; do
            if [[ -b $cand ]]; then
                echo "$cand"
                return 0
            fi
        done < <(xen_candidates "$devname")
    fi
    return 1
}

# resolve_device VOLUME_ID [DEVICE_NAME]: the block device of the attached volume, waiting up to
# DEVICE_WAIT seconds for it to appear. Order: Nitro by-id link, NVMe serial, Xen name.
resolve_device() {
    local volid=$1 devname=${2:-} waited=0 dev
    while :; do
        if dev=$(find_device_once "$volid" "$devname"); then
            echo "$dev"
            return 0
        fi
        if ((waited >= DEVICE_WAIT)); then
            die "volume $volid is not attached here: no $(byid_link "$volid"), no NVMe serial ${volid/-/}${devname:+, no Xen name for $devname} after ${DEVICE_WAIT}s"
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

# Partition node N of DEV: nvme1n1 -> nvme1n1p2, loop3 -> loop3p2, xvdf -> xvdf2.
partition_node() {
    local dev=$1 n=$2
    if [[ $dev =~ [0-9]$ ]]; then
        echo "${dev}p$n"
    else
        echo "$dev$n"
    fi
}

# "major:minor" (decimal) of a block device node.
dev_majmin() {
    local hex major minor
    hex=$(stat -L -c '%t %T' "$1") || die "cannot stat $1"
    read -r major minor <<<"$hex"
    echo "$((16#$major)):$((16#$minor))"
}

# sysfs directory of a block device (works for nodes under any name, e.g. a mknod'ed xvd name).
dev_sysfs() {
    local id
    id=$(dev_majmin "$1") || exit 1
    readlink -f "/sys/dev/block/$id"
}

# "major:minor" of the device and of each of its partitions.
dev_all_majmin() {
    local sys part
    sys=$(dev_sysfs "$1") || exit 1
    cat "$sys/dev"
    for part in "$sys"/*/partition; do
        [[ -e $part ]] || continue
        cat "${part%/partition}/dev"
    done
}

# Mount points of the device or any of its partitions (by major:minor, whatever node name was used).
device_mountpoints() {
    local ids
    ids=$(dev_all_majmin "$1" | paste -sd' ') || exit 1
    awk -v ids=" $ids " 'index(ids, " " $3 " ") { print $5 }' /proc/self/mountinfo
}

# Refuse a canvas that is in use, is the root disk, is a partition, or is not SIZE_GIB GiB.
check_canvas_free() {
    local dev=$1 size_gib=$2 sys root_id mps holders h bytes want
    sys=$(dev_sysfs "$dev")
    [[ -d $sys ]] || die "$dev: no sysfs entry for a block device"
    if [[ -e $sys/partition ]]; then
        die "$dev is a partition, not a whole disk"
    fi
    root_id=$(awk '$5 == "/" { print $3 }' /proc/self/mountinfo | tail -n1)
    if dev_all_majmin "$dev" | grep -x "$root_id" >/dev/null; then
        die "$dev holds the root filesystem of this box; refusing to touch it"
    fi
    mps=$(device_mountpoints "$dev" | paste -sd' ')
    if [[ -n $mps ]]; then
        die "$dev is mounted (at $mps); refusing to wipe it"
    fi
    holders=""
    for h in "$sys"/holders/* "$sys"/*/holders/*; do
        [[ -e $h ]] && holders+=" ${h##*/}"
    done
    if [[ -n $holders ]]; then
        die "$dev is in use by$holders; refusing to wipe it"
    fi
    bytes=$(blockdev --getsize64 "$dev")
    want=$((size_gib * 1024 * 1024 * 1024))
    if ((bytes != want)); then
        die "$dev is $bytes bytes, expected --size-gib $size_gib ($want bytes); refusing to wipe it"
    fi
}

# Wait (bounded) for a block node to exist, re-reading the partition table once if it lags.
wait_for_block() {
    local node=$1 dev=$2 i
    for i in $(seq 1 30); do
        [[ -b $node ]] && return 0
        if ((i == 10)); then
            partx -u "$dev" 2>/dev/null || partx -a "$dev" 2>/dev/null || true
        fi
        sleep 0.5
    done
    die "partition node $node did not appear after partitioning $dev"
}
