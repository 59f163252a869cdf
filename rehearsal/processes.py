"""The processes a rehearsal (or a test) started: found and ended even after the harness was SIGKILLed.

Every service of a rehearsal (the local EC2 API, sshd, Airflow's processes) runs in a session of its
own, and whatever it forks stays in that session. A session is recorded as its leader's pid (the
session id) and the leader's start time: Linux does not hand out a pid again while a process still
has it as its session id, and the start time tells our leader from a later process that got its pid.

This finds what an environment marker cannot: Airflow's api-server, executor workers and log
servers rewrite their process title over their environment, so ``/proc/<pid>/environ`` reads empty.
``holding`` finds processes by what they have open instead (their logs), for leak checks;
``python -m rehearsal.processes`` runs that check for ``run-tests``.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

#: (session id = the leader's pid, the leader's start time in clock ticks since boot)
Session = tuple[int, int]


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state, ppid, pgrp, session, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def running(pid: int) -> bool:
    """Whether a process exists and is not a zombie waiting to be reaped."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def session_id(pid: int) -> int | None:
    """The session a process belongs to, or None when it is gone."""
    fields = _stat(pid)
    return int(fields[3]) if fields else None


def start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot), or None when it is gone."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of the children it has reaped (user + system), 0 when it is gone."""
    fields = _stat(pid)
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def record(pid: int) -> Session:
    """The record of a session whose leader ``pid`` was just started (``start_new_session``)."""
    started = start_time(pid)
    if started is None:
        raise ProcessLookupError(f"process {pid} is gone")
    return (pid, started)


def still_ours(sessions: Iterable[Session]) -> set[int]:
    """Ids of the recorded sessions that may still have members: the leader has exited, or it is
    still the process that was recorded (not a newer one with the same pid)."""
    return {sid for sid, started in sessions if start_time(sid) in (None, started)}


def members(session_ids: Iterable[int]) -> list[int]:
    """Live (not zombie) processes in any of these sessions, except this process."""
    wanted = set(session_ids)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        fields = _stat(int(proc.name))
        if fields and fields[0] != "Z" and int(fields[3]) in wanted:
            found.append(int(proc.name))
    return sorted(found)


def terminate(find: Callable[[], list[int]], grace: float = 15.0) -> list[int]:
    """SIGTERM every process ``find`` returns, SIGKILL what it returns after ``grace`` s (asking
    again catches what they forked meanwhile); returns what is still there after that."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in find():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while find() and time.monotonic() < deadline:
            time.sleep(0.2)
    return find()


def end(session_ids: Iterable[int], grace: float = 15.0) -> list[int]:
    """End every member of these sessions (see ``terminate``)."""
    ids = set(session_ids)
    return terminate(lambda: members(ids), grace)


def _ancestry() -> set[int]:
    """This process and its ancestors (a leak check must not count the shell that runs it)."""
    pid, found = os.getpid(), set()
    while pid > 1 and pid not in found:
        found.add(pid)
        fields = _stat(pid)
        pid = int(fields[1]) if fields else 0
    return found


def holding(paths: Sequence[Path], started_after: int = 0) -> dict[int, str]:
    """Live processes (pid → command line) whose working dir or an open file lies under one of
    ``paths``, among those started after ``started_after`` (clock ticks since boot), except this
    process and its ancestors: whatever a service's title or environment says, it still holds its log."""
    roots = [str(p) for p in paths]
    mine = _ancestry()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        fields = _stat(int(proc.name))
        if not fields or fields[0] == "Z" or int(fields[19]) <= started_after:
            continue
        try:
            targets = [os.readlink(link) for link in (proc / "cwd", *(proc / "fd").iterdir())]
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            name = f"[{(proc / 'comm').read_text().strip()}]"  # when the command line reads empty
        except OSError:
            continue
        if any(t == root or t.startswith(f"{root}/") for t in targets for root in roots):
            found[int(proc.name)] = cmdline or name
    return found


def main(argv: list[str] | None = None) -> int:
    """Name the processes that started after a given time and still hold one of the paths after a
    grace period (one being stopped may take a moment); exit 1 if there are any. They are left
    running: one may be somebody's own work in the same checkout."""
    parser = argparse.ArgumentParser(prog="python -m rehearsal.processes", description=main.__doc__)
    parser.add_argument("--started-after", type=int, required=True, help="clock ticks since boot")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds to wait for them to exit")
    parser.add_argument("paths", type=Path, nargs="+")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.grace
    while (left := holding(args.paths, args.started_after)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid, cmdline in sorted(left.items()):
        print(f"process {pid}: {cmdline[:160]}")
    return 1 if left else 0


if __name__ == "__main__":
    raise SystemExit(main())
