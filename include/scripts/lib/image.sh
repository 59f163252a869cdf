# shellcheck shell=bash
# Steps every recipe shares inside the image: fstab by UUID, grub.cfg generated with root=UUID,
# cloud-init's datasource config, and the common clean-up before the snapshot.

# The root filesystem's UUID (what fstab and the kernel command line name).
root_uuid() {
    local u
    u=$(fs_uuid "$(root_partition)")
    [[ -n $u ]] || die "$(root_partition) has no filesystem UUID"
    echo "$u"
}

# Refuse to install into a root that already holds files (a half-done earlier try): rerun mkfs.
require_empty_root() {
    if [[ -n $(ls -A "$ROOT") ]]; then
        die "bootstrap: $ROOT is not empty (left by an earlier try?); rerun from the mkfs phase"
    fi
}

write_fstab() {
    local uuid
    uuid=$(root_uuid)
    mkdir -p "$ROOT/etc"
    printf '# /etc/fstab written by amibake: filesystems by UUID\nUUID=%s / xfs defaults,noatime 0 0\n' \
        "$uuid" >"$ROOT/etc/fstab"
}

# Lock root's password (no password login as root; cloud-init gives the default user a key).
# The shadow file is edited directly: the same result as `passwd -l`, with no tool of the image run.
lock_root_password() {
    local shadow=$ROOT/etc/shadow
    [[ -f $shadow ]] || die "configure: no /etc/shadow in the image (did bootstrap install one?)"
    sed -i -E 's/^root:[^:]*:/root:!!:/' "$shadow"
    echo "root password locked"
}

# Run the image's grub-mkconfig inside the chroot so that it writes root=UUID=<root fs>.
# Without /dev/disk/by-uuid (no udev: loop devices, this rehearsal) grub-mkconfig falls back to
# root=/dev/loopXpY; a build-time override of GRUB_DEVICE (removed again at once) prevents that,
# and the result is checked here as well as by the verify phase.
grub_mkconfig_by_uuid() {
    local tool=$1 cfg=$2 defaults=$ROOT/etc/default/grub uuid bad
    uuid=$(root_uuid)
    [[ -s $defaults ]] || die "bootloader: no /etc/default/grub in the image"
    cp -p "$defaults" "$defaults.amibake-orig"
    printf '\n# amibake build-time override, removed after grub-mkconfig\nGRUB_DEVICE="UUID=%s"\nGRUB_DISABLE_LINUX_UUID=true\n' \
        "$uuid" >>"$defaults"
    if ! in_chroot "$tool" -o "$cfg"; then
        mv -f "$defaults.amibake-orig" "$defaults"
        die "bootloader: $tool failed"
    fi
    mv -f "$defaults.amibake-orig" "$defaults"
    bad=$(grep -o 'root=[^ ]*' "$ROOT$cfg" | grep -v "^root=UUID=$uuid\$" | sort -u | paste -sd' ' || true)
    [[ -z $bad ]] || die "bootloader: $cfg still has $bad instead of root=UUID=$uuid"
    grep -q "root=UUID=$uuid" "$ROOT$cfg" || die "bootloader: $cfg has no root=UUID=$uuid"
    echo "$cfg boots root=UUID=$uuid"
}

# cloud-init looks for EC2 only, and only where the platform says it is EC2 (a DMI or hypervisor uuid
# "ec2...", as on every Xen and Nitro instance; the boot check's qemu shows the same): elsewhere it
# gives up at once instead of polling a metadata service that is not there for 120 s. Arguments
# are extra cloud-config lines of the recipe.
write_cloud_init_config() {
    mkdir -p "$ROOT/etc/cloud/cloud.cfg.d"
    {
        echo "# written by amibake"
        printf '%s\n' "datasource_list: [ Ec2 ]" "datasource:" "  Ec2:" "    strict_id: true" "$@"
    } >"$ROOT/etc/cloud/cloud.cfg.d/90-amibake.cfg"
}

# Clean-up every image needs before its snapshot: identity, keys, logs, temporary files.
clean_common() {
    [[ -e $ROOT/etc/machine-id ]] && : >"$ROOT/etc/machine-id"
    rm -f "$ROOT/var/lib/dbus/machine-id" "$ROOT"/etc/ssh/ssh_host_*_key "$ROOT"/etc/ssh/ssh_host_*_key.pub
    rm -f "$ROOT/etc/resolv.conf" "$ROOT/etc/udev/rules.d/70-persistent-net.rules" "$ROOT/root/.bash_history"
    if [[ -d $ROOT/var/log ]]; then
        find "$ROOT/var/log" -xdev -type f -exec truncate -s 0 {} +
    fi
    find "$ROOT/tmp" "$ROOT/var/tmp" -xdev -mindepth 1 -delete 2>/dev/null || true
    clean_credentials
    echo "cleaned machine-id, ssh host keys, resolv.conf, logs, temporary files"
}
