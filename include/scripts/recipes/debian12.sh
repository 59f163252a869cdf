# shellcheck shell=bash
# The RECIPE_* settings are read by lib/*.sh; MIRROR etc. are set by build-image.
# shellcheck disable=SC2034,SC2153
# Recipe debian12: Debian 12 "bookworm" with the cloud kernel, grub-pc (BIOS), cloud-init and
# openssh-server. The packages come from the mirror the box's own apt sources use (or --mirror):
# no mirror host is written here.

DEBIAN_SUITE=bookworm
# Installed with apt inside the image after a minbase debootstrap: debootstrap's own resolver does not
# follow virtual packages (cloud-init -> python3-cryptography -> python3-cffi-backend-api-*), apt does.
# zstd: initramfs.conf says COMPRESS=zstd and initramfs-tools only recommends it; without it every
# initramfs falls back to gzip, slower to make at each build and to unpack at each boot.
DEBIAN_PACKAGES=(linux-image-cloud-amd64 grub-pc initramfs-tools zstd xfsprogs systemd-sysv udev
    openssh-server cloud-init cloud-guest-utils ifupdown isc-dhcp-client sudo ca-certificates chrony)
DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# What this recipe needs on the box beyond lib/tools.sh's list ("command el7-package debian-package";
# debootstrap is not in CentOS 7's repositories).
RECIPE_TOOLS=("debootstrap - debootstrap" "gpgv gnupg2 gpgv")
# Box apt sources consulted for the default mirror (apt's own order).
APT_SOURCES=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)

RECIPE_GRUB_DIR=boot/grub
RECIPE_INITRAMFS_DRIVERS=(nvme xen-blkfront virtio_blk ena xen-netfront)
# The 6.1 kernel reads every feature this mkfs.xfs turns on by default.
RECIPE_MKFS_XFS=(m:crc=1 n:ftype=1)
RECIPE_XFS_FEATURES=""
RECIPE_SELINUX=0
RECIPE_SELINUX_SAMPLES=()

# First URI of an enabled "deb" source serving SUITE in the given apt source files
# (one-line .list format and deb822 .sources format).
apt_uri_for_suite() {
    local suite=$1 f
    shift
    for f in "$@"; do
        [[ -r $f ]] || continue
        if [[ $f == *.sources ]]; then
            awk -v suite="$suite" '
                function flush(   n, s, i, u) {
                    if (!found && types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no") {
                        n = split(suites, s, /[ \t]+/)
                        for (i = 1; i <= n; i++) if (s[i] == suite) { split(uris, u, /[ \t]+/); print u[1]; found = 1 }
                    }
                    types = uris = suites = enabled = ""
                }
                /^[ \t]*#/ { next }
                /^[ \t]*$/ { flush(); next }
                { key = tolower($1); val = $0; sub(/^[^:]*:[ \t]*/, "", val) }
                key == "types:" { types = val } key == "uris:" { uris = val }
                key == "suites:" { suites = val } key == "enabled:" { enabled = tolower(val) }
                END { flush() }' "$f"
        else
            sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2 }'
        fi
    done | head -n1
}

debian_mirror() {
    local m=$MIRROR
    [[ -n $m ]] || m=$(apt_uri_for_suite "$DEBIAN_SUITE" "${APT_SOURCES[@]}")
    [[ -n $m ]] || die "no --mirror and no Debian mirror for $DEBIAN_SUITE in this box's apt sources"
    valid_mirror_url "${m%/}" || die "the apt sources' mirror for $DEBIAN_SUITE: $(mirror_url_problem "${m%/}") (give --mirror)"
    echo "${m%/}"
}

# The tools phase's recipe checks: this debootstrap knows the suite, and the archive key is there.
recipe_check_tools() {
    local scripts=/usr/share/debootstrap/scripts
    if command -v debootstrap >/dev/null && [[ ! -e $scripts/$DEBIAN_SUITE ]]; then
        echo "debootstrap that knows $DEBIAN_SUITE (no $scripts/$DEBIAN_SUITE; a newer debootstrap)"
    fi
    [[ -r $DEBIAN_KEYRING ]] || echo "$DEBIAN_KEYRING (debian-archive-keyring)"
    return 0
}

recipe_initramfs_path() { echo "boot/initrd.img-$1"; }

recipe_list_initramfs() {
    chroot "$ROOT" lsinitramfs "/boot/initrd.img-$1"
}

