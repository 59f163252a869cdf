"""Disk phases on real loop devices: partition, mkfs (CentOS 7 feature bits), mount, re-runs,
failure reports, and clean-up on SIGTERM and on abort (root)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopdisk import BUILD_IMAGE, LoopVolume, build_image_cmd, parse_output, run_build

pytestmark = pytest.mark.root


def blkid(dev: str, tag: str) -> str:
    """A filesystem tag read from the disk itself (no cache)."""
    return subprocess.run(["blkid", "-p", "-o", "value", "-s", tag, dev], capture_output=True,
                          text=True).stdout.strip()


def test_centos7_disk_phases_for_real(make_volume) -> None:
    """GPT with bios_grub + xfs root whose feature bits a 3.10 kernel and grub 2.02 can read."""
    vol = make_volume(size_gib=2)
    res = run_build(vol, "resolve", "partition", "mkfs", "mount", recipe="centos7")
    assert res.rc == 0, res.stderr + "\n".join(res.other_stdout)
    assert res.phases("phase-end") == ["resolve", "partition", "mkfs", "mount"]
    assert all(isinstance(e["seconds"], float) for e in res.events if e["event"] == "phase-end")
    assert res.result == {"event": "result", "status": "ok"}

    table = subprocess.run(["parted", "-sm", vol.device, "unit", "MiB", "print"], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert table[1].split(":")[5] == "gpt"
    assert table[2].startswith("1:1.00MiB:2.00MiB:") and "bios_grub" in table[2].split(":")[6]
    assert table[3].startswith("2:2.00MiB:2047MiB:") and table[3].split(":")[4] == "xfs"

    feats = subprocess.run(
        ["xfs_db", "-r", "-c", "sb 0", "-c", "p features_ro_compat features_incompat", vol.partition(2)],
        capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    assert feats[:2] == ["features_ro_compat = 0", "features_incompat = 0x1"]
    assert blkid(vol.partition(2), "LABEL") == "root"
    assert vol.mountpoints() == [str(vol.work / "root")]

    res = run_build(vol, "umount", recipe="centos7")
    assert res.rc == 0
    assert vol.mountpoints() == []


def test_debian_defaults_would_not_suit_centos7(make_volume) -> None:
    """The check is real: this box's default mkfs.xfs makes features CentOS 7 cannot mount."""
    vol = make_volume(size_gib=1)
    assert run_build(vol, "partition", "mkfs").rc == 0  # debian12 recipe: default features
    res = run_build(vol, "verify", recipe="centos7")
    assert res.rc != 0
    log = (vol.work / "logs" / "verify.log").read_text()
    assert "xfs features of" in log and "the centos7 target kernel needs 'ro_compat=0 incompat=0x1'" in log


def test_rerun_after_a_failed_try(make_volume) -> None:
    """partition+mkfs+mount re-run over what a killed try left (mounted root and a bind mount)."""
    vol = make_volume(size_gib=1)
    assert run_build(vol, "partition", "mkfs", "mount").rc == 0
    root = vol.work / "root"
    (root / "left-by-first-try").write_text("x")
    (root / "dev").mkdir()
    subprocess.run(["mount", "--bind", "/dev", str(root / "dev")], check=True)  # as a killed chroot phase
    first_uuid = blkid(vol.partition(2), "UUID")

    res = run_build(vol, "partition", "mkfs", "mount")
    assert res.rc == 0, res.stderr
    assert blkid(vol.partition(2), "UUID") != first_uuid
    assert not (root / "left-by-first-try").exists()
    assert vol.mountpoints() == [str(root)]
    mounts = Path("/proc/self/mountinfo").read_text()
    assert f" {root}/dev " not in mounts


def test_failure_names_the_phase_and_shows_the_log(make_volume) -> None:
    """A failing phase: phase-fail with rc and log, the log's tail on stdout, one line on stderr."""
    vol = make_volume(size_gib=1)
    res = run_build(vol, "mkfs")
    assert res.rc == 1
    fail = next(e for e in res.events if e["event"] == "phase-fail")
    assert fail["phase"] == "mkfs" and fail["rc"] == 1 and fail["log"] == str(vol.work / "logs" / "mkfs.log")
    assert res.result == {"event": "result", "status": "fail", "phase": "mkfs", "rc": 1}
    assert any("phase mkfs (recipe debian12" in line for line in res.other_stdout)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("build-image: phase mkfs failed (exit code 1): ")
    assert "run the partition phase first" in lines[0]


