# shellcheck shell=bash
# Disk phases shared by every recipe: resolve, partition, mkfs, mount, umount.
# Layout: GPT, partition 1 = 1 MiB bios_grub (grub's core image for BIOS boot), partition 2 = xfs root.
# Re-run safety: each of these phases first unmounts what an earlier try left under $ROOT, so a retry
# never fails on leftovers; partition and mkfs wipe the canvas, so they start the build afresh.

BIOS_PART=1
ROOT_PART=2

# Resolve the canvas device once, in the current shell (every invocation re-derives it from the
# volume id). Bash clears errexit inside $(...), so it is resolved here, before any $(canvas_device).
resolve_canvas() {
    [[ -n ${CANVAS_DEV:-} ]] && return 0
    CANVAS_DEV=$(resolve_device "$VOLUME_ID" "$DEVICE_NAME") || exit 1
}

canvas_device() {
    resolve_canvas || exit 1
    echo "$CANVAS_DEV"
}

root_partition() {
    resolve_canvas || exit 1
    partition_node "$CANVAS_DEV" "$ROOT_PART"
}

bios_partition() {
    resolve_canvas || exit 1
    partition_node "$CANVAS_DEV" "$BIOS_PART"
}

# Filesystem UUID of a partition, read from the disk (no blkid cache).
fs_uuid() {
    blkid -p -o value -s UUID "$1" 2>/dev/null || true
}

# Undo what an earlier try or step left on this volume: a freeze (a frozen filesystem cannot be
# unmounted), processes in the chroot, and every mount under $ROOT.
release_root() {
    thaw_canvas
    unmount_below "$ROOT" with-root
}

phase_resolve() {
    local dev
    dev=$(canvas_device)
    echo "volume $VOLUME_ID is $dev"
    release_root
    check_canvas_free "$dev" "$SIZE_GIB"
    echo "$dev is free and $SIZE_GIB GiB"
}

phase_partition() {
    local dev
    dev=$(canvas_device)
    release_root
    check_canvas_free "$dev" "$SIZE_GIB"
    # Old signatures of an earlier try: partitions first, then the table itself.
    local part sys
    sys=$(dev_sysfs "$dev")
    for part in "$sys"/*/partition; do
        [[ -e $part ]] || continue
        part=${part%/partition}
        # sysfs can list it before its /dev node exists (the earlier try re-read the table)
        wait_for_block "/dev/${part##*/}" "$dev"
        wipefs -a "/dev/${part##*/}"
    done
    wipefs -a "$dev"
    parted -s "$dev" -- mklabel gpt \
        mkpart bios_grub 1MiB 2MiB set "$BIOS_PART" bios_grub on \
        mkpart root xfs 2MiB 100%
    partprobe "$dev" 2>/dev/null || partx -u "$dev" || partx -a "$dev"
    wait_for_block "$(bios_partition)" "$dev"
    wait_for_block "$(root_partition)" "$dev"
    parted -s "$dev" unit MiB print
}

# mkfs.xfs options the recipe wants, keeping only those this box's mkfs.xfs knows (an old mkfs has
# no option for a feature it cannot create, and its defaults already leave that feature off).
# Arguments: "section:name=value" words; output: mkfs.xfs arguments, one per line.
mkfs_xfs_options() {
    local usage want section kv name per_section=() sec opts
    usage=$(mkfs.xfs 2>&1 || true)
    for sec in m i n; do
        opts=""
        for want in "$@"; do
            section=${want%%:*}
            kv=${want#*:}
            name=${kv%%=*}
            [[ $section == "$sec" ]] || continue
            if grep -q "[ ,\[]$name=" <<<"$usage"; then
                opts+="${opts:+,}$kv"
            else
                echo "mkfs.xfs here has no -$section $name; its default applies" >&2
            fi
        done
        [[ -n $opts ]] && per_section+=("-$sec" "$opts")
    done
    printf '%s\n' ${per_section[@]+"${per_section[@]}"}
}

# xfs superblock feature words of a device: "ro_compat=0x... incompat=0x..." (hex, as xfs_db prints).
xfs_features() {
    xfs_db -r -c 'sb 0' -c 'p features_ro_compat features_incompat' "$1" |
        awk -F' = ' '/features_ro_compat/ { r = $2 } /features_incompat/ { i = $2 } END { printf "ro_compat=%s incompat=%s\n", r, i }'
}

# Fail unless the root filesystem's feature bits are exactly what the recipe's target kernel reads.
assert_xfs_features() {
    local part=$1 got
    [[ -n ${RECIPE_XFS_FEATURES:-} ]] || return 0
    got=$(xfs_features "$part")
    if [[ $got != "$RECIPE_XFS_FEATURES" ]]; then
        echo "xfs features of $part are '$got', the $RECIPE target kernel needs '$RECIPE_XFS_FEATURES'" >&2
        return 1
    fi
    echo "xfs features of $part: $got (as the $RECIPE target needs)"
}

phase_mkfs() {
    local part uuid opts=()
    release_root
    part=$(root_partition)
    [[ -b $part ]] || die "$part does not exist: run the partition phase first"
    if [[ -n $(device_mountpoints "$(canvas_device)") ]]; then
        die "$(canvas_device) is mounted elsewhere; refusing mkfs"
    fi
    uuid=$(cat /proc/sys/kernel/random/uuid)
    mapfile -t opts < <(mkfs_xfs_options "m:uuid=$uuid" ${RECIPE_MKFS_XFS[@]+"${RECIPE_MKFS_XFS[@]}"})
    echo "+ mkfs.xfs -f -L root ${opts[*]} $part"
    mkfs.xfs -f -L root "${opts[@]}" "$part"
    assert_xfs_features "$part"
}

# Mount the root filesystem at $ROOT (idempotent: already mounted from the canvas is fine).
phase_mount() {
    local part want have
    part=$(root_partition)
    [[ -b $part ]] || die "$part does not exist: run the partition and mkfs phases first"
    mkdir -p "$ROOT"
    if mountpoint -q "$ROOT"; then
        want=$(dev_majmin "$part")
        have=$(awk -v m="$ROOT" '$5 == m { print $3 }' /proc/self/mountinfo | tail -n1)
        [[ $have == "$want" ]] || die "$ROOT is already mounted from another device ($have)"
        echo "$part already mounted at $ROOT"
        return 0
    fi
    [[ -n $(fs_uuid "$part") ]] || die "$part has no filesystem: run the mkfs phase first"
    mount -t xfs "$part" "$ROOT"
    echo "mounted $part at $ROOT"
}

# Later phases run alone too: they mount the root filesystem when an earlier invocation did not.
# (An `if`, not `||`: bash ignores errexit inside a function called from an `||` list.)
ensure_root_mounted() {
    if ! mountpoint -q "$ROOT"; then
        phase_mount
    fi
}

phase_umount() {
    release_root
    echo "nothing mounted under $ROOT"
}
