# shellcheck shell=bash
# Recipe centos7 (the product default): a patched CentOS 7 cloud image, built on an EL7 box with the
# box's yum into --installroot from a private yum config. Facts: shared notes el7-image.md.
# Commands that need EL7 (rpm, yum, grub2-*, dracut, setfiles) go through `run`/`in_chroot`; tests
# off EL7 put recording stand-ins for them first on PATH (README "Test seams"). Files are real.
# The RECIPE_* settings are read by lib/*.sh; MIRROR etc. are set by build-image.
# shellcheck disable=SC2034,SC2153

# Product default repositories (CentOS 7 is end of life; the vault keeps 7.9.2009). --mirror replaces
# this base URL; it must hold os/, updates/ and extras/ trees for x86_64 like the vault does.
CENTOS_DEFAULT_MIRROR=https://vault.centos.org/7.9.2009
CENTOS_REPOS=(base:os updates:updates extras:extras)
CENTOS_GPG_KEY=RPM-GPG-KEY-CentOS-7
CENTOS_GPG_FINGERPRINT=6341AB2753D78A78A7C27BB124C6A8A7F4A80EB5
# The package set of the CentOS project's cloud image kickstart (CentOS-7-x86_64-hvm.ks), plus gdisk:
# the root is on GPT, and growpart (cloud-utils-growpart) grows a GPT partition with sgdisk only, so
# without it the root stays at the canvas size on a larger instance volume.
CENTOS_PACKAGES=(@core kernel grub2 grub2-tools dracut-config-generic dracut-norescue chrony cloud-init
    cloud-utils-growpart gdisk openssh-server selinux-policy-targeted policycoreutils xfsprogs rsync tar
    yum-utils)
CENTOS_EXCLUDES=('NetworkManager*' 'plymouth*' biosdevname iprutils aic94xx-firmware alsa-firmware
    alsa-tools-firmware ivtv-firmware 'iwl*-firmware' 'libertas-*-firmware')
# nvme_core.io_timeout: AWS ("NVMe I/O operation timeout for Amazon EBS volumes") recommends the highest
# value the kernel takes: 4294967295 on current kernels, 255 on kernels before 4.15, where the
# parameter is a byte. CentOS 7's 3.10 kernel refuses 4294967295 and keeps its 30 s default.
# no_timer_check: on Nitro (KVM) the kernel skips its IO-APIC timer check by itself
# (arch/x86/kernel/kvm.c); under the boot check's qemu TCG nothing does, and on a busy box the check
# misses its ticks and panics ("IO-APIC + timer doesn't work!"). CentOS's GenericCloud image carries it.
KERNEL_ARGS="console=tty0 console=ttyS0,115200n8 no_timer_check net.ifnames=0 nvme_core.io_timeout=255 crashkernel=auto"

RECIPE_GRUB_DIR=boot/grub2
RECIPE_INITRAMFS_DRIVERS=(nvme xen-blkfront xen-netfront ena)
# Kernel 3.10 and grub2 2.02 read only these features: everything a newer mkfs.xfs adds is switched off
# (options this box's mkfs does not know are left out: an older mkfs does not create those features).
RECIPE_MKFS_XFS=(m:crc=1 m:finobt=0 m:rmapbt=0 m:reflink=0 m:bigtime=0 m:inobtcount=0 i:sparse=0
    i:nrext64=0 n:ftype=1)
RECIPE_XFS_FEATURES="ro_compat=0 incompat=0x1"
RECIPE_SELINUX=1
RECIPE_SELINUX_SAMPLES=(/etc/passwd=passwd_file_t /etc/shadow=shadow_t /usr/sbin/sshd=sshd_exec_t
    /usr/lib/systemd/systemd=init_exec_t)
# Checked by verify: growpart grows the GPT root at first boot only with sgdisk (EL7's sfdisk 2.23
# has no GPT), else the root stays at the canvas size on a larger volume.
RECIPE_IMAGE_FILES=("/usr/bin/growpart=cloud-utils-growpart (grows the root at first boot)"
    "/usr/sbin/sgdisk=gdisk (growpart needs sgdisk for a GPT disk)")
