# shellcheck shell=bash
# Shared helpers of build-image: option validation, progress lines, the plan-aware command runner,
# and the mount/process clean-up every exit path uses.
# Written for bash 4.2 (CentOS 7): no namerefs, no ${x@Q}, empty arrays expanded with ${a[@]+...}.
# Never call a function that relies on errexit from `if`, `||` or `&&`: bash ignores errexit in its
# whole body then. Under pipefail never end a pipeline with `grep -q`: it may exit before the writer is done, and the
# writer's SIGPIPE then fails the pipeline (a found match reported as "not found").

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

# Emit one progress line: progress '"event":"x","k":...' (the body of a JSON object).
progress() {
    printf 'AMIBAKE {%s}\n' "$1" >&"$PROGRESS_FD"
}

# Seconds since the epoch with nanoseconds (bash 4.2 has no EPOCHREALTIME).
now() {
    date +%s.%N
}

# Elapsed seconds between two now() values, one decimal.
elapsed() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'
}

# Run a command, or, when AMIBAKE_PLAN names a file, only append its quoted command line there.
# The CentOS 7 recipe's yum/rpm/grub2 steps cannot run off an EL7 box; the plan lets tests assert them.
run() {
    if [[ -n ${AMIBAKE_PLAN:-} ]]; then
        local line
        printf -v line '%q ' "$@"
        printf '%s\n' "${line% }" >>"$AMIBAKE_PLAN"
        return 0
    fi
    echo "+ $*"
    # shellcheck disable=SC2034 # read by build-image's ERR trap to name the failed command
    RUN_CMD="$*"
    "$@"
}

# --- validation -------------------------------------------------------------------------------

valid_volume_id() { [[ $1 =~ ^vol-([0-9a-f]{8}|[0-9a-f]{17})$ ]]; }
valid_device_name() { [[ $1 =~ ^/dev/(sd|xvd)[b-z]$ ]]; }
valid_uint_range() { [[ $1 =~ ^[0-9]{1,6}$ ]] && ((10#$1 >= $2 && 10#$1 <= $3)); }
valid_url() { [[ $1 =~ ^(https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|file://)(/[A-Za-z0-9._~%+/-]*)?$ ]]; }
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
