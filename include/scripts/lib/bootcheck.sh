# shellcheck shell=bash
# bootcheck: boot the canvas under qemu (TCG, copy-on-write snapshot, no network, serial console to a
# file) and pass only when the console shows the kernel got root=UUID=<our root fs>, the image's boot
# marker unit (lib/image.sh) reports multi-user.target reached with that UUID mounted as /, and a
# getty printed "login:".
# The canvas filesystem is frozen meanwhile so qemu reads a consistent disk.

# Console lines that mean the boot failed; checked before the success markers.
BOOT_FAIL_PATTERNS=(
    'Kernel panic'
    'emergency mode'
    'Dropping to a shell'
    'grub rescue>'
    'error: no such device'
    'No bootable device'
)

qemu_pidfile() { echo "$RUN_DIR/qemu.pid"; }
serial_file() { echo "$RUN_DIR/serial.log"; }

find_qemu() {
    if command -v qemu-system-x86_64; then
        return 0
    fi
    if [[ -x /usr/libexec/qemu-kvm ]]; then
        echo /usr/libexec/qemu-kvm
        return 0
    fi
    return 1
}

# Kill the boot-check qemu of this volume if it runs (every exit path calls this).
stop_qemu() {
    local pidfile pid _
    pidfile=$(qemu_pidfile)
    [[ -r $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if [[ $pid =~ ^[0-9]+$ ]] && grep -qa qemu "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# End of the boot check: stop qemu, thaw, and append the serial console to the phase log.
bootcheck_finish() {
    stop_qemu
    thaw_canvas
    if [[ -e $(serial_file) ]]; then
        echo "----- serial console -----"
        tr -d '\r' <"$(serial_file)"
        echo "----- end of serial console -----"
        rm -f "$(serial_file)"
    fi
}

phase_bootcheck() {
    local dev qemu serial root_uuid pat deadline args=()
    dev=$(canvas_device)
    qemu=$(find_qemu) || die "bootcheck: no qemu-system-x86_64 or /usr/libexec/qemu-kvm on this box"
    root_uuid=$(fs_uuid "$(root_partition)")
    [[ -n $root_uuid ]] || die "bootcheck: $(root_partition) has no filesystem"
    serial=$(serial_file)
    : >"$serial"
    trap bootcheck_finish EXIT
    if [[ -n $(device_mountpoints "$dev") ]]; then
        freeze_canvas $((BOOT_TIMEOUT + 120))
        echo "froze the canvas filesystems for a consistent disk"
    fi
    # reboot-timeout: when no disk is bootable SeaBIOS would retry forever; this way it reboots,
    # and -no-reboot turns that into qemu exiting.
    args=(-machine accel=tcg -m 1024 -smp 2 -display none -vga none -monitor none -parallel none
        -no-reboot -boot reboot-timeout=1000 -net none -serial "file:$serial"
        -drive "file=$dev,format=raw,if=virtio,snapshot=on")
    if "$qemu" -cpu help 2>/dev/null | grep -w max >/dev/null; then
        args+=(-cpu max)
    fi
    echo "+ $qemu ${args[*]}"
    "$qemu" "${args[@]}" </dev/null &
    echo $! >"$(qemu_pidfile)"
    deadline=$((SECONDS + BOOT_TIMEOUT))
    while :; do
        for pat in "${BOOT_FAIL_PATTERNS[@]}"; do
            if grep -aq -- "$pat" "$serial"; then
                die "bootcheck: boot failed: console shows '$pat' (serial console below)"
            fi
        done
        if grep -aq "Kernel command line:.*root=UUID=$root_uuid" "$serial" &&
            grep -aq "$BOOT_MARKER$root_uuid" "$serial" &&
            grep -aq 'login:' "$serial"; then
            echo "bootcheck: passed after $((SECONDS - deadline + BOOT_TIMEOUT)) s: kernel got root=UUID=$root_uuid, the booted system reports multi-user.target with that root, login prompt shown"
            return 0
        fi
        kill -0 "$(<"$(qemu_pidfile)")" 2>/dev/null || die "bootcheck: qemu exited before the system reached multi-user (no bootable disk, or a reboot or panic: serial console below)"
        ((SECONDS < deadline)) || die "bootcheck: no multi-user login prompt within ${BOOT_TIMEOUT}s (--boot-timeout)"
        sleep 1
    done
}
