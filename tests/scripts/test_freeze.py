"""freeze / thaw around the snapshot, and the box-side guard that thaws if nobody does (root).

Bounded waits only: a write to a frozen filesystem blocks until it is thawed, so "the write
completed" is the observable proof of a thaw; the bounds are generous, nothing is timed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from loopdisk import run_build

from rehearsal.processes import running as pid_alive

pytestmark = pytest.mark.root


def start_write(path: Path) -> subprocess.Popen:
    """Write and fsync a file in the background (blocks while its filesystem is frozen)."""
    return subprocess.Popen(["sh", "-c", f"echo written > {path} && sync {path}"])


def wait_until(cond, timeout: float) -> bool:
    """Poll cond until true or timeout (a bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


@pytest.fixture
def mounted(make_volume):
    """A volume partitioned, formatted and mounted by build-image."""
    vol = make_volume(size_gib=1)
    assert run_build(vol, "partition", "mkfs", "mount").rc == 0
    return vol


def test_guard_thaws_when_nobody_does(mounted) -> None:
    """freeze with a 3 s limit and no thaw: the guard thaws, a blocked write completes."""
    vol = mounted
    root = vol.work / "root"
    res = run_build(vol, "--freeze-timeout", "3", "freeze", timeout=120)
    assert res.rc == 0, res.stderr
    assert res.events == [{"event": "frozen", "mountpoints": [str(root)], "guard_seconds": 3}]
    guard = int((vol.work / "run" / "guard.pid").read_text())
    writer = start_write(root / "after-freeze")
    try:
        assert writer.wait(timeout=120) == 0
    finally:
        if writer.poll() is None:
            subprocess.run(["xfs_freeze", "-u", str(root)])
            writer.wait()
    assert (root / "after-freeze").read_text() == "written\n"
    assert wait_until(lambda: not pid_alive(guard), 30)
    assert not (vol.work / "run" / "frozen").exists()
    assert "nobody thawed within 3s" in (vol.work / "logs" / "freeze-guard.log").read_text()
    again = run_build(vol, "thaw", timeout=120)
    assert again.rc == 0 and again.events == [{"event": "thawed", "mountpoints": []}]


def test_thaw_stops_the_guard_and_is_idempotent(mounted) -> None:
    """thaw unfreezes at once and ends the guard; a second freeze or thaw changes nothing."""
    vol = mounted
    root = vol.work / "root"
    assert run_build(vol, "--freeze-timeout", "600", "freeze", timeout=120).rc == 0
    guard = int((vol.work / "run" / "guard.pid").read_text())
    assert pid_alive(guard)
    assert os.getsid(guard) == guard, "the guard must lead its own session to outlive SSH"
    twice = run_build(vol, "--freeze-timeout", "600", "freeze", timeout=120)
    assert twice.events == [{"event": "frozen", "mountpoints": [str(root)], "guard_seconds": 600}]
    assert int((vol.work / "run" / "guard.pid").read_text()) == guard
    writer = start_write(root / "during-freeze")
    try:
        thawed = run_build(vol, "thaw", timeout=120)
        assert thawed.rc == 0
        assert thawed.events == [{"event": "thawed", "mountpoints": [str(root)]}]
        assert writer.wait(timeout=120) == 0
    finally:
        if writer.poll() is None:
            subprocess.run(["xfs_freeze", "-u", str(root)])
            writer.wait()
    assert wait_until(lambda: not pid_alive(guard), 30)
    again = run_build(vol, "thaw", timeout=120)
    assert again.events == [{"event": "thawed", "mountpoints": []}]


def test_freeze_needs_a_mounted_canvas(make_volume) -> None:
    """Nothing mounted: freeze fails and says so, and leaves no guard."""
    vol = make_volume(size_gib=1)
    assert run_build(vol, "partition", "mkfs").rc == 0
    res = run_build(vol, "freeze")
    assert res.rc != 0
    assert f"freeze: nothing of {vol.volume_id}" in res.stderr
    assert not (vol.work / "run" / "guard.pid").exists()


def test_umount_of_a_frozen_canvas_thaws_first(mounted) -> None:
    """A frozen filesystem cannot be unmounted: umount (and a retry's disk phases) thaw it first."""
    vol = mounted
    assert run_build(vol, "--freeze-timeout", "600", "freeze", timeout=120).rc == 0
    guard = int((vol.work / "run" / "guard.pid").read_text())
    res = run_build(vol, "umount", timeout=120)
    assert res.rc == 0, res.stderr
    assert vol.mountpoints() == []
    assert wait_until(lambda: not pid_alive(guard), 30)
    assert not (vol.work / "run" / "frozen").exists()