# What this recipe needs on the box beyond lib/tools.sh's list ("command el7-package debian-package").
RECIPE_TOOLS=("yum yum -" "rpm rpm rpm" "curl curl curl" "gpg gnupg2 gpg" "getfattr attr attr")

yum_dir() { echo "$WORK/yum"; }
yum_conf() { echo "$(yum_dir)/yum.conf"; }
yum_key() { echo "$(yum_dir)/$CENTOS_GPG_KEY"; }

centos_mirror() {
    echo "${MIRROR:-$CENTOS_DEFAULT_MIRROR}"
}

# The configured repositories as yum .repo sections; $1 = base URL, $2 = gpgkey URL.
# One generator for the build's private yum.conf and for the image's own CentOS-Base.repo.
centos_repo_sections() {
    local base=$1 key=$2 entry id dir
    for entry in "${CENTOS_REPOS[@]}"; do
        id=${entry%%:*}
        dir=${entry#*:}
        # shellcheck disable=SC2016 # $basearch is yum's variable, written literally
        printf '[%s]\nname=CentOS-7 - %s\nbaseurl=%s/%s/$basearch/\nenabled=1\ngpgcheck=1\ngpgkey=%s\n\n' \
            "$id" "$id" "$base" "$dir" "$key"
    done
}

# Private yum config: no repo directory (the box's own repos never leak in), repositories inline.
# yum roots cachedir/logfile/persistdir in --installroot, so these paths are inside the image
# (and removed by the clean phase).
write_yum_conf() {
    mkdir -p "$(yum_dir)"
    {
        # shellcheck disable=SC2016 # $basearch and $releasever are yum's variables
        printf '[main]\ncachedir=/var/cache/yum/$basearch/$releasever\nkeepcache=0\nlogfile=/var/log/yum.log\n'
        printf 'exactarch=1\nobsoletes=1\ngpgcheck=1\nplugins=0\ninstallonly_limit=3\nreposdir=\n'
        printf 'distroverpkg=centos-release\ntsflags=nodocs\n\n'
        centos_repo_sections "$(centos_mirror)" "file://$(yum_key)"
    } >"$(yum_conf)"
}

# The tools phase on an EL7 box: the box's own yum, reading only the configured repositories (--mirror
# or the vault), checked with the CentOS key an EL7 box already has. Its cache and log stay in $WORK.
box_yum_conf() { echo "$(yum_dir)/box-yum.conf"; }
recipe_box_yum() {
    mkdir -p "$(yum_dir)"
    {
        printf '[main]\ncachedir=%s/box-cache\nkeepcache=0\nlogfile=%s/box-yum.log\n' "$(yum_dir)" "$LOG_DIR"
        printf 'gpgcheck=1\nplugins=0\nreposdir=\n\n'
        centos_repo_sections "$(centos_mirror)" "file:///etc/pki/rpm-gpg/$CENTOS_GPG_KEY"
    } >"$(box_yum_conf)"
    run yum -c "$(box_yum_conf)" -y "$@"
}

yum_root() {
    run yum -c "$(yum_conf)" --installroot="$ROOT" --releasever=7 -y "$@"
}

recipe_initramfs_path() { echo "boot/initramfs-$1.img"; }

recipe_list_initramfs() {
    chroot "$ROOT" lsinitrd "/boot/initramfs-$1.img"
}

# The image's installed packages from its rpm database, one NAME<TAB>EPOCH<TAB>VERSION<TAB>RELEASE<TAB>ARCH
# line each (contract.env PACKAGES_FILE; EPOCHNUM: 0 when a package has no epoch). gpg-pubkey entries
# are the keys rpm trusts, not packages: left out.
recipe_list_packages() {
    rpm --root "$ROOT" -qa --qf '%{NAME}\t%{EPOCHNUM}\t%{VERSION}\t%{RELEASE}\t%{ARCH}\n' |
        awk -F'\t' '$1 != "gpg-pubkey"'
}

# Kernel versions installed in the image.
image_kernels() {
    local d
    for d in "$ROOT"/lib/modules/*; do
        [[ -d $d ]] && echo "${d##*/}"
    done
    return 0
}

