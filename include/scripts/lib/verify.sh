# shellcheck shell=bash
# verify: static checks of the finished canvas before any snapshot is taken. Every failed check prints
# one "verify: FAIL: ..." line; the phase fails if any check failed. Read-only: it changes nothing.

VERIFY_FAILS=0
VERIFY_FIRST=""

vfail() {
    echo "build-image: verify: FAIL: $*" >&2
    VERIFY_FAILS=$((VERIFY_FAILS + 1))
    [[ -n $VERIFY_FIRST ]] || VERIFY_FIRST=$*
}

vok() {
    echo "verify: ok: $*"
}

# UUIDs of all filesystems on the canvas partitions.
canvas_uuids() {
    local n part
    for n in "$BIOS_PART" "$ROOT_PART"; do
        part=$(partition_node "$(canvas_device)" "$n")
        [[ -b $part ]] && fs_uuid "$part"
    done
    return 0
}

# grub's i386-pc boot code in the MBR and its core image in the bios_grub partition and /boot.
verify_bootloader() {
    local dev bios moddir
    dev=$(canvas_device)
    bios=$(bios_partition)
    # boot.img carries the string "GRUB" in its 440 bytes of boot code.
    if head -c 440 "$dev" | grep -a GRUB >/dev/null; then
        vok "GRUB boot code in the MBR of $dev"
    else
        vfail "no GRUB boot code in the MBR of $dev (bootloader not installed)"
    fi
    if [[ -b $bios ]] && [[ -n $(head -c 512 "$bios" | tr -d '\0') ]]; then
        vok "core image embedded in the bios_grub partition $bios"
    else
        vfail "bios_grub partition $bios is empty (grub core image not embedded)"
    fi
    moddir=$ROOT/$RECIPE_GRUB_DIR/i386-pc
    if [[ -s $moddir/core.img && -s $moddir/normal.mod ]]; then
        vok "grub i386-pc modules and core.img in /$RECIPE_GRUB_DIR/i386-pc"
    else
        vfail "/$RECIPE_GRUB_DIR/i386-pc lacks core.img or normal.mod"
    fi
}

