# shellcheck shell=bash
# bootcheck: boot the finished canvas the way EC2 boots it, log in over SSH and run instance-check.
#
# The guest sees what a Nitro instance sees (shared notes this-machine.md, last section):
# - the root disk on an NVMe controller whose serial is the volume id without its dash;
# - SMBIOS manufacturer "Amazon EC2" and a product uuid = serial starting "ec2", so cloud-init's
#   ds-identify / strict_id take the machine for AWS;
# - IMDSv2 at 169.254.169.254 (lib/imds.py, one process per guest connection through qemu's
#   guestfwd), serving a fresh instance id, local hostname/IPv4, user data and a THROWAWAY SSH key;
# - a disk 2 GiB larger than the canvas (a qcow2 overlay backed by the raw canvas, which is frozen
#   meanwhile and never written), so growpart has work to do.
# Then it logs in as the image's cloud-init default user with that key (hostfwd) and runs
# instance-check, whose PASS/FAIL lines go to the phase log and, as "check" progress events, to the
# task log; each boot stage is a "boot-stage" event with its seconds. On a boot that never reaches a
# login the console names the failed item (boot, kernel-cmdline, cloud-init, ssh-login).

BOOTCHECK_EXTRA_GIB=2
GUEST_IPV4=169.254.0.15          # the first address qemu's DHCP hands out in net=169.254.0.0/16
GUEST_INSTANCE_TYPE=t3.micro
# After cloud-init reported "finished", SSH gets this long before the login counts as refused.
SSH_GRACE_S=120

# Console patterns of a boot that failed, each with the item it fails and what it means.
BOOT_FAIL_PATTERNS=(
    'Kernel panic|boot|kernel panic'
    'Gave up waiting for root|boot|the root device never appeared (no driver for the NVMe disk in the initramfs?)'
    'does not exist.  Dropping to a shell|boot|the root device never appeared (no driver for the NVMe disk in the initramfs?)'
    'dracut-initqueue.*timeout|boot|the root device never appeared (no driver for the NVMe disk in the initramfs?)'
    'Dropping to a shell|boot|the initramfs dropped to a shell'
    'emergency mode|boot|systemd entered emergency mode'
    'grub rescue>|boot|GRUB could not find its files'
    'error: no such device|boot|GRUB could not find its root device'
    'No bootable device|boot|the firmware found no bootable disk'
)
# Console lines that end each boot stage, in order (stage|extended regex).
BOOT_STAGES=(
    'firmware|Linux version'
    'kernel|Welcome to '
    'cloud-init|Cloud-init v\. .* finished at'
)

bc_dir() { echo "$RUN_DIR/bootcheck"; }
qemu_pidfile() { echo "$RUN_DIR/qemu.pid"; }
serial_file() { echo "$(bc_dir)/serial.log"; }

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

# What makes this box's qemu unfit to boot the image the way a Nitro instance does, one line each
# (nothing when it is fit, or when there is no qemu at all: the tools list names that). The tools
# phase asks too, so a build with --boot-check fails before the canvas is touched; check_qemu again
# at the check. EL7's own /usr/libexec/qemu-kvm (1.5.3) has neither an nvme device nor q35: see
# include/scripts/README.md "Boot check" for what to use on AWS instead.
qemu_problems() {
    local qemu version
    qemu=$(find_qemu) || return 0
    version=$("$qemu" --version 2>/dev/null | head -n1)
    if [[ $("$qemu" -device help 2>&1 || true) != *'"nvme"'* ]]; then
        echo "a qemu with an NVMe device ($qemu is '$version': the boot check cannot boot the image on NVMe as Nitro does; see include/scripts/README.md, Boot check)"
    fi
    if [[ $("$qemu" -machine help 2>&1 || true) != *q35* ]]; then
        echo "a qemu with the q35 machine ($qemu is '$version': PCIe, needed for the NVMe disk)"
    fi
}

# Refuse an unfit qemu loudly: a boot check never passes quietly or disappears.
check_qemu() {
    local problems
    problems=$(qemu_problems | paste -sd';' -)
    [[ -z $problems ]] || die "bootcheck: this box lacks $problems"
}

