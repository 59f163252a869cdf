"""``./rehearse`` end to end, as a newcomer runs it: a killed run, a full run kept up for the UI and
stopped from another shell, and a run interrupted with Ctrl-C.

Slow (whole Debian builds, none booted: a few minutes each) and root (loop devices, mounts).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from operators.rules.contract import CONTRACT
from rehearsal import processes
from rehearsal.__main__ import STATE_FILE, _box_processes, _rehearsal_processes
from rehearsal.sshd import WORK_DIR_PREFIX

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the rehearsal needs root"),
]

REPO = Path(__file__).resolve().parents[2]


def backing_loops(state: Path) -> list[str]:
    """Loop devices whose image lives in the rehearsal's state dir."""
    out = subprocess.run(["losetup", "-nO", "NAME,BACK-FILE"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(state) in line]


def canvas_mounts(state: Path) -> list[str]:
    """Mounts of a loop device whose image lives in the rehearsal's state dir, in any mount namespace
    (the build mounts the canvas inside its box's own)."""
    loops = [line.split()[0] for line in backing_loops(state)]
    found = set()
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            lines = mountinfo.read_text().splitlines()
        except OSError:  # the process ended
            continue
        for fields in (line.split() for line in lines):
            source = fields[fields.index("-") + 2]
            if any(source.startswith(f"{loop}p") for loop in loops):
                found.add(f"{source} {fields[4]}")
    return sorted(found)


def mounts_under(*paths: str) -> list[str]:
    """Mount points below any of ``paths``."""
    out = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout
    return [t for t in out.splitlines() if t.startswith(paths)]


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` once a second until it holds; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(1)


def volume_links(volumes: list[str]) -> list[Path]:
    """The Nitro by-id links of these volumes that still exist."""
    return [
        link
        for vol in volumes
        if (
            link := Path("/dev/disk/by-id") / f"nvme-Amazon_Elastic_Block_Store_{vol.replace('-', '')}"
        ).is_symlink()
    ]


def test_a_killed_rehearsal_is_cleaned_up_by_the_next_which_builds_and_registers_an_ami(tmp_path, capsys):
    state = tmp_path / "state"
    cmd = [str(REPO / "rehearse"), "--state-dir", str(state)]

    # 1. a run killed with SIGKILL while the build has the canvas mounted: nothing of it is cleaned up
    started = time.monotonic()
    first = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    log = tmp_path / "second.log"
    second = None
    try:
        wait_for(lambda: canvas_mounts(state) or first.poll() is not None, 900, "the canvas was mounted")
        assert canvas_mounts(state), "the first run ended before it mounted its canvas"
        killed_after = time.monotonic() - started
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_sessions = [s[0] for s in json.loads((state / STATE_FILE).read_text())["sessions"]]
        assert processes.members(killed_sessions), "killing the harness should have left its services running"
        assert processes.holding([state])
        assert list(state.glob(f"{WORK_DIR_PREFIX}*")), "the killed run's sshd keys should still be there"
        killed_volumes = [p.stem for p in (state / "ebs").glob("vol-*.img")]
        assert killed_volumes

        # 2. the next run cleans that up first, runs the whole DAG and keeps Airflow up for the UI.
        # Without either boot: the green night of tests/e2e runs both in the same DAG, and the smoke
        # benchmark that ./run-tests runs after pytest runs the smoke instance and the unchanged next
        # night through this same rehearse() (it fails unless that night is green and builds nothing).
        started = time.monotonic()
        with log.open("wb") as sink:
            second = subprocess.Popen(
                cmd + ["--keep-running", "--no-boot-check", "--conf", "smoke_check=false"],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        kept = "Airflow keeps running"
        wait_for(lambda: kept in log.read_text() or second.poll() is not None, 2400, "the run ended")
        ran_for = time.monotonic() - started
        assert kept in log.read_text(), log.read_text()[-6000:]
        ui = re.search(r"Airflow UI: (http://127\.0\.0\.1:\d+)/", log.read_text())
        assert ui, log.read_text()[-3000:]
        with urllib.request.urlopen(f"{ui.group(1)}/api/v2/monitor/health", timeout=30) as health:
            assert health.status == 200  # still serving after the run

        # 3. `./rehearse stop` from another shell ends it; the run's own result still counts
        stop = subprocess.run(cmd + ["stop"], capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0 and "stopped and cleaned up" in stop.stdout, stop.stdout + stop.stderr
        assert second.wait(timeout=60) == 0, log.read_text()[-6000:]
        with capsys.disabled():
            print(f"\nrehearsal: first run killed after {killed_after:.0f} s, the next one took "
                  f"{ran_for:.0f} s (clean-up + whole run)")
    finally:  # never leave the machine dirty, even when an assertion above failed
        subprocess.run(cmd + ["stop"], capture_output=True, timeout=300)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    out = log.read_text()
    assert "cleaned up what an earlier rehearsal left behind" in out
    assert re.search(r"run manual__\S+: SUCCESS", out), out[-3000:]
    ami = re.search(r"AMI id:\s+(ami-[0-9a-f]{8,17})", out)
    snapshot = re.search(r"snapshot id:\s+(snap-[0-9a-f]{8,17})", out)
    assert ami and snapshot, out[-3000:]
    tasks = ("remote_chroot_build", "frozen_snapshot", "register_hvm_ami", "publish_manifest",
             "terminate_smoke_instance", "terminate_build_box", "delete_canvas")
    for task in tasks:
        assert re.search(rf"{task}\s+success", out), f"{task} did not succeed"
    for task in ("smoke_instance", "rotate_amis"):  # smoke_check off: the AMI stays unverified, unrotated
        assert re.search(rf"{task}\s+skipped", out), f"{task} was not skipped"
    assert "next night" not in out  # only a verified AMI lets a next night skip, so none is run

    # 4. nothing is left: processes, keys, loop devices, mounts, links, images, box work dirs
    backed = re.search(r"volumes backed by loop devices: (.*)", out)
    assert backed, out[-3000:]
    volumes = killed_volumes + re.findall(r"vol-[0-9a-f]{8,17}", backed.group(1))
    box_dirs = [f"{CONTRACT.box_work_dir}/{v}" for v in volumes]
    assert processes.members(killed_sessions) == []  # the killed run's services and all they forked
    assert _rehearsal_processes(state) == []
    assert processes.holding([state]) == {}  # nothing holds its logs
    assert list(state.glob(f"{WORK_DIR_PREFIX}*")) == []
    assert _box_processes(volumes) == []  # the killed run's build did not outlive it
    assert backing_loops(state) == []
    assert canvas_mounts(state) == []
    assert mounts_under(str(state), *box_dirs) == []
    assert volume_links(volumes) == []
    assert list((state / "ebs").glob("*.img")) == []
    assert list((state / "snapshots").glob("*")) == []  # the snapshot copies the smoke instance booted
    assert [d for d in box_dirs if Path(d).exists()] == []


def test_ctrl_c_mid_build_stops_everything_and_exits_130(tmp_path):
    """Ctrl-C while the build has the canvas mounted: the harness stops every service in order,
    removes loops, mounts and keys, says so, and exits 130."""
    state = tmp_path / "state"
    cmd = [str(REPO / "rehearse"), "--state-dir", str(state), "--no-boot-check"]
    log = tmp_path / "run.log"
    with log.open("wb") as sink:
        run = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: canvas_mounts(state) or run.poll() is not None, 900, "the canvas was mounted")
        assert canvas_mounts(state), log.read_text()[-3000:]
        volumes = [p.stem for p in (state / "ebs").glob("vol-*.img")]
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C sends: the terminal's whole foreground group
        assert run.wait(timeout=300) == 130, log.read_text()[-3000:]
        assert not (state / STATE_FILE).exists()  # removed by the run itself: nothing to clean up later
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        subprocess.run(cmd + ["stop"], capture_output=True, timeout=300)
    out = log.read_text()
    assert "interrupted: everything was stopped" in out
    assert "all processes, loop devices, mounts and links were removed" in out, out[-3000:]
    assert processes.holding([state]) == {}
    assert backing_loops(state) == [] and canvas_mounts(state) == []
    assert list(state.glob(f"{WORK_DIR_PREFIX}*")) == []
    assert list((state / "ebs").glob("*.img")) == []
    assert volumes and _box_processes(volumes) == []
    assert [v for v in volumes if (Path(CONTRACT.box_work_dir) / v).exists()] == []