phase_bootstrap() {
    local excludes=() x
    ensure_root_mounted
    require_empty_root
    write_yum_conf
    echo "repositories: $(centos_mirror)/{os,updates,extras}"
    run curl -fsSL --retry 3 -o "$(yum_key)" "$(centos_mirror)/os/x86_64/$CENTOS_GPG_KEY"
    check_gpg_fingerprint "$(yum_key)" "$CENTOS_GPG_FINGERPRINT"
    for x in "${CENTOS_EXCLUDES[@]}"; do
        excludes+=(-x "$x")
    done
    chroot_enter
    run rpm --root "$ROOT" --initdb
    run rpm --root "$ROOT" --import "$(yum_key)"
    yum_root install "${CENTOS_PACKAGES[@]}" "${excludes[@]}"
    # The image is "patched": every update published in the configured repositories.
    yum_root update "${excludes[@]}"
    chroot_leave
}

# --- the image definition's repositories and packages (lib/imagedef.sh's packages phase) -----------
# The image's /etc/yum.repos.d/amibake-<name>.repo holds the repository (login included until clean).
# The build's yum reads only its private config (reposdir= empty): for the packages phase it reads a
# root-only copy of it in $RUN_DIR with the same sections (gpgkey pointing at the box's copy of the
# key), removed with the other credentials when build-image exits.

yum_packages_conf() { echo "$RUN_DIR/credentials-yum.conf"; }

