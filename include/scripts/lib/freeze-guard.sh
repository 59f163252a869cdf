#!/usr/bin/env bash
# freeze-guard STATE_FILE SECONDS: detached by `build-image freeze`; after SECONDS it thaws every mount
# point listed in STATE_FILE unless `thaw` removed the file (and stopped this guard) first.
set -euo pipefail

state=${1:?state file}
seconds=${2:?seconds}
[[ $seconds =~ ^[0-9]+$ ]] || { echo "freeze-guard: bad seconds '$seconds'" >&2; exit 2; }

# Sleep in the background so a TERM from `thaw` ends the guard at once.
sleep "$seconds" &
wait $! || exit 0

[[ -e $state ]] || exit 0
echo "$(date -u +%FT%TZ) freeze-guard: nobody thawed within ${seconds}s, thawing"
while read -r mp; do
    [[ -n $mp ]] || continue
    if xfs_freeze -u "$mp"; then
        echo "thawed $mp"
    else
        echo "could not thaw $mp (already thawed?)"
    fi
done <"$state"
rm -f "$state"