# Stop the boot-check qemu and the metadata relays it started (every exit path calls this).
stop_qemu() {
    local pidfile pid _
    pidfile=$(qemu_pidfile)
    [[ -r $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if [[ $pid =~ ^[0-9]+$ ]] && grep -qa qemu "/proc/$pid/cmdline" 2>/dev/null; then
        kill_tree "$pid" TERM
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill_tree "$pid" KILL
    fi
    rm -f "$pidfile"
}

# End of the boot check: stop qemu, thaw, append the console and the metadata log to the phase
# log (their tail is what a failure shows in the task log) and remove the overlay and the keys.
bootcheck_finish() {
    local dir
    dir=$(bc_dir)
    stop_qemu
    thaw_canvas
    if [[ -s $dir/imds.log ]]; then
        echo "----- metadata requests -----"
        cat "$dir/imds.log"
    fi
    if [[ -s $dir/qemu.err ]]; then
        echo "----- qemu stderr -----"
        cat "$dir/qemu.err"
    fi
    if [[ -e $(serial_file) ]]; then
        echo "----- serial console -----"
        tr -d '\r' <"$(serial_file)" | sed 's/\x1b\[[0-9;]*[A-Za-z]//g'
        echo "----- end of serial console -----"
    fi
    rm -rf "$dir"
}

# A progress line from inside the phase: run_phase hands the phase the caller's stdout as fd 4.
bootcheck_event() {
    PROGRESS_FD=4 progress "$@"
}

# One check item: a line in the phase log and a "check" event in the task log.
check_item() {
    local item=$1 status=$2 detail=$3
    echo "amibake-check: $item: $status: $detail"
    bootcheck_event check "\"item\":$(json_str "$item"),\"status\":$(json_str "$status"),\"detail\":$(json_str "$detail")"
}

# Boot stage STAGE ended now: seconds since the previous stage and since qemu started.
STAGE_T0=""
STAGE_LAST=""
stage_done() {
    local stage=$1 t
    t=$(now)
    echo "boot stage $stage: $(elapsed "$STAGE_LAST" "$t") s (at $(elapsed "$STAGE_T0" "$t") s)"
    bootcheck_event boot-stage "\"stage\":\"$stage\",\"seconds\":$(elapsed "$STAGE_LAST" "$t"),\"at\":$(elapsed "$STAGE_T0" "$t")"
    STAGE_LAST=$t
}

random_hex() {
    od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'
}

# image_login_user, intended_cmdline, baked_host_keys: lib/verify.sh (the verify phase reports them
# as the "expectations" event, which the smoke instance after registration checks with too).

# The metadata of the instance the check plays, for lib/imds.py.
write_imds_state() {
    local dir=$1 key=$2 instance_id mac
    instance_id="i-$(random_hex 9 | cut -c1-17)"
    mac="02:$(random_hex 5 | sed 's/../&:/g; s/:$//')"
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/imds-secret"
    # Not empty (cloud-init warns about an empty cloud-config part), and harmless to every item.
    printf '#cloud-config\nwrite_files:\n  - path: /run/amibake-user-data\n    content: "user data of %s\\n"\n' \
        "$instance_id" >"$dir/user-data"
    cat >"$dir/imds.json" <<EOF
{
  "instance_id": "$instance_id", "instance_type": "$GUEST_INSTANCE_TYPE",
  "ami_id": "ami-00000000000000000", "reservation_id": "r-$(random_hex 9 | cut -c1-17)",
  "account_id": "000000000000", "region": "us-east-1", "availability_zone": "us-east-1a",
  "local_ipv4": "$GUEST_IPV4", "local_hostname": "ip-${GUEST_IPV4//./-}.ec2.internal",
  "mac": "$mac", "eni_id": "eni-$(random_hex 9 | cut -c1-17)", "subnet_id": "subnet-$(random_hex 9 | cut -c1-17)",
  "vpc_id": "vpc-$(random_hex 9 | cut -c1-17)", "subnet_cidr": "169.254.0.0/16",
  "security_group": "amibake-bootcheck", "security_group_id": "sg-$(random_hex 9 | cut -c1-17)",
  "pending_time": "$(date -u +%FT%TZ)", "key_name": "amibake-bootcheck",
  "public_key": $(json_str "$(<"$key.pub")"),
  "user_data": $(json_str "$(<"$dir/user-data")")
}
EOF
    echo "$mac"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ssh to the guest with the throwaway key. The guest is ours, on loopback, with host keys made at
# this boot: they are recorded in a private known_hosts (StrictHostKeyChecking=no: EL7's ssh 7.4
# has no accept-new) and checked by instance-check against the image's.
guest_ssh() {
    local dir
    dir=$(bc_dir)
    ssh -F /dev/null -i "$dir/id_ed25519" -p "$(<"$dir/ssh-port")" -o BatchMode=yes -o IdentitiesOnly=yes \
        -o PasswordAuthentication=no -o ConnectTimeout=10 -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile="$dir/known_hosts" -o LogLevel=ERROR "$(<"$dir/login-user")@127.0.0.1" "$@"
}

# The first console pattern of a failed boot, as "item|meaning|console line", or nothing.
console_failure() {
    local serial=$1 entry pat line
    for entry in "${BOOT_FAIL_PATTERNS[@]}"; do
        pat=${entry%%|*}
        line=$(grep -aE -m1 -- "$pat" "$serial" | tr -d '\r' || true)
        if [[ -n $line ]]; then
            echo "${entry#*|}|$line"
            return 0
        fi
    done
}

# Root argument the kernel got, from the console's "Kernel command line:", or nothing yet.
console_root_arg() {
    grep -a -m1 'Kernel command line:' "$1" | tr -d '\r' | tr ' ' '\n' | grep '^root=' | tail -n1 || true
}

# Fail the check: report ITEM as FAIL and stop (the EXIT trap appends the console).
boot_failed() {
    local item=$1 detail=$2
    check_item "$item" FAIL "$detail"
    die "bootcheck: $item: $detail (serial console below)"
}

# Start qemu on an overlay of the canvas through ec2-guest (the EC2-like platform's one home, which
# the rehearsal's local EC2 API uses too), with this check's throwaway metadata.
start_guest() {
    local qemu=$1 dev=$2 dir size
    dir=$(bc_dir)
    size=$(blockdev --getsize64 "$dev")
    qemu-img create -q -f qcow2 -o "backing_file=$dev,backing_fmt=raw" "$dir/disk.qcow2" \
        "$((size + BOOTCHECK_EXTRA_GIB * 1073741824))"
    write_imds_state "$dir" "$dir/id_ed25519" >/dev/null
    free_port >"$dir/ssh-port"
    echo "disk $((size / 1048576)) MiB + ${BOOTCHECK_EXTRA_GIB} GiB (qcow2 overlay of the frozen canvas)"
    # fd 4 (the caller's progress pipe) stays with the phase: qemu must not hold the SSH session open.
    bash "$SCRIPTS_DIR/ec2-guest" --qemu "$qemu" --disk "$dir/disk.qcow2" --volume-id "$VOLUME_ID" \
        --state-dir "$dir" --ssh "127.0.0.1:$(<"$dir/ssh-port")" --serial "$(serial_file)" \
        --pidfile "$(qemu_pidfile)" 4>&-
}

# Report the console stages reached since the last call (STAGES_SEEN counts them).
STAGES_SEEN=0
scan_stages() {
    local serial=$1 entry
    while ((STAGES_SEEN < ${#BOOT_STAGES[@]})); do
        entry=${BOOT_STAGES[$STAGES_SEEN]}
        grep -aqE -- "${entry#*|}" "$serial" || return 0
        stage_done "${entry%%|*}"
        STAGES_SEEN=$((STAGES_SEEN + 1))
    done
}

# Watch the console and try SSH until a login works and cloud-init reported "finished" (so the
# check looks at a settled system); report the stages as they come; fail with the item that names
# what went wrong.
wait_for_boot() {
    local root_want=$1 serial deadline entry stage pat failure root_have final_at="" ds login=0
    serial=$(serial_file)
    deadline=$((SECONDS + BOOT_TIMEOUT))
    while :; do
        scan_stages "$serial"
        if [[ -z $final_at ]] && ((STAGES_SEEN == ${#BOOT_STAGES[@]})); then
            final_at=$SECONDS
        fi
        ((login && STAGES_SEEN == ${#BOOT_STAGES[@]})) && return 0
        root_have=$(console_root_arg "$serial")
        if [[ -n $root_have && $root_have != "$root_want" ]]; then
            boot_failed kernel-cmdline "the kernel got $root_have, the image intends $root_want (console: Kernel command line)"
        fi
        failure=$(console_failure "$serial")
        if [[ -n $failure ]]; then
            IFS='|' read -r entry stage pat <<<"$failure"
            boot_failed "$entry" "$stage (console: $pat)"
        fi
        if ((!login && STAGES_SEEN > 0)) && guest_ssh true </dev/null >/dev/null 2>"$(bc_dir)/ssh.err"; then
            stage_done ssh
            login=1
            continue
        fi
        if ! kill -0 "$(<"$(qemu_pidfile)")" 2>/dev/null; then
            boot_failed boot "qemu exited before a login ($(tail -n1 "$(bc_dir)/qemu.err" 2>/dev/null || true); no bootable disk, a reboot or a panic: console below)"
        fi
        if ((!login)) && [[ -n $final_at ]]; then
            ds=$(grep -aoE -m1 'Datasource [A-Za-z0-9]+' "$serial" | awk '{ print $2 }' || true)
            if [[ $ds != DataSourceEc2* ]]; then
                boot_failed cloud-init "cloud-init finished with datasource '${ds:-unknown}', not Ec2: the metadata (SSH key, hostname, user data) was never read, so nobody can log in"
            fi
        fi
        if ((!login)) && [[ -n $final_at ]] && ((SECONDS - final_at > SSH_GRACE_S)); then
            boot_failed ssh-login "cloud-init finished (datasource $ds) but ssh as $(<"$(bc_dir)/login-user") with the metadata key fails: $(tail -n1 "$(bc_dir)/ssh.err")"
        fi
        if ((SECONDS >= deadline)); then
            # Logged in but no "finished" on the console: instance-check says what cloud-init is doing.
            ((login)) && return 0
            boot_failed boot "no SSH login within ${BOOT_TIMEOUT}s (--boot-timeout); console stages reached: $STAGES_SEEN of ${#BOOT_STAGES[@]} (${BOOT_STAGES[*]%%|*}); last ssh error: $(tail -n1 "$(bc_dir)/ssh.err" 2>/dev/null || true)"
        fi
        sleep 2
    done
}

# Run instance-check in the guest; every line is an item; fail when one failed.
run_instance_check() {
    local cmdline=$1 dir args=() fp line item rest status detail rc=0 failed=()
    dir=$(bc_dir)
    args=(--expect-cmdline "$cmdline")
    ((RECIPE_SELINUX)) && args+=(--require-selinux)
    while read -r fp; do
        [[ -n $fp ]] && args+=(--baked-host-key "$fp")
    done < <(baked_host_keys)
    args+=(${IMAGE_CHECK_ARGS[@]+"${IMAGE_CHECK_ARGS[@]}"})
    printf -v line '%q ' sudo -n bash -s -- "${args[@]}"
    echo "+ ssh $(<"$dir/login-user")@guest $line< instance-check"
    guest_ssh "$line" <"$SCRIPTS_DIR/instance-check" >"$dir/check.out" 2>&1 || rc=$?
    while IFS= read -r line; do
        echo "$line"
        [[ $line == "amibake-check: "* ]] || continue
        rest=${line#amibake-check: }
        item=${rest%%: *}
        rest=${rest#*: }
        [[ $item == "done" ]] && continue
        status=${rest%%: *}
        detail=${rest#*: }
        check_item "$item" "$status" "$detail" >/dev/null
        [[ $status == FAIL ]] && failed+=("$item")
    done <"$dir/check.out"
    stage_done checks
    if ((${#failed[@]})); then
        die "bootcheck: ${failed[*]} failed (the amibake-check lines above say why)"
    fi
    grep -aq '^amibake-check: done: ' "$dir/check.out" || die "bootcheck: instance-check did not finish (exit code $rc)"
    ((rc == 0)) || die "bootcheck: instance-check exited with $rc"
}

phase_bootcheck() {
    local dev qemu dir root_uuid cmdline
    dev=$(canvas_device)
    qemu=$(find_qemu) || die "bootcheck: no qemu-system-x86_64 or /usr/libexec/qemu-kvm on this box"
    check_qemu
    ensure_root_mounted
    root_uuid=$(root_uuid)
    cmdline=$(intended_cmdline "$root_uuid")
    dir=$(bc_dir)
    rm -rf "$dir"
    mkdir -m 700 "$dir"
    trap bootcheck_finish EXIT
    image_login_user >"$dir/login-user"
    ssh-keygen -q -t ed25519 -N '' -C amibake-bootcheck -f "$dir/id_ed25519"
    freeze_canvas $((BOOT_TIMEOUT + 600)) 4>&-
    # qemu reads the whole-disk device, whose page cache may still hold blocks an earlier check read
    # (a retried build on this box); the filesystems wrote through the partitions, past that cache.
    blockdev --flushbufs "$dev"
    echo "froze the canvas filesystems for a consistent disk; login user $(<"$dir/login-user"); intended kernel arguments: $cmdline"
    : >"$(serial_file)"
    STAGE_T0=$(now)
    STAGE_LAST=$STAGE_T0
    start_guest "$qemu" "$dev"
    wait_for_boot "root=UUID=$root_uuid"
    run_instance_check "$cmdline"
    echo "bootcheck: passed in $(elapsed "$STAGE_T0" "$(now)") s"
}
