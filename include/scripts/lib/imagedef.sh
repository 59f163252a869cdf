# shellcheck shell=bash
# The image definition's part of the build (images/<name>.yaml on the Airflow side): the bundle the
# worker ships to --image-dir (image.env + files/, scripts/, keys/, checks/), the repositories'
# credentials (`build-image credentials`, stdin only), and the phases packages, files and provision.
# image.env is checked line by line BEFORE it is sourced, then every value again with contract.env's
# rules (the same the Airflow side applied): this is the box's security boundary.
# Recipe hooks used here: recipe_add_repository, recipe_repository_auth, recipe_packages,
# recipe_forget_credentials (recipes/<recipe>.sh).

IMAGE_LOADED=0
IMAGE_CHECK_ARGS=()
# image.env keys: the fixed ones and the numbered ones (IMAGE_REPO_1_NAME ...).
IMAGE_KEYS_RE='^IMAGE_(NAME|RECIPE|PACKAGES|EXCLUDE|REMOVE|SERVICES_ENABLE|SERVICES_DISABLE|KERNEL_ARGS|REPO_COUNT|FILE_COUNT|SCRIPTS|CHECK_COUNT|REPO_[1-9][0-9]{0,2}_(NAME|URL|SUITE|COMPONENTS|KEY|FINGERPRINT|AUTH)|FILE_[1-9][0-9]{0,2}_(SOURCE|DEST|MODE|OWNER|GROUP)|CHECK_[1-9][0-9]{0,2}_(NAME|COMMAND))$'
IMAGE_ENTRIES_MAX=100
# Inside the image during the files and provision phases (removed again by them).
IMAGE_STAGE=/var/tmp/amibake-stage

credentials_file() { echo "$RUN_DIR/credentials"; }

# Value of the numbered image.env key IMAGE_<KIND>_<N>_<FIELD> ('' when unset).
image_item() {
    local var="IMAGE_$1_$2_$3"
    echo "${!var:-}"
}

# die unless $2 (a path relative to the image dir) is a regular file there, no symlink on the way,
# within IMAGE_FILE_MAX_BYTES. $1 names the entry for the message.
check_bundle_file() {
    local what=$1 rel=$2 size
    [[ $rel =~ $BUNDLE_PATH_RE ]] || die "image.env $what: '$rel' is not a path inside the image dir"
    [[ -f $IMAGE_DIR/$rel && ! -L $IMAGE_DIR/$rel ]] || die "image.env $what: $rel is not a regular file of the image dir"
    size=$(stat -c %s "$IMAGE_DIR/$rel")
    ((size <= IMAGE_FILE_MAX_BYTES)) || die "image.env $what: $rel is $size bytes, more than $IMAGE_FILE_MAX_BYTES"
}

# die unless every word of $2 matches the regex $3 ($1 names the key).
check_words() {
    local key=$1 words=$2 re=$3 w
    for w in $words; do
        [[ $w =~ $re ]] || die "image.env $key: '$w' does not match $re"
    done
}