# The image's installed packages ("ii" in the image's own dpkg database, read by its dpkg-query), one
# NAME<TAB>EPOCH<TAB>VERSION<TAB>RELEASE<TAB>ARCH line each (contract.env PACKAGES_FILE): Debian's
# [epoch:]upstream[-revision] split at the first colon and the last hyphen (no epoch: 0).
# shellcheck disable=SC2016 # ${...} is dpkg-query's own field syntax, not the shell's
recipe_list_packages() {
    chroot "$ROOT" dpkg-query -W -f='${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n' |
        awk -F'\t' 'substr($1, 1, 2) == "ii" {
            v = $3; e = 0; r = ""
            c = index(v, ":")
            if (c) { e = substr(v, 1, c - 1); v = substr(v, c + 1) }
            if (match(v, /-[^-]*$/)) { r = substr(v, RSTART + 1); v = substr(v, 1, RSTART - 1) }
            printf "%s\t%s\t%s\t%s\t%s\n", $2, e, v, r, $4
        }'
}

# The image's apt sources: the build mirror for the suite and its updates, and the mirror's security
# archive (contract.env DEBIAN_SECURITY_SUFFIX: the one the fingerprint reads), so the build and
# `apt-get upgrade` on an instance get the fixes.
write_apt_sources() {
    local mirror=${1%/}
    rm -f "$ROOT/etc/apt/sources.list"
    {
        printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: %s\n\n' \
            "$mirror" "$DEBIAN_SUITE" "$DEBIAN_SUITE" "$DEBIAN_KEYRING"
        printf 'Types: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: %s\n' \
            "$mirror$DEBIAN_SECURITY_SUFFIX" "$DEBIAN_SUITE" "$DEBIAN_KEYRING"
    } >"$ROOT/etc/apt/sources.list.d/debian.sources"
}

# Bind the optional package cache (tests and benchmarks only) over the image's apt archive.
bind_apt_cache() {
    [[ -n ${AMIBAKE_PACKAGE_CACHE:-} ]] || return 0
    mkdir -p "$AMIBAKE_PACKAGE_CACHE/apt/partial" "$ROOT/var/cache/apt/archives"
    mount --bind "$AMIBAKE_PACKAGE_CACHE/apt" "$ROOT/var/cache/apt/archives"
}

phase_bootstrap() {
    local mirror extra=()
    ensure_root_mounted
    require_empty_root
    mirror=$(debian_mirror)
    echo "mirror: $mirror"
    if [[ -n ${AMIBAKE_PACKAGE_CACHE:-} ]]; then
        mkdir -p "$AMIBAKE_PACKAGE_CACHE/debootstrap"
        extra+=("--cache-dir=$AMIBAKE_PACKAGE_CACHE/debootstrap")
    fi
    run debootstrap --variant=minbase --components=main ${extra[@]+"${extra[@]}"} \
        "$DEBIAN_SUITE" "$ROOT" "$mirror"
    write_apt_sources "$mirror"
    chroot_enter
    bind_apt_cache
    in_chroot apt-get update
    # The image is "patched": updates and security fixes on top of the release, then the packages.
    in_chroot env DEBIAN_FRONTEND=noninteractive apt-get -y -o Dpkg::Options::=--force-confold dist-upgrade
    in_chroot env DEBIAN_FRONTEND=noninteractive apt-get -y --no-install-recommends \
        -o Dpkg::Options::=--force-confold install "${DEBIAN_PACKAGES[@]}"
    chroot_leave
}

# --- the image definition's repositories and packages (lib/imagedef.sh's packages phase) -----------

# The one-line apt source of repository $1 (URL $2, suite $3, components $4), signed-by its own key.
apt_source_line() {
    printf 'deb [signed-by=/usr/share/keyrings/amibake-%s.gpg] %s %s %s\n' "$1" "$2" "$3" "$4"
}

# apt's login line for URL $1. apt applies a scheme-less "machine" only to https, so the whole URL
# (http:// included) is written.
apt_auth_line() {
    printf 'machine %s login %s password %s\n' "$1" "$2" "$3"
}

apt_auth_file() { echo "$ROOT/etc/apt/auth.conf.d/amibake-$1.conf"; }

# Repository $1 (URL $2, suite $3, components $4, armored key file $5, its fingerprint already
# checked): its dearmored key in /usr/share/keyrings and its source in sources.list.d.
recipe_add_repository() {
    local name=$1 url=$2 suite=$3 components=$4 key=$5
    mkdir -p "$ROOT/usr/share/keyrings" "$ROOT/etc/apt/sources.list.d"
    gpg --batch --yes --dearmor -o "$ROOT/usr/share/keyrings/amibake-$name.gpg" "$key"
    chmod 0644 "$ROOT/usr/share/keyrings/amibake-$name.gpg"
    apt_source_line "$name" "$url" "$suite" "$components" >"$ROOT/etc/apt/sources.list.d/amibake-$name.list"
}