def test_a_failing_command_fails_its_phase(make_volume) -> None:
    """errexit holds inside every phase: debootstrap failing on a dead mirror fails bootstrap itself."""
    vol = make_volume(size_gib=1)
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again at once: connections are refused
    mirror = f"http://127.0.0.1:{port}/debian"
    res = run_build(vol, "--mirror", mirror, "partition", "mkfs", "mount", "bootstrap")
    assert res.rc != 0
    assert res.phases("phase-end") == ["partition", "mkfs", "mount"]
    assert res.phases("phase-fail") == ["bootstrap"]
    assert res.result == {"event": "result", "status": "fail", "phase": "bootstrap", "rc": res.rc}
    assert "phase bootstrap: 'debootstrap --variant=minbase" in res.stderr
    assert any("Failed getting release file" in line for line in res.other_stdout)
    assert vol.mountpoints() == []


@pytest.fixture
def hanging_mirror() -> Iterator[tuple[str, threading.Event]]:
    """An HTTP 'mirror' on 127.0.0.1 that accepts connections and never answers (a stalled download)."""
    server = socket.create_server(("127.0.0.1", 0))
    connected = threading.Event()
    conns: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conns.append(conn)
            connected.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/debian", connected
    finally:
        stop.set()
        thread.join()
        for conn in conns:
            conn.close()
        server.close()


def start_stalled_build(vol: LoopVolume, mirror: str, connected: threading.Event) -> subprocess.Popen:
    """A build that is inside debootstrap, waiting on the stalled mirror."""
    proc = subprocess.Popen(
        build_image_cmd(vol, "--mirror", mirror, "partition", "mkfs", "mount", "bootstrap"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    if not connected.wait(timeout=120):
        proc.kill()
        proc.communicate()
        pytest.fail("debootstrap never contacted the mirror")
    return proc


def processes_using(path: Path) -> list[str]:
    """Command lines of processes mentioning path (a stray debootstrap or wget would)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line and "ps -eo" not in line]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)],
                         ids=["TERM", "HUP", "INT"])
def test_signal_runs_the_cleanup(make_volume, hanging_mirror, sig: signal.Signals, code: int) -> None:
    """A signal mid-debootstrap (task killed, SSH gone): fail result, no mount, no child process left."""
    mirror, connected = hanging_mirror
    vol = make_volume(size_gib=1)
    proc = start_stalled_build(vol, mirror, connected)
    try:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    events, _ = parse_output(out)
    name = sig.name.removeprefix("SIG")
    assert proc.returncode == code, err
    assert events[-1] == {"event": "result", "status": "fail", "phase": "bootstrap", "rc": code,
                          "signal": name}
    assert f"received SIG{name} during phase bootstrap" in err
    assert vol.mountpoints() == []
    assert processes_using(vol.work) == []
    assert not (vol.work / "run" / "pid").exists()
    # The lock is free again: a retry can start.
    assert run_build(vol, "mount").rc == 0


def test_abort_stops_a_running_build(make_volume, hanging_mirror) -> None:
    """A second build on the volume is refused (lock); abort stops the first and cleans up."""
    mirror, connected = hanging_mirror
    vol = make_volume(size_gib=1)
    proc = start_stalled_build(vol, mirror, connected)
    try:
        second = run_build(vol, "mount")
        assert second.rc != 0
        assert "another build-image holds" in second.stderr
        aborted = run_build(vol, "abort")
        assert aborted.rc == 0, aborted.stderr
        assert aborted.result == {"event": "result", "status": "aborted"}
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    assert vol.mountpoints() == []
    assert processes_using(vol.work) == []
    assert run_build(vol, "mount").rc == 0


def test_build_image_runs_from_any_directory(make_volume, tmp_path: Path) -> None:
    """The operator runs it by absolute path from its home directory: no reliance on the cwd."""
    vol = make_volume(size_gib=1)
    proc = subprocess.run(
        ["bash", str(BUILD_IMAGE), "--recipe", "debian12", "--volume-id", vol.volume_id, "--size-gib", "1",
         "--work-dir", str(vol.work), "resolve"],
        cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr


def test_abort_after_the_build_was_killed(make_volume, hanging_mirror) -> None:
    """The build killed with SIGKILL (no trap runs): abort stops its orphaned phase and cleans up."""
    mirror, connected = hanging_mirror
    vol = make_volume(size_gib=1)
    proc = start_stalled_build(vol, mirror, connected)
    proc.kill()
    proc.communicate(timeout=60)
    assert processes_using(vol.work), "the phase should outlive its killed parent (its own session)"
    aborted = run_build(vol, "abort")
    assert aborted.rc == 0, aborted.stderr
    assert vol.mountpoints() == []
    assert processes_using(vol.work) == []
    assert run_build(vol, "mount").rc == 0