# Read --image-dir's image.env: the format first (comment, blank or KEY='value' of a known key), then
# source it, then check every value. Without --image-dir the recipe is built alone.
load_image() {
    local env=$IMAGE_DIR/image.env n=0 line key i count dest p name
    [[ -n $IMAGE_DIR ]] || return 0
    [[ -f $env && ! -L $env ]] || die "--image-dir: no image.env in $IMAGE_DIR"
    [[ -z $(find "$IMAGE_DIR" -type l) ]] || die "--image-dir: $IMAGE_DIR holds symlinks: $(find "$IMAGE_DIR" -type l | head -n3 | paste -sd' ')"
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        [[ -z $line || $line == '#'* ]] && continue
        [[ $line =~ ^([A-Z][A-Z0-9_]*)=\'[^\']*\'$ ]] || die "image.env line $n: not KEY='value' (no quote inside)"
        key=${BASH_REMATCH[1]}
        [[ $key =~ $IMAGE_KEYS_RE ]] || die "image.env line $n: unknown key $key"
    done <"$env"
    # shellcheck source=/dev/null
    . "$env"
    [[ ${IMAGE_NAME:-} =~ $IMAGE_NAME_RE ]] || die "image.env IMAGE_NAME: '${IMAGE_NAME:-}' does not match $IMAGE_NAME_RE"
    [[ ${IMAGE_RECIPE:-} == "$RECIPE" ]] || die "image.env IMAGE_RECIPE: '${IMAGE_RECIPE:-}' is not --recipe $RECIPE"
    check_words IMAGE_PACKAGES "${IMAGE_PACKAGES:-}" "$PACKAGE_NAME_RE"
    check_words IMAGE_EXCLUDE "${IMAGE_EXCLUDE:-}" "$PACKAGE_NAME_RE"
    check_words IMAGE_REMOVE "${IMAGE_REMOVE:-}" "$PACKAGE_NAME_RE"
    check_words IMAGE_SERVICES_ENABLE "${IMAGE_SERVICES_ENABLE:-}" "$SERVICE_NAME_RE"
    check_words IMAGE_SERVICES_DISABLE "${IMAGE_SERVICES_DISABLE:-}" "$SERVICE_NAME_RE"
    check_words IMAGE_KERNEL_ARGS "${IMAGE_KERNEL_ARGS:-}" "$KERNEL_ARG_RE"
    for count in IMAGE_REPO_COUNT IMAGE_FILE_COUNT IMAGE_CHECK_COUNT; do
        valid_uint_range "${!count:-}" 0 "$IMAGE_ENTRIES_MAX" || die "image.env $count: '${!count:-}' is not 0 to $IMAGE_ENTRIES_MAX"
    done
    for ((i = 1; i <= IMAGE_REPO_COUNT; i++)); do
        [[ $(image_item REPO "$i" NAME) =~ $REPO_NAME_RE ]] || die "image.env IMAGE_REPO_${i}_NAME: not a repository name"
        valid_mirror_url "$(image_item REPO "$i" URL)" || die "image.env IMAGE_REPO_${i}_URL: $(mirror_url_problem "$(image_item REPO "$i" URL)")"
        check_words "IMAGE_REPO_${i}_SUITE" "$(image_item REPO "$i" SUITE)" "$REPO_NAME_RE"
        check_words "IMAGE_REPO_${i}_COMPONENTS" "$(image_item REPO "$i" COMPONENTS)" "$REPO_NAME_RE"
        check_bundle_file "IMAGE_REPO_${i}_KEY" "$(image_item REPO "$i" KEY)"
        [[ $(image_item REPO "$i" FINGERPRINT) =~ $GPG_FINGERPRINT_RE ]] || die "image.env IMAGE_REPO_${i}_FINGERPRINT: not 40 upper-case hex digits"
        [[ $(image_item REPO "$i" AUTH) == [01] ]] || die "image.env IMAGE_REPO_${i}_AUTH: not 0 or 1"
    done
    for ((i = 1; i <= IMAGE_FILE_COUNT; i++)); do
        check_bundle_file "IMAGE_FILE_${i}_SOURCE" "$(image_item FILE "$i" SOURCE)"
        dest=$(image_item FILE "$i" DEST)
        [[ $dest =~ $IMAGE_PATH_RE ]] || die "image.env IMAGE_FILE_${i}_DEST: '$dest' is not an absolute path of the image"
        for p in $IMAGE_PATH_FORBIDDEN; do
            [[ $dest != "$p" && $dest != "$p"/* ]] || die "image.env IMAGE_FILE_${i}_DEST: '$dest' is below $p"
        done
        [[ $(image_item FILE "$i" MODE) =~ $FILE_MODE_RE ]] || die "image.env IMAGE_FILE_${i}_MODE: not an octal mode"
        [[ $(image_item FILE "$i" OWNER) =~ $OWNER_RE ]] || die "image.env IMAGE_FILE_${i}_OWNER: not a user name"
        [[ $(image_item FILE "$i" GROUP) =~ $OWNER_RE ]] || die "image.env IMAGE_FILE_${i}_GROUP: not a group name"
    done
    for p in ${IMAGE_SCRIPTS:-}; do
        check_bundle_file IMAGE_SCRIPTS "$p"
        [[ $(head -c2 "$IMAGE_DIR/$p") == '#!' ]] || die "image.env IMAGE_SCRIPTS: $p does not start with #!"
    done
    IMAGE_CHECK_ARGS=()
    for ((i = 1; i <= IMAGE_CHECK_COUNT; i++)); do
        name=$(image_item CHECK "$i" NAME)
        [[ $name =~ $IMAGE_NAME_RE ]] || die "image.env IMAGE_CHECK_${i}_NAME: '$name' is not a check name"
        check_bundle_file "IMAGE_CHECK_${i}_COMMAND" "$(image_item CHECK "$i" COMMAND)"
        IMAGE_CHECK_ARGS+=(--check "$name" "$(<"$IMAGE_DIR/$(image_item CHECK "$i" COMMAND)")")
    done
    IMAGE_LOADED=1
}

# The index of the repository named $1 that takes credentials (AUTH=1), or nothing.
auth_repo_index() {
    local i
    for ((i = 1; i <= ${IMAGE_REPO_COUNT:-0}; i++)); do
        if [[ $(image_item REPO "$i" NAME) == "$1" && $(image_item REPO "$i" AUTH) == 1 ]]; then
            echo "$i"
            return 0
        fi
    done
}

# `build-image credentials`: stdin holds NAME<TAB>LOGIN<TAB>PASSWORD lines for the repositories with
# AUTH=1; kept root-only in $RUN_DIR/credentials for this build. Nothing of them is printed.
cmd_credentials() {
    local file line name rest login password n=0
    ((IMAGE_LOADED)) || die "credentials: no --image-dir: no repository takes credentials"
    file=$(credentials_file)
    # shellcheck disable=SC2064 # the path now: a refused line leaves nothing behind
    trap "[[ ! -e '$file.new' ]] || shred_file '$file.new'" EXIT
    (umask 077 && : >"$file.new")
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        [[ $line == *$'\t'*$'\t'* ]] || die "credentials: line $n is not NAME<TAB>LOGIN<TAB>PASSWORD"
        name=${line%%$'\t'*}
        rest=${line#*$'\t'}
        login=${rest%%$'\t'*}
        password=${rest#*$'\t'}
        [[ -n $(auth_repo_index "$name") ]] || die "credentials: line $n: '$name' is not a repository of the image that takes credentials"
        if [[ -z $login || -z $password || $login$password =~ [[:cntrl:]] ]]; then
            die "credentials: line $n ($name): an empty login or password, or a control character in one"
        fi
        printf '%s\t%s\t%s\n' "$name" "$login" "$password" >>"$file.new"
    done
    mv -f "$file.new" "$file"
    trap - EXIT
    echo "build-image: credentials of $n repositories kept root-only for this build" >&2
    progress result "\"status\":\"ok\""
}

# LOGIN<TAB>PASSWORD of repository $1 from the credentials file (nothing when it has none).
repo_credentials() {
    local file name rest
    file=$(credentials_file)
    [[ -r $file ]] || return 0
    while IFS=$'\t' read -r name rest; do
        if [[ $name == "$1" ]]; then
            printf '%s\n' "$rest"
            return 0
        fi
    done <"$file"
}

# Overwrite a file before unlinking it, so its bytes do not stay in the image's free blocks.
shred_file() {
    local size
    size=$(stat -c %s "$1")
    if ! shred -u "$1" 2>/dev/null; then
        dd if=/dev/zero of="$1" bs=1 count="$size" conv=notrunc,fsync status=none
        rm -f "$1"
    fi
}

# Remove the box's copies of the credentials ($RUN_DIR/credentials, the verify patterns, a recipe's
# private config): build-image's exit trap and abort call this. Those in the image go in clean.
forget_credentials() {
    local f
    [[ -n ${RUN_DIR:-} ]] || return 0
    for f in "$RUN_DIR"/credentials*; do
        [[ -e $f ]] && shred_file "$f"
    done
    return 0
}

# clean: the repository logins the packages phase wrote into the image's configuration.
clean_credentials() {
    ((IMAGE_LOADED)) || return 0
    recipe_forget_credentials
    echo "clean: repository logins removed from the image (overwritten, then unlinked)"
}

# --- phases ------------------------------------------------------------------------------------------

# packages: the definition's repositories (key checked against its pin before it is installed; a login
# only in the image's repository configuration, until clean), then install, exclude and remove.
phase_packages() {
    local i name url login_password
    ensure_root_mounted
    if ! ((IMAGE_LOADED)); then
        echo "packages: no image definition: the recipe's packages only"
        return 0
    fi
    chroot_enter
    for ((i = 1; i <= IMAGE_REPO_COUNT; i++)); do
        name=$(image_item REPO "$i" NAME)
        url=$(image_item REPO "$i" URL)
        check_gpg_fingerprint "$IMAGE_DIR/$(image_item REPO "$i" KEY)" "$(image_item REPO "$i" FINGERPRINT)"
        recipe_add_repository "$name" "$url" "$(image_item REPO "$i" SUITE)" \
            "$(image_item REPO "$i" COMPONENTS)" "$IMAGE_DIR/$(image_item REPO "$i" KEY)"
        if [[ $(image_item REPO "$i" AUTH) == 1 ]]; then
            login_password=$(repo_credentials "$name")
            [[ -n $login_password ]] || die "packages: repository $name needs credentials and none were handed over"
            recipe_repository_auth "$name" "$url" "${login_password%%$'\t'*}" "${login_password#*$'\t'}"
            echo "repository $name: login in the image's repository configuration until clean"
        fi
        echo "repository $name: $url"
    done
    recipe_packages "${IMAGE_PACKAGES:-}" "${IMAGE_EXCLUDE:-}" "${IMAGE_REMOVE:-}"
    chroot_leave
}

# A fresh, empty, root-only $IMAGE_STAGE in the image (its path on the box printed). The box writes
# there from outside the chroot, so no part of the path may be a symlink the image planted.
make_stage() {
    local d=$ROOT part
    for part in var tmp amibake-stage; do
        d+=/$part
        [[ ! -L $d ]] || die "the image's ${d#"$ROOT"} is a symlink: refusing to write through it"
    done
    rm -rf "${ROOT:?}$IMAGE_STAGE"
    mkdir -p "$ROOT/var/tmp"
    mkdir -m 0700 "$ROOT$IMAGE_STAGE"
    echo "$ROOT$IMAGE_STAGE"
}

# files: each file placed through the image's own view (chroot install): a symlink in the image
# cannot send it outside, the owner and group are the image's users.
phase_files() {
    local i stage
    ensure_root_mounted
    if ! ((IMAGE_LOADED)); then
        echo "files: no image definition"
        return 0
    fi
    stage=$(make_stage)
    for ((i = 1; i <= IMAGE_FILE_COUNT; i++)); do
        cp "$IMAGE_DIR/$(image_item FILE "$i" SOURCE)" "$stage/$i"
        in_chroot install -D -m "$(image_item FILE "$i" MODE)" -o "$(image_item FILE "$i" OWNER)" \
            -g "$(image_item FILE "$i" GROUP)" "$IMAGE_STAGE/$i" "$(image_item FILE "$i" DEST)"
    done
    rm -rf "$stage"
    echo "files: $IMAGE_FILE_COUNT placed"
}

# The definition's kernel arguments, added to the image's GRUB_CMDLINE_LINUX (the bootloader phase
# writes grub.cfg from it; intended_cmdline reads it for the first-boot checks).
add_kernel_args() {
    local grub=$ROOT/etc/default/grub arg current
    [[ -n ${IMAGE_KERNEL_ARGS:-} ]] || return 0
    [[ -f $grub ]] || die "provision: no /etc/default/grub in the image for the kernel arguments"
    current=$(sed -n 's/^GRUB_CMDLINE_LINUX="\(.*\)"$/\1/p' "$grub" | tail -n1)
    for arg in $IMAGE_KERNEL_ARGS; do
        [[ " $current " == *" $arg "* ]] || current+=" $arg"
    done
    sed -i "s|^GRUB_CMDLINE_LINUX=.*|GRUB_CMDLINE_LINUX=\"${current# }\"|" "$grub"
    echo "kernel arguments: ${current# }"
}

# provision: kernel arguments, services, then each script in order inside the image, network on, no
# daemon started (chroot_enter's policy-rc.d; systemctl in a chroot starts nothing), under a timeout.
phase_provision() {
    local s script rc
    ensure_root_mounted
    if ! ((IMAGE_LOADED)); then
        echo "provision: no image definition"
        return 0
    fi
    add_kernel_args
    chroot_enter
    for s in ${IMAGE_SERVICES_ENABLE:-}; do
        in_chroot systemctl enable "$s" || die "provision: service $s cannot be enabled (is its unit in the image?)"
    done
    for s in ${IMAGE_SERVICES_DISABLE:-}; do
        in_chroot systemctl disable "$s" || die "provision: service $s cannot be disabled (is its unit in the image?)"
    done
    make_stage >/dev/null
    for script in ${IMAGE_SCRIPTS:-}; do
        install -m 0755 "$IMAGE_DIR/$script" "$ROOT$IMAGE_STAGE/${script##*/}"
        echo "=== provision: $script"
        rc=0
        run timeout --kill-after=30 "$PROVISION_TIMEOUT_S" chroot "$ROOT" /usr/bin/env \
            "AMIBAKE_IMAGE=$IMAGE_NAME" "AMIBAKE_RECIPE=$RECIPE" "AMIBAKE_BUILD_ID=$BUILD_ID" \
            "$IMAGE_STAGE/${script##*/}" || rc=$?
        if ((rc == 124 || rc == 137)); then
            die "provision: script $script timed out after $PROVISION_TIMEOUT_S s"
        elif ((rc != 0)); then
            die "provision: script $script failed with exit code $rc"
        fi
    done
    rm -rf "${ROOT:?}$IMAGE_STAGE"
    chroot_leave
    echo "provision: ${IMAGE_SCRIPTS:-no script} done"
}

# verify: no repository password anywhere in the image: not in a file of the mounted tree, and not in
# the canvas's raw bytes (the whole disk: every partition and free block). XFS writes past the whole
# disk's page cache, so that cache is dropped first (BLKFLSBUF). Passwords go to grep through a
# root-only file, never argv; -z: NUL-separated records keep grep's memory small on a disk.
verify_no_secrets() {
    local file patterns hits name rest dev rc=0
    file=$(credentials_file)
    if [[ ! -s $file ]]; then
        vok "no repository credentials in this build"
        return 0
    fi
    patterns=$RUN_DIR/credentials-patterns
    (umask 077 && : >"$patterns")
    while IFS=$'\t' read -r name rest; do
        printf '%s\n' "${rest#*$'\t'}" >>"$patterns"
    done <"$file"
    hits=$(grep -rlsaF --devices=skip -f "$patterns" "$ROOT" | head -n5 | paste -sd' ' || true)
    dev=$(canvas_device)
    sync
    blockdev --flushbufs "$dev"
    grep -qzaF -f "$patterns" "$dev" || rc=$?
    shred_file "$patterns"
    if [[ -n $hits ]]; then
        vfail "a repository password is in the image: ${hits//$ROOT/}"
    elif ((rc == 0)); then
        vfail "a repository password is in the canvas's raw bytes (free blocks)"
    elif ((rc == 1)); then
        vok "no repository password in the image's files or raw bytes"
    else
        vfail "the canvas $dev could not be read to search it for the repository passwords (grep: $rc)"
    fi
}

# The expectations event's "checks": the definition's smoke checks as JSON.
image_checks_json() {
    local i out=""
    for ((i = 1; i <= ${IMAGE_CHECK_COUNT:-0}; i++)); do
        out+="${out:+,}{\"name\":$(json_str "$(image_item CHECK "$i" NAME)"),\"command\":$(json_str "$(<"$IMAGE_DIR/$(image_item CHECK "$i" COMMAND)")")}"
    done
    printf '[%s]' "$out"
}