# The login of repository $1 (URL $2) for apt, root-only in the image's auth.conf.d until clean.
recipe_repository_auth() {
    local name=$1 url=$2 login=$3 password=$4
    [[ ! $login$password =~ [[:space:]] ]] || die "packages: repository $name: apt's auth.conf cannot hold white space in a login or password"
    mkdir -p "$ROOT/etc/apt/auth.conf.d"
    (umask 077 && apt_auth_line "$url" "$login" "$password" >"$(apt_auth_file "$name")")
}

# apt preferences that keep each package named in the arguments out of the image, now and in later
# upgrades (a negative priority: never installed).
apt_exclude_pins() {
    local p
    for p in "$@"; do
        printf 'Package: %s\nPin: release *\nPin-Priority: -1\n\n' "$p"
    done
}

# clean: every login this build wrote into the image, overwritten before it is unlinked.
recipe_forget_credentials() {
    local f
    for f in "$ROOT"/etc/apt/auth.conf.d/amibake-*.conf; do
        [[ -e $f ]] && shred_file "$f"
    done
    return 0
}

# Install, pin away (apt preferences, Pin-Priority -1: also for later upgrades) and purge packages.
recipe_packages() {
    local install=() exclude=() remove=() p
    read -r -a install <<<"$1"
    read -r -a exclude <<<"$2"
    read -r -a remove <<<"$3"
    if ((${#exclude[@]})); then
        mkdir -p "$ROOT/etc/apt/preferences.d"
        apt_exclude_pins "${exclude[@]}" >"$ROOT/etc/apt/preferences.d/amibake-exclude"
    fi
    bind_apt_cache
    in_chroot apt-get update
    if ((${#install[@]})); then
        in_chroot env DEBIAN_FRONTEND=noninteractive apt-get -y --no-install-recommends \
            -o Dpkg::Options::=--force-confold install "${install[@]}"
    fi
    if ((${#remove[@]})); then
        in_chroot env DEBIAN_FRONTEND=noninteractive apt-get -y purge "${remove[@]}"
    fi
}

phase_configure() {
    ensure_root_mounted
    write_fstab
    echo localhost >"$ROOT/etc/hostname"
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
    # no_timer_check: why, at the centos7 recipe's KERNEL_ARGS.
    cat >"$ROOT/etc/default/grub" <<'EOF'
# written by amibake (debian12 recipe)
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8 no_timer_check net.ifnames=0 nvme_core.io_timeout=4294967295"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_DISABLE_OS_PROBER=true
EOF
    mkdir -p "$ROOT/etc/network/interfaces.d"
    printf 'auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n' >"$ROOT/etc/network/interfaces"
    printf 'allow-hotplug eth0\niface eth0 inet dhcp\n' >"$ROOT/etc/network/interfaces.d/eth0"
    printf '# amibake: boot on Xen and Nitro (EBS and ENA) and under qemu\n%s\n' \
        "${RECIPE_INITRAMFS_DRIVERS[@]}" >"$ROOT/etc/initramfs-tools/modules"
    # C.UTF-8 is built into glibc: cloud-init's default en_US.UTF-8 is not generated in this image,
    # so its locale module failed and with it cloud-config.service, at every first boot.
    write_cloud_init_config "locale: C.UTF-8"
    # Host keys are removed before the snapshot; make fresh ones at first boot even without cloud-init.
    cat >"$ROOT/etc/systemd/system/amibake-ssh-hostkeys.service" <<'EOF'
[Unit]
Description=Generate missing SSH host keys
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
    chroot_enter
    in_chroot systemctl enable amibake-ssh-hostkeys.service
    in_chroot update-initramfs -u -k all
    chroot_leave
}

phase_bootloader() {
    ensure_root_mounted
    chroot_enter
    in_chroot grub-install --target=i386-pc "$(canvas_device)"
    grub_mkconfig_by_uuid grub-mkconfig /boot/grub/grub.cfg
    chroot_leave
}

phase_relabel() {
    echo "debian12: no SELinux policy in this image; nothing to relabel"
}

phase_clean() {
    ensure_root_mounted
    clean_common
    rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin
    find "$ROOT/var/cache/apt/archives" -xdev -name '*.deb' -delete
    rm -f "$ROOT"/var/lib/dhcp/*.leases
}
