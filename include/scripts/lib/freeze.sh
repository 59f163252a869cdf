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

# Freeze every mounted filesystem of the canvas and start the guard; prints the mount points.
# Idempotent: a second call while frozen only reports the frozen mount points.
freeze_canvas() {
    local timeout=$1 state mps=() mp done_mps=()
    state=$(frozen_state)
    if [[ -s $state ]]; then
        mapfile -t mps <"$state"
        printf '%s\n' "${mps[@]}"
        return 0
    fi
    mapfile -t mps < <(device_mountpoints "$(canvas_device)")
    ((${#mps[@]})) || die "freeze: nothing of $VOLUME_ID ($(canvas_device)) is mounted"
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
    # setsid: the guard must outlive the SSH session (and its SIGHUP); fd 9 (the build lock) is closed.
    setsid bash "$SCRIPTS_DIR/lib/freeze-guard.sh" "$state" "$timeout" \
        </dev/null >>"$LOG_DIR/freeze-guard.log" 2>&1 9>&- &
    echo $! >"$(guard_pidfile)"
    printf '%s\n' "${mps[@]}"
}

# Thaw what freeze_canvas froze and stop the guard; prints the mount points. Idempotent.
thaw_canvas() {
    local state mps=()
    state=$(frozen_state)
    stop_guard
    [[ -e $state ]] || return 0
    mapfile -t mps <"$state"
    thaw_list ${mps[@]+"${mps[@]}"}
    rm -f "$state"
    printf '%s\n' ${mps[@]+"${mps[@]}"}
}

cmd_freeze() {
    local mps=()
    mapfile -t mps < <(freeze_canvas "$FREEZE_TIMEOUT")
    ((${#mps[@]})) || exit 1
    progress "\"event\":\"frozen\",\"mountpoints\":$(json_list "${mps[@]}"),\"guard_seconds\":$FREEZE_TIMEOUT"
}

cmd_thaw() {
    local mps=()
    mapfile -t mps < <(thaw_canvas)
    progress "\"event\":\"thawed\",\"mountpoints\":$(json_list ${mps[@]+"${mps[@]}"})"
}
