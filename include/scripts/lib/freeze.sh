# shellcheck shell=bash
# freeze / thaw of the canvas filesystems around CreateSnapshot, with a detached guard that thaws
# them after FREEZE_TIMEOUT seconds if nobody calls thaw (a filesystem left frozen hangs the box).
# State: $RUN_DIR/frozen (one mount point a line) and $RUN_DIR/guard.pid.

# Thaw the given mount points; a point already thawed (by the guard or an earlier thaw) is fine.
thaw_list() {
    local mp
    for mp in "$@"; do
        xfs_freeze -u "$mp" 2>/dev/null || true
    done
}

frozen_state() { echo "$RUN_DIR/frozen"; }
guard_pidfile() { echo "$RUN_DIR/guard.pid"; }

# Stop the guard if it is (still) ours and running.
stop_guard() {
    local pidfile pid
    pidfile=$(guard_pidfile)
    [[ -r $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if [[ $pid =~ ^[0-9]+$ ]] && grep -qa freeze-guard "/proc/$pid/cmdline" 2>/dev/null; then
        kill_tree "$pid"
    fi
    rm -f "$pidfile"
}

# Freeze every mounted filesystem of the canvas and start the guard; the state file lists them.
# Idempotent: a second call while frozen changes nothing.
freeze_canvas() {
    local timeout=$1 state mps=() mp done_mps=() found
    state=$(frozen_state)
    [[ -s $state ]] && return 0
    resolve_canvas
    found=$(device_mountpoints "$CANVAS_DEV")
    [[ -n $found ]] || die "freeze: nothing of $VOLUME_ID ($CANVAS_DEV) is mounted"
    mapfile -t mps <<<"$found"
    sync
    # Record first, so thaw (or the guard) knows every mount point even if we die half-way.
    printf '%s\n' "${mps[@]}" >"$state"
    for mp in "${mps[@]}"; do
        if ! xfs_freeze -f "$mp"; then
            thaw_list ${done_mps[@]+"${done_mps[@]}"}
            rm -f "$state"
            die "freeze: xfs_freeze -f $mp failed"
        fi
        done_mps+=("$mp")
    done
    # setsid: the guard must outlive the SSH session (and its SIGHUP). It keeps neither the build
    # lock (fd 9) nor the progress pipe (fd 3), or the caller would wait for it to end.
    setsid bash "$SCRIPTS_DIR/lib/freeze-guard.sh" "$state" "$timeout" \
        </dev/null >>"$LOG_DIR/freeze-guard.log" 2>&1 3>&- 9>&- &
    echo $! >"$(guard_pidfile)"
}

# Thaw what freeze_canvas froze, then stop the guard; THAWED lists the mount points. Idempotent.
# The guard goes last: if this is killed half-way (a clean-up after a lost session), it still thaws.
THAWED=()
thaw_canvas() {
    local state
    state=$(frozen_state)
    THAWED=()
    if [[ -e $state ]]; then
        mapfile -t THAWED <"$state"
        thaw_list ${THAWED[@]+"${THAWED[@]}"}
        rm -f "$state"
    fi
    stop_guard
}

cmd_freeze() {
    local mps=()
    freeze_canvas "$FREEZE_TIMEOUT"
    mapfile -t mps <"$(frozen_state)"
    progress frozen "\"mountpoints\":$(json_list "${mps[@]}"),\"guard_seconds\":$FREEZE_TIMEOUT"
}

cmd_thaw() {
    thaw_canvas
    progress thawed "\"mountpoints\":$(json_list ${THAWED[@]+"${THAWED[@]}"})"
}
