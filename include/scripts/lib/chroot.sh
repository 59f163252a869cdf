# shellcheck shell=bash
# Entering and leaving the image's chroot. Each chroot phase binds /dev, /dev/pts, /proc and /sys on
# entry and removes them on exit, so between phases (and after `all`) only the root fs is mounted.

# Mount the pseudo filesystems the image's own tools need (grub-install, dracut, setfiles...).
chroot_enter() {
    local d
    for d in dev dev/pts proc sys; do
        mkdir -p "$ROOT/$d"
    done
    mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
    mountpoint -q "$ROOT/dev/pts" || mount --bind /dev/pts "$ROOT/dev/pts"
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    mountpoint -q "$ROOT/sys" || mount -t sysfs sysfs "$ROOT/sys"
    # Package scripts must not start daemons inside the chroot (Debian's invoke-rc.d honours this).
    if [[ -d $ROOT/usr/sbin ]]; then
        printf '#!/bin/sh\n# amibake: no daemons during the image build\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
        chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
    fi
    # Name resolution for package downloads inside the chroot; removed again by chroot_leave.
    if [[ -d $ROOT/etc && -r /etc/resolv.conf ]]; then
        rm -f "$ROOT/etc/resolv.conf"
        cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
        touch "$ROOT/etc/.amibake-resolv"
    fi
}

# Undo chroot_enter: stop anything still running inside, unmount the binds, remove build-only files.
chroot_leave() {
    unmount_below "$ROOT"
    rm -f "$ROOT/usr/sbin/policy-rc.d"
    if [[ -e $ROOT/etc/.amibake-resolv ]]; then
        rm -f "$ROOT/etc/resolv.conf" "$ROOT/etc/.amibake-resolv"
    fi
}

# Run a command inside the image (through the plan-aware runner).
in_chroot() {
    run chroot "$ROOT" "$@"
}