# One yum repository section: $1 name, $2 base URL, $3 gpgkey URL, then optionally $4 login and
# $5 password (yum's username=/password=, HTTP basic auth).
el7_repo_section() {
    printf '[amibake-%s]\nname=amibake %s\nbaseurl=%s\nenabled=1\ngpgcheck=1\ngpgkey=%s\n' "$1" "$1" "$2" "$3"
    if (($# >= 5)); then
        printf 'username=%s\npassword=%s\n' "$4" "$5"
    fi
}

el7_repo_file() { echo "$ROOT/etc/yum.repos.d/amibake-$1.repo"; }
el7_repo_key() { echo "/etc/pki/rpm-gpg/RPM-GPG-KEY-amibake-$1"; }

# The private config of the packages phase: the build's yum.conf plus the definition's repositories.
yum_packages_conf_init() {
    [[ -e $(yum_packages_conf) ]] && return 0
    write_yum_conf
    (umask 077 && cp "$(yum_conf)" "$(yum_packages_conf)")
}

# Repository $1 (URL $2, armored key file $5, its fingerprint already checked): its key imported into
# the image's rpm database and in /etc/pki/rpm-gpg, its .repo file, and its section for the build.
recipe_add_repository() {
    local name=$1 url=$2 key=$5
    yum_packages_conf_init
    install -D -m 0644 "$key" "$ROOT$(el7_repo_key "$name")"
    run rpm --root "$ROOT" --import "$key"
    mkdir -p "$ROOT/etc/yum.repos.d"
    el7_repo_section "$name" "$url" "file://$(el7_repo_key "$name")" >"$(el7_repo_file "$name")"
    { echo && el7_repo_section "$name" "$url" "file://$key"; } >>"$(yum_packages_conf)"
}

# Repository $1's login (yum's username=/password=), in the image's .repo (root-only until clean)
# and in the build's private config.
recipe_repository_auth() {
    local name=$1 login=$3 password=$4
    chmod 0600 "$(el7_repo_file "$name")"
    printf 'username=%s\npassword=%s\n' "$login" "$password" | tee -a "$(el7_repo_file "$name")" >>"$(yum_packages_conf)"
}

# The image's yum.conf $1 keeps the packages named in the other arguments out for later updates too
# (exclude= in [main]).
el7_yum_exclude() {
    local conf=$1
    shift
    grep -q '^\[main\]' "$conf" || die "packages: $conf has no [main] section for exclude="
    sed -i "/^\[main\]/a exclude=$*" "$conf"
}

# clean: each .repo that holds a login is overwritten and unlinked, then written again without it.
recipe_forget_credentials() {
    local f rest
    for f in "$ROOT"/etc/yum.repos.d/amibake-*.repo; do
        if [[ ! -e $f ]] || ! grep -q '^password=' "$f"; then
            continue
        fi
        rest=$(grep -v -e '^username=' -e '^password=' "$f")
        shred_file "$f"
        printf '%s\n' "$rest" >"$f"
        chmod 0644 "$f"
    done
    return 0
}

# Install (exclude= also in the image's yum.conf, for later updates) and remove packages.
recipe_packages() {
    local install=() exclude=() remove=() x=() p conf
    read -r -a install <<<"$1"
    read -r -a exclude <<<"$2"
    read -r -a remove <<<"$3"
    yum_packages_conf_init
    conf=$(yum_packages_conf)
    for p in ${exclude[@]+"${exclude[@]}"}; do
        x+=(-x "$p")
    done
    if ((${#exclude[@]})); then
        el7_yum_exclude "$ROOT/etc/yum.conf" "${exclude[@]}"
    fi
    if ((${#install[@]})); then
        run yum -c "$conf" --installroot="$ROOT" --releasever=7 -y ${x[@]+"${x[@]}"} install "${install[@]}"
    fi
    if ((${#remove[@]})); then
        run yum -c "$conf" --installroot="$ROOT" --releasever=7 -y remove "${remove[@]}"
    fi
}

phase_configure() {
    local kver kernels=()
    ensure_root_mounted
    write_fstab
    mkdir -p "$ROOT/etc/default" "$ROOT/etc/sysconfig/network-scripts" "$ROOT/etc/dracut.conf.d" \
        "$ROOT/etc/yum.repos.d" "$ROOT/etc/systemd/system"
    cat >"$ROOT/etc/default/grub" <<EOF
# written by amibake (centos7 recipe)
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR="CentOS Linux"
GRUB_DEFAULT=0
GRUB_DISABLE_SUBMENU=true
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_CMDLINE_LINUX="$KERNEL_ARGS"
GRUB_DISABLE_RECOVERY=true
EOF
    printf 'NETWORKING=yes\nNOZEROCONF=yes\n' >"$ROOT/etc/sysconfig/network"
    # A kernel installed later by `yum update` on an instance becomes the default boot entry.
    printf 'UPDATEDEFAULT=yes\nDEFAULTKERNEL=kernel\n' >"$ROOT/etc/sysconfig/kernel"
    lock_root_password
    cat >"$ROOT/etc/sysconfig/network-scripts/ifcfg-eth0" <<'EOF'
DEVICE=eth0
TYPE=Ethernet
BOOTPROTO=dhcp
ONBOOT=yes
USERCTL=no
PEERDNS=yes
IPV6INIT=no
NM_CONTROLLED=no
EOF
    cat >"$ROOT/etc/dracut.conf.d/amibake.conf" <<EOF
# amibake: one initramfs that boots on Xen (xen-blkfront, xen-netfront) and Nitro (nvme, ena)
hostonly="no"
add_drivers+=" ${RECIPE_INITRAMFS_DRIVERS[*]} "
EOF
    {
        echo "# CentOS-Base.repo written by amibake: the repositories this image was built from"
        echo
        centos_repo_sections "$(centos_mirror)" "file:///etc/pki/rpm-gpg/$CENTOS_GPG_KEY"
    } >"$ROOT/etc/yum.repos.d/CentOS-Base.repo"
    write_cloud_init_config # EL7's glibc has en_US.UTF-8, cloud-init's default locale
    chroot_enter
    in_chroot chkconfig network on
    mapfile -t kernels < <(image_kernels)
    ((${#kernels[@]})) || die "configure: no kernel in $ROOT/lib/modules (did bootstrap install one?)"
    for kver in "${kernels[@]}"; do
        in_chroot dracut -f "/boot/initramfs-$kver.img" "$kver"
    done
    chroot_leave
}

phase_bootloader() {
    ensure_root_mounted
    chroot_enter
    in_chroot grub2-install --target=i386-pc "$(canvas_device)"
    grub_mkconfig_by_uuid grub2-mkconfig /boot/grub2/grub.cfg
    chroot_leave
}

# Label every file now, not with /.autorelabel at first boot (which reboots the instance once).
phase_relabel() {
    ensure_root_mounted
    chroot_enter
    in_chroot setfiles -F -e /proc -e /sys -e /dev /etc/selinux/targeted/contexts/files/file_contexts /
    chroot_leave
    rm -f "$ROOT/.autorelabel"
}

phase_clean() {
    ensure_root_mounted
    clean_common
    rm -rf "$ROOT"/var/cache/yum/* "$ROOT"/var/lib/dhclient/*
}
