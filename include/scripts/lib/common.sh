# shellcheck shell=bash
# Shared helpers of build-image: option validation (the rules of contract.env), progress lines, the
# command runner, and the mount/process clean-up every exit path uses.
# Written for bash 4.2 (CentOS 7): no namerefs, no ${x@Q}, empty arrays expanded with ${a[@]+...}.
# Never call a function that relies on errexit from `if`, `||` or `&&`: bash ignores errexit in its
# whole body then. Under pipefail never end a pipeline with `grep -q`: it may exit before the writer is done, and the
# writer's SIGPIPE then fails the pipeline (a found match reported as "not found").

# Needs contract.env sourced first (build-image does): the contract with the Airflow side.

# Progress lines go to fd 3 (the caller's stdout); everything else to logs or stderr.
PROGRESS_FD=3

# Print a one-line error naming the context and exit non-zero.
die() {
    echo "build-image: $*" >&2
    exit 1
}

# JSON string literal of $1 (escapes backslash, quote and control characters).
json_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    printf '"%s"' "$s"
}

# JSON array of strings from the arguments.
json_list() {
    local out="" item
    for item in "$@"; do
        out+="${out:+,}$(json_str "$item")"
    done
    printf '[%s]' "$out"
}

# Emit one progress line: progress EVENT ['"k":v,...'] (the rest of the JSON object). EVENT must be one
# of contract.env's PROGRESS_EVENTS: the Airflow side reads exactly those.
progress() {
    local event=$1 rest=${2:-}
    [[ " $PROGRESS_EVENTS " == *" $event "* ]] || die "progress: '$event' is not in contract.env PROGRESS_EVENTS"
    printf '%s{"event":"%s"%s}\n' "$PROGRESS_PREFIX" "$event" "${rest:+,$rest}" >&"$PROGRESS_FD"
}

# Seconds since the epoch with nanoseconds (bash 4.2 has no EPOCHREALTIME).
now() {
    date +%s.%N
}

# Elapsed seconds between two now() values, one decimal.
elapsed() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'
}

# Run a command, echoing it to the phase log first; a failure is named by the phase's ERR trap.
# (Tests of steps that need an EL7 box put recording stand-ins for yum, rpm, chroot... first on PATH:
# this function has no test mode.)
run() {
    echo "+ $*"
    # shellcheck disable=SC2034 # read by build-image's ERR trap to name the failed command
    RUN_CMD="$*"
    "$@"
}

# --- validation -------------------------------------------------------------------------------

# The patterns are contract.env's (sourced by build-image), the same ones the Airflow side applies.
valid_volume_id() { [[ $1 =~ $VOLUME_ID_RE ]]; }
valid_device_name() { [[ $1 =~ $DEVICE_NAME_RE ]]; }
valid_uint_range() { [[ $1 =~ $UINT_RE ]] && ((10#$1 >= $2 && 10#$1 <= $3)); }
valid_mirror_url() { ((${#1} <= MIRROR_URL_MAX)) && [[ $1 =~ $MIRROR_URL_RE ]]; }

# Why a mirror URL is refused, without repeating credentials (operators/rules/validation.py gives
# the same reasons).
mirror_url_problem() {
    local url=$1 scheme rest authority
    scheme=${url%%://*}
    rest=${url#*://}
    authority=${rest%%/*}
    if ((${#url} > MIRROR_URL_MAX)); then
        echo "longer than $MIRROR_URL_MAX characters"
    elif [[ $url != *://* || ($scheme != http && $scheme != https) ]]; then
        echo "'$url' does not start with http:// or https://"
    elif [[ $authority == *@* ]]; then
        echo "'$scheme://***@${authority##*@}${rest:${#authority}}' holds credentials (user:password@); give the box a mirror it can read without"
    elif [[ $rest == *[?=#]* ]]; then
        echo "'$url' has a query or fragment (?, = or #)"
    else
        echo "'$url' is not http(s)://host[:port][/path] with letters, digits and ._~%+-/ in the path"
    fi
}
valid_abs_path() { [[ $1 =~ ^/[A-Za-z0-9._/+-]*$ && $1 != *..* && $1 != / ]]; }

# --- processes and mounts ---------------------------------------------------------------------

# Kill a process and all its descendants (children first so none is re-parented and missed).
kill_tree() {
    local pid=$1 sig=${2:-TERM} child children
    children=$(pgrep -P "$pid" 2>/dev/null || true)
    for child in $children; do
        kill_tree "$child" "$sig"
    done
    kill "-$sig" "$pid" 2>/dev/null || true
}

# Kill every process whose root or working directory is inside $1 (daemons a package script
# started in the chroot, a tool left working there): they would keep the mount busy.
kill_chroot_procs() {
    local root=$1 p link cwd pids=() try
    for try in 1 2 3 4 5 6; do
        pids=()
        for p in /proc/[0-9]*; do
            [[ ${p#/proc/} == "$$" || ${p#/proc/} == "$BASHPID" ]] && continue
            link=$(readlink "$p/root" 2>/dev/null) || continue
            cwd=$(readlink "$p/cwd" 2>/dev/null) || true
            if [[ $link == "$root" || $link == "$root"/* || $cwd == "$root" || $cwd == "$root"/* ]]; then
                pids+=("${p#/proc/}")
            fi
        done
        ((${#pids[@]})) || return 0
        echo "killing processes inside $root: ${pids[*]}"
        if ((try < 4)); then kill -TERM "${pids[@]}" 2>/dev/null || true; else kill -KILL "${pids[@]}" 2>/dev/null || true; fi
        sleep 1
    done
    die "processes still running inside $root: ${pids[*]}"
}

# Mount points at or below $1 from /proc/self/mountinfo, deepest first.
mounts_below() {
    local base=$1
    awk -v b="$base" '$5 == b || index($5, b "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r -u
}

# Unmount everything below $1 (and $1 itself when $2 is "with-root"), deepest first.
# Processes inside the tree are killed first so nothing holds a mount ("target is busy").
unmount_below() {
    local base=$1 with_root=${2:-} mp try
    [[ -d $base ]] || return 0
    kill_chroot_procs "$base"
    while read -r mp; do
        [[ -n $mp ]] || continue
        if [[ $mp == "$base" && $with_root != with-root ]]; then
            continue
        fi
        for try in 1 2 3 4 5; do
            if umount "$mp" 2>/dev/null; then
                break
            fi
            if ((try == 5)); then
                fuser -vm "$mp" >&2 || true
                die "cannot unmount $mp (busy)"
            fi
            sleep 1
        done
    done < <(mounts_below "$base")
}

# Fail unless KEYFILE holds exactly one OpenPGP key, with fingerprint FPR (40 hex, no spaces), read
# without importing it anywhere (gpg --show-keys; gpg before 2.2.8, CentOS 7's 2.0, lacks the option
# and prints the same listing for --with-fingerprint FILE).
check_gpg_fingerprint() {
    local keyfile=$1 want=$2 got home show=(--show-keys)
    home=$(mktemp -d)
    GNUPGHOME=$home gpg --dump-options | grep -qx -- --show-keys || show=(--with-fingerprint)
    got=$(GNUPGHOME=$home gpg --batch --with-colons "${show[@]}" "$keyfile" 2>/dev/null |
        awk -F: '$1 == "pub" { pub = 1; next } $1 == "fpr" && pub { print $10; pub = 0 }' | paste -sd' ') || got=""
    rm -rf "$home"
    [[ $got == "$want" ]] || die "GPG key $keyfile has fingerprint '${got:-none}', expected $want"
    echo "GPG key $keyfile: fingerprint $got as expected"
}