# Every root= and search --fs-uuid in grub.cfg names a UUID on the canvas; every kernel it boots exists.
verify_grub_cfg() {
    local cfg=$ROOT/$RECIPE_GRUB_DIR/grub.cfg uuids root_uuid arg u kernel n=0
    uuids=" $(canvas_uuids | paste -sd' ') "
    root_uuid=$(fs_uuid "$(root_partition)")
    if [[ ! -s $cfg ]]; then
        vfail "no /$RECIPE_GRUB_DIR/grub.cfg"
        return 0
    fi
    while read -r arg; do
        n=$((n + 1))
        if [[ $arg == "root=UUID=$root_uuid" ]]; then
            continue
        fi
        vfail "grub.cfg has '$arg'; the root filesystem is root=UUID=$root_uuid"
    done < <(grep -o 'root=[^ ]*' "$cfg" | grep -v '^root=$' || true)
    if ((n == 0)); then
        vfail "grub.cfg has no root= kernel argument"
    else
        vok "all $n root= arguments in grub.cfg are root=UUID=$root_uuid"
    fi
    while read -r u; do
        [[ $uuids == *" $u "* ]] || vfail "grub.cfg searches for filesystem UUID $u, which is not on the canvas"
    done < <(grep -o -- '--fs-uuid --set=root [^ ]*' "$cfg" | awk '{ print $3 }' | sort -u || true)
    while read -r kernel; do
        [[ -e $ROOT/boot/${kernel##*/} ]] || vfail "grub.cfg boots $kernel, which is not in /boot"
    done < <(awk '$1 == "linux" || $1 == "linux16" { print $2 }' "$cfg" | sort -u)
}

# Every fstab entry names a filesystem by a UUID on the canvas, and / is one of them.
verify_fstab() {
    local fstab=$ROOT/etc/fstab uuids spec mp rest have_root=0 before=$VERIFY_FAILS
    uuids=" $(canvas_uuids | paste -sd' ') "
    if [[ ! -s $fstab ]]; then
        vfail "no /etc/fstab"
        return 0
    fi
    while read -r spec mp rest; do
        [[ -z $spec || $spec == \#* ]] && continue
        [[ $mp == / ]] && have_root=1
        if [[ $spec != UUID=* ]]; then
            vfail "fstab entry for $mp is '$spec', not UUID=..."
        elif [[ $uuids != *" ${spec#UUID=} "* ]]; then
            vfail "fstab entry for $mp names $spec, which is not a filesystem on the canvas"
        fi
    done <"$fstab"
    ((have_root)) || vfail "fstab has no entry for /"
    ((VERIFY_FAILS > before)) || vok "fstab entries name canvas UUIDs"
}

# Each installed kernel has its modules and a matching initramfs holding the recipe's drivers.
verify_kernels() {
    local vmlinuz kver initrd listing builtin drv norm missing n=0
    for vmlinuz in "$ROOT"/boot/vmlinuz-*; do
        [[ -e $vmlinuz ]] || continue
        kver=${vmlinuz##*/vmlinuz-}
        [[ $kver == *rescue* ]] && continue
        n=$((n + 1))
        [[ -d $ROOT/lib/modules/$kver ]] || vfail "kernel $kver has no /lib/modules/$kver"
        initrd=$(recipe_initramfs_path "$kver")
        if [[ ! -s $ROOT/$initrd ]]; then
            vfail "kernel $kver has no initramfs /$initrd"
            continue
        fi
        listing=$(recipe_list_initramfs "$kver" | sed 's,-,_,g') || {
            vfail "cannot list the initramfs /$initrd"
            continue
        }
        builtin=$(sed 's,-,_,g' "$ROOT/lib/modules/$kver/modules.builtin" 2>/dev/null || true)
        missing=0
        # A driver is in the initramfs as a module, or built into the kernel.
        for drv in "${RECIPE_INITRAMFS_DRIVERS[@]}"; do
            norm=${drv//-/_}
            if ! grep -Eq "/${norm}\.ko(\.xz|\.zst|\.gz)?$" <<<"$listing" &&
                ! grep -Eq "/${norm}\.ko$" <<<"$builtin"; then
                vfail "initramfs /$initrd of kernel $kver lacks driver $drv"
                missing=$((missing + 1))
            fi
        done
        ((missing)) || vok "kernel $kver: modules, initramfs /$initrd with ${RECIPE_INITRAMFS_DRIVERS[*]}"
    done
    ((n)) || vfail "no kernel in /boot"
    return 0
}

# SELinux labels present on key files (setfiles ran during the build, not at first boot).
verify_selinux() {
    local f ctx before=$VERIFY_FAILS
    ((${RECIPE_SELINUX:-0})) || return 0
    [[ -e $ROOT/.autorelabel ]] && vfail "/.autorelabel exists: the image would relabel at first boot"
    for f in "${RECIPE_SELINUX_SAMPLES[@]}"; do
        local path=${f%%=*} want=${f#*=}
        ctx=$(getfattr --absolute-names --only-values -n security.selinux "$ROOT$path" 2>/dev/null | tr -d '\0' || true)
        if [[ $ctx != *":$want:"* ]]; then
            vfail "SELinux label of $path is '${ctx:-none}', expected type $want"
        fi
    done
    ((VERIFY_FAILS > before)) || vok "SELinux labels on ${#RECIPE_SELINUX_SAMPLES[@]} sample files"
}

# Files the recipe's image must hold (RECIPE_IMAGE_FILES: "path=why"), e.g. what growpart needs.
verify_image_files() {
    local entry path
    for entry in ${RECIPE_IMAGE_FILES[@]+"${RECIPE_IMAGE_FILES[@]}"}; do
        path=${entry%%=*}
        if [[ -x $ROOT$path ]]; then
            vok "$path present"
        else
            vfail "$path missing: ${entry#*=}"
        fi
    done
}

# No password login as root: root's shadow field is locked ("!...") or has no password ("*").
verify_root_locked() {
    local field
    field=$(awk -F: '$1 == "root" { print $2 }' "$ROOT/etc/shadow" 2>/dev/null || true)
    case $field in
    '!'* | '*'*) vok "root password locked ('${field:0:2}')" ;;
    '') vfail "no root entry in /etc/shadow" ;;
    *) vfail "root has a usable password in /etc/shadow" ;;
    esac
}

# --- what a first boot of this image must show (instance-check's arguments) ------------------------
# Both checks of a first boot use them: the boot check on the box (lib/bootcheck.sh) and the smoke
# instance launched from the registered AMI (operators/smoke.py, from the "expectations" event).

# The login user cloud-init creates: system_info.default_user.name of the image's cloud.cfg
# (cloud.cfg.d files read after it win, as in cloud-init).
image_login_user() {
    local f user="" u
    for f in "$ROOT/etc/cloud/cloud.cfg" "$ROOT"/etc/cloud/cloud.cfg.d/*.cfg; do
        [[ -r $f ]] || continue
        u=$(awk '
            /^system_info:/ { si = 1; next }
            si && /^[^ #]/ { si = 0 }
            si && /^ +default_user:/ { du = 1; ind = match($0, /[^ ]/); next }
            du && /^ *[^ #]/ && match($0, /[^ ]/) <= ind { du = 0 }
            du && /^ +name:/ { print $2; exit }' "$f")
        [[ -n $u ]] && user=$u
    done
    [[ -n $user ]] || die "bootcheck: no system_info.default_user.name in the image's /etc/cloud/cloud.cfg: no login user to check with"
    echo "$user"
}

# The kernel arguments the recipe intends: root=UUID=<canvas root> and the image's GRUB_CMDLINE_LINUX
# and GRUB_CMDLINE_LINUX_DEFAULT (what the recipe wrote into /etc/default/grub).
intended_cmdline() {
    local key val args="root=UUID=$1"
    for key in GRUB_CMDLINE_LINUX GRUB_CMDLINE_LINUX_DEFAULT; do
        val=$(sed -n "s/^$key=[\"']\\{0,1\\}\\([^\"']*\\)[\"']\\{0,1\\}\$/\\1/p" "$ROOT/etc/default/grub" | tail -n1)
        [[ -n $val ]] && args+=" $val"
    done
    echo "$args"
}

# SHA256 fingerprints of every SSH host key in the image (none is expected: the clean phase removes them).
baked_host_keys() {
    local f
    for f in "$ROOT"/etc/ssh/ssh_host_*_key; do
        [[ -e $f ]] || continue
        if [[ -e $f.pub ]]; then
            ssh-keygen -lf "$f.pub" | awk '{ print $2 }'
        else
            ssh-keygen -yf "$f" | ssh-keygen -lf - | awk '{ print $2 }'
        fi
    done
}

# Record what instance-check must be told about this image (login user, kernel arguments, baked host
# keys, SELinux, the image definition's smoke checks) as the JSON fields of the "expectations" progress event, which build-image emits
# once the verify phase has passed (only build-image's own process holds the progress pipe).
write_expectations() {
    local user cmdline keys=() fp selinux=false
    user=$(image_login_user)
    cmdline=$(intended_cmdline "$(root_uuid)")
    while read -r fp; do
        [[ -n $fp ]] && keys+=("$fp")
    done < <(baked_host_keys)
    ((${RECIPE_SELINUX:-0})) && selinux=true
    printf '"login_user":%s,"cmdline":%s,"baked_host_keys":%s,"require_selinux":%s,"checks":%s\n' \
        "$(json_str "$user")" "$(json_str "$cmdline")" "$(json_list ${keys[@]+"${keys[@]}"})" "$selinux" \
        "$(image_checks_json)" >"$(expectations_file)"
    echo "verify: first-boot expectations: login user $user; kernel arguments $cmdline; ${#keys[@]} baked host key(s); SELinux required: $selinux; ${IMAGE_CHECK_COUNT:-0} smoke check(s) of the image definition"
}

expectations_file() { echo "$RUN_DIR/expectations"; }

# --- the image's package list (the "packages" event) ---------------------------------------------

packages_file() { echo "$RUN_DIR/$PACKAGES_FILE"; }
packages_event_file() { echo "$RUN_DIR/packages.event"; }

# What is wrong with one package list line (contract.env PACKAGES_FILE and PACKAGE_*_RE), in
# PACKAGE_PROBLEM ('' when nothing; a variable, not output: no subshell per line).
package_line_problem() {
    local line=$1 tabs rest name epoch version release arch
    PACKAGE_PROBLEM=""
    tabs=${line//[!$'\t']/}
    if ((${#tabs} != 4)); then
        PACKAGE_PROBLEM="not 5 tab-separated fields"
        return 0
    fi
    rest=$line
    name=${rest%%$'\t'*} && rest=${rest#*$'\t'}
    epoch=${rest%%$'\t'*} && rest=${rest#*$'\t'}
    version=${rest%%$'\t'*} && rest=${rest#*$'\t'}
    release=${rest%%$'\t'*} && arch=${rest#*$'\t'}
    [[ $name =~ $PACKAGE_NAME_RE ]] || PACKAGE_PROBLEM+="; name '$name' does not match PACKAGE_NAME_RE"
    [[ $epoch =~ $PACKAGE_EPOCH_RE ]] || PACKAGE_PROBLEM+="; epoch '$epoch' does not match PACKAGE_EPOCH_RE"
    [[ $version =~ $PACKAGE_VERSION_RE ]] || PACKAGE_PROBLEM+="; version '$version' does not match PACKAGE_VERSION_RE"
    [[ $release =~ $PACKAGE_RELEASE_RE ]] || PACKAGE_PROBLEM+="; release '$release' does not match PACKAGE_RELEASE_RE"
    [[ $arch =~ $PACKAGE_ARCH_RE ]] || PACKAGE_PROBLEM+="; arch '$arch' does not match PACKAGE_ARCH_RE"
    PACKAGE_PROBLEM=${PACKAGE_PROBLEM#; }
    return 0
}

# The image's package list from the recipe (recipe_list_packages: rpm or dpkg in the image), sorted,
# de-duplicated and checked line by line, in $RUN_DIR/$PACKAGES_FILE (the build's run dir); the
# packages event's fields (path, count, sha256) in packages.event, for build-image to emit.
write_package_list() {
    local out tmp line count=0 sum
    out=$(packages_file)
    tmp=$out.tmp
    recipe_list_packages >"$tmp.raw"
    LC_ALL=C sort -u "$tmp.raw" >"$tmp"
    rm -f "$tmp.raw"
    while IFS= read -r line; do
        count=$((count + 1))
        package_line_problem "$line"
        [[ -z $PACKAGE_PROBLEM ]] || die "verify: package list line $count ($(json_str "$line")): $PACKAGE_PROBLEM"
    done <"$tmp"
    ((count > 0)) || die "verify: the image's package list is empty (recipe_list_packages printed nothing)"
    ((count <= PACKAGES_MAX)) || die "verify: the image's package list has $count lines, more than PACKAGES_MAX=$PACKAGES_MAX"
    sum=$(sha256sum "$tmp" | cut -d' ' -f1)
    mv -f "$tmp" "$out"
    printf '"path":%s,"count":%d,"sha256":"%s"\n' "$(json_str "$out")" "$count" "$sum" >"$(packages_event_file)"
    echo "verify: package list: $count packages in $out, sha256 $sum"
}

phase_verify() {
    ensure_root_mounted
    # A list or event of an earlier try never stands for this image.
    rm -f "$(packages_file)" "$(packages_event_file)"
    VERIFY_FAILS=0
    verify_bootloader
    verify_grub_cfg
    verify_fstab
    chroot_enter
    verify_kernels
    chroot_leave
    if [[ -n ${RECIPE_XFS_FEATURES:-} ]]; then
        assert_xfs_features "$(root_partition)" || vfail "xfs feature bits do not suit the $RECIPE target kernel"
    fi
    verify_selinux
    verify_root_locked
    verify_image_files
    verify_no_secrets
    if ((VERIFY_FAILS)); then
        echo "build-image: verify: $VERIFY_FAILS check(s) failed, first: $VERIFY_FIRST" >&2
        return 1
    fi
    write_expectations
    write_package_list
    echo "verify: all checks passed"
}
