# shellcheck shell=bash
# tools: the first phase of `all`. Every tool this build needs on the box, with a minimum version where
# an older one builds a wrong image, is checked before the canvas is touched, and the phase fails with
# the WHOLE list of what is missing (each with its package). On an EL7 box (the product's default
# build box) what is missing is first installed with the box's own yum (from the configured mirror
# when the recipe says so: recipe_box_yum); on any other box (the Debian box of the rehearsal) the
# phase only checks and names the apt packages to install.

# "command el7-package debian-package"; a command "a|b" is satisfied by either (an absolute path is
# checked as a file), a package "-" does not exist on that OS. Recipes add RECIPE_TOOLS (same shape).
BOX_TOOLS=(
    "bash bash bash"
    "flock util-linux util-linux"
    "setsid util-linux util-linux"
    "blkid util-linux util-linux"
    "blockdev util-linux util-linux"
    "wipefs util-linux util-linux"
    "partx util-linux util-linux"
    "mountpoint util-linux util-linux"
    "mount util-linux mount"
    "umount util-linux mount"
    "parted parted parted"
    "partprobe parted parted"
    "mkfs.xfs xfsprogs xfsprogs"
    "xfs_db xfsprogs xfsprogs"
    "xfs_freeze xfsprogs xfsprogs"
    "fuser psmisc psmisc"
    "pgrep procps-ng procps"
    "chroot coreutils coreutils"
    "stat coreutils coreutils"
    "truncate coreutils coreutils"
    "find findutils findutils"
    "awk gawk mawk"
    "sed sed sed"
    "grep grep grep"
)
# The boot check (--boot-check, lib/bootcheck.sh): qemu (EL7 ships /usr/libexec/qemu-kvm, which
# check_qemu then refuses when it lacks what the check needs), a qcow2 overlay, the IMDS relay
# (python3) and an SSH login to the guest with a throwaway key.
BOOTCHECK_TOOLS=(
    "qemu-system-x86_64|/usr/libexec/qemu-kvm qemu-kvm qemu-system-x86"
    "qemu-img qemu-img qemu-utils"
    "python3 python3 python3"
    "ssh openssh-clients openssh-client"
    "ssh-keygen openssh openssh-client"
)

# Minimum versions where an older tool builds a wrong image or cannot run this script.
MIN_BASH=4.2             # the oldest bash these scripts are written for (CentOS 7's)
# mkfs.xfs -m crc=1 (the v5 format both recipes' kernels and grub read) is there from xfsprogs 3.2.0;
# an older mkfs would silently make a v4 filesystem (mkfs_xfs_options drops options it lacks).
MIN_XFSPROGS=3.2.0

# True (0) when the version $1 is at least $2 (dotted numbers).
version_at_least() {
    [[ $(printf '%s\n' "$2" "$1" | sort -V | head -n1) == "$2" ]]
}

# True when one alternative of "a|b" is there: a command on PATH, or an executable absolute path.
tool_present() {
    local alt
    local IFS='|'
    for alt in $1; do
        if [[ $alt == /* ]]; then
            [[ -x $alt ]] && return 0
        elif command -v "$alt" >/dev/null; then
            return 0
        fi
    done
    return 1
}

# Is this box EL7? rpm's own macro says so (empty on other systems, or no rpm at all).
box_is_el7() {
    command -v rpm >/dev/null && [[ $(rpm -E '%{?rhel}' 2>/dev/null) == 7 ]]
}

# Every tool entry this build needs, one a line.
needed_tools() {
    printf '%s\n' "${BOX_TOOLS[@]}" ${RECIPE_TOOLS[@]+"${RECIPE_TOOLS[@]}"}
    if ((BOOT_CHECK)); then
        printf '%s\n' "${BOOTCHECK_TOOLS[@]}"
    fi
}

# Fill TOOLS_MISSING (what to tell the user) and TOOLS_PACKAGES (what to install on this box's OS).
TOOLS_MISSING=()
TOOLS_PACKAGES=()
check_tools() {
    local el7=$1 entry cmd el7_pkg deb_pkg pkg have qemu problem
    TOOLS_MISSING=()
    TOOLS_PACKAGES=()
    while read -r cmd el7_pkg deb_pkg; do
        tool_present "$cmd" && continue
        if ((el7)); then pkg=$el7_pkg; else pkg=$deb_pkg; fi
        if [[ $pkg == - ]]; then
            TOOLS_MISSING+=("${cmd//|/ or } (not packaged for this box's OS)")
            continue
        fi
        TOOLS_MISSING+=("${cmd//|/ or } ($pkg)")
        [[ " ${TOOLS_PACKAGES[*]-} " == *" $pkg "* ]] || TOOLS_PACKAGES+=("$pkg")
    done < <(needed_tools)
    if ! version_at_least "${BASH_VERSINFO[0]}.${BASH_VERSINFO[1]}" "$MIN_BASH"; then
        TOOLS_MISSING+=("bash >= $MIN_BASH (this is $BASH_VERSION)")
    fi
    if command -v mkfs.xfs >/dev/null; then
        have=$(mkfs.xfs -V 2>&1 | awk '{ print $NF; exit }')
        if ! version_at_least "$have" "$MIN_XFSPROGS"; then
            TOOLS_MISSING+=("mkfs.xfs >= $MIN_XFSPROGS (this is $have; xfsprogs)")
        fi
    fi
    if ((BOOT_CHECK)) && declare -F check_qemu >/dev/null && qemu=$(find_qemu); then
        # The boot check's own capability test (NVMe, q35), run now, before the canvas is touched.
        problem=$(check_qemu "$qemu" 2>&1 >/dev/null) || TOOLS_MISSING+=("${problem#build-image: }")
    fi
    if declare -F recipe_check_tools >/dev/null; then
        while read -r entry; do
            [[ -n $entry ]] && TOOLS_MISSING+=("$entry")
        done < <(recipe_check_tools)
    fi
    if ((BOOT_CHECK)); then
        # A qemu that cannot show the guest an EC2 machine (lib/bootcheck.sh): refused before the build.
        while read -r entry; do
            [[ -n $entry ]] && TOOLS_MISSING+=("$entry")
        done < <(qemu_problems)
    fi
    for entry in ${TOOLS_MISSING[@]+"${TOOLS_MISSING[@]}"}; do
        echo "missing: $entry"
    done
}

# Install packages on an EL7 box: the recipe's yum setup (the configured mirror) or the box's repos.
install_el7_packages() {
    if declare -F recipe_box_yum >/dev/null; then
        recipe_box_yum install "$@"
    else
        run yum -y install "$@"
    fi
}

phase_tools() {
    local el7=0 installed="" joined
    box_is_el7 && el7=1
    echo "box: $( ((el7)) && echo EL7 || echo 'not EL7 (check only)'), recipe $RECIPE, boot check $BOOT_CHECK"
    check_tools "$el7"
    if ((el7 && ${#TOOLS_PACKAGES[@]})); then
        installed=${TOOLS_PACKAGES[*]}
        echo "installing on this EL7 box: $installed"
        install_el7_packages "${TOOLS_PACKAGES[@]}"
        check_tools "$el7"
    fi
    if ((${#TOOLS_MISSING[@]})); then
        printf -v joined '%s; ' "${TOOLS_MISSING[@]}"
        joined=${joined%; }
        if ((el7)); then
            die "tools: missing on this box${installed:+ after yum install $installed}: $joined"
        fi
        die "tools: missing on this box: $joined${TOOLS_PACKAGES[*]+ (apt-get install ${TOOLS_PACKAGES[*]})}"
    fi
    echo "tools: all $(needed_tools | wc -l) tools present"
}
