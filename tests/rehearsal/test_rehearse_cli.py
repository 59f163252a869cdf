"""The rehearsal's command line and its clean-up of what an earlier run left (real processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from operators import defaults
from operators.rules import definition
from rehearsal import images, processes
from rehearsal.__main__ import (
    DEFAULT_IMAGE,
    STATE_FILE,
    _box_processes,
    _marked_processes,
    _parse_args,
    available_images,
    clean_up_earlier,
    images_folder,
    kill_box_processes,
)
from rehearsal.airflow_env import MARKER_ENV
from rehearsal.aptrepo import GNUPGHOME_PREFIX
from rehearsal.sshd import WORK_DIR_PREFIX, package_cache


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--api-port", "70000"], "--api-port"),
        (["--timeout", "0"], "--timeout"),
        (["--conf", "no_equals_sign"], "--conf"),
        (["--image", "centos9"], "--image"),
        (["--image", "../images/debian12"], "--image"),
        (["--recipe", "debian12"], "--recipe"),  # gone: the definition says its recipe
        (["restart"], "action"),
    ],
)
def test_bad_arguments_are_refused_naming_the_option(argv, field, capsys):
    """argparse exits 2 with a message that names the offending option, before anything starts."""
    with pytest.raises(SystemExit) as exc:
        _parse_args(argv)
    assert exc.value.code == 2
    assert field in capsys.readouterr().err


def test_arguments_become_options(tmp_path):
    """Defaults are the customized Debian definition with its boot check; --conf values are JSON or
    plain strings; --image picks any product definition, and with it the DAG."""
    action, opts = _parse_args(
        ["--state-dir", str(tmp_path), "--conf", "canvas_size_gib=4", "--conf", "mirror_url=http://m/x"]
    )
    assert action == "run"
    assert (opts.image, opts.boot_check, opts.state_dir) == ("rehearsal-debian12", True, tmp_path.resolve())
    assert opts.dag_id == "amibake_rehearsal-debian12"
    assert opts.conf == {"canvas_size_gib": 4, "mirror_url": "http://m/x"}
    assert opts.package_cache == package_cache()
    assert _parse_args(["--no-package-cache"])[1].package_cache is None
    assert _parse_args(["stop", "--no-boot-check"])[0] == "stop"
    for path in definition.discover(defaults.PACKAGE_IMAGES_DIR):
        assert _parse_args(["--image", path.stem])[1].dag_id == f"amibake_{path.stem}"


def test_the_images_folder_is_the_products_definitions_plus_the_customized_one(tmp_path: Path):
    """Every definition of the rehearsal's images_dir is valid; rehearsal-debian12 names this run's
    repository (URL, pinned fingerprint, its key file, the connection for the login) and uses each
    kind of customization; a second run replaces the folder (a new repository, a new key)."""
    from rehearsal.aptrepo import AptRepo

    product = sorted(p.name for p in definition.discover(defaults.PACKAGE_IMAGES_DIR))
    assert {"centos7.yaml", "debian12.yaml"} <= set(product)
    folder = None
    for run in ("first", "second"):
        (tmp_path / "state").mkdir(exist_ok=True)
        (tmp_path / "state" / "images" / "stale.yaml").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "state" / "images" / "stale.yaml").write_text("name: stale\n")
        with AptRepo.serve(tmp_path / run, user="u", password="p") as repo:
            folder = images_folder(tmp_path / "state", repo)
        found = definition.discover(folder)
        assert sorted(p.name for p in found) == sorted([*product, f"{DEFAULT_IMAGE}.yaml"])
        loaded = {p.stem: definition.load(p) for p in found}  # raises on any invalid definition
        ours = loaded[DEFAULT_IMAGE]
        (source,) = ours.repositories
        assert (source.base_url, source.gpg_fingerprint) == (repo.url, repo.fingerprint)
        assert source.connection_id == images.CONNECTION_ID == "amibake_repo_rehearsal"
        assert (folder / DEFAULT_IMAGE / "keys" / source.gpg_key).read_bytes() == repo.key_file.read_bytes()
        assert ours.recipe == "debian12" and repo.package in ours.install
        assert repo.unit in ours.enable and ours.files and ours.scripts and ours.kernel_args
        assert [c.name for c in ours.smoke_checks] == list(images.CHECKS)
    assert DEFAULT_IMAGE in available_images() and set(p.removesuffix(".yaml") for p in product) <= set(
        available_images()
    )


def _spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process in its own session, as sshd starts a remote command."""
    return subprocess.Popen(argv, env=env, start_new_session=True)


def test_box_processes_of_a_build_are_found_with_their_children_and_ended():
    """A "build" (its command line names the volume) and the child it forked are both ended."""
    vol = "vol-" + os.urandom(9).hex()[:17]  # as AWS makes them: 17 hex digits
    script = f"sleep 300 & wait  # --volume-id {vol}"
    build = _spawn(["bash", "-c", script])
    try:
        for _ in range(100):  # until bash has forked its sleep
            found = _box_processes([vol])
            if len(found) >= 2:
                break
            subprocess.run(["sleep", "0.05"])
        assert build.pid in found and len(found) == 2
        kill_box_processes([vol])
        assert build.wait(timeout=20) != 0
        assert _box_processes([vol]) == []
    finally:
        build.kill()
        build.wait()


def test_clean_up_earlier_stops_marked_strays_and_box_processes(tmp_path: Path):
    """What a SIGKILLed harness leaves (services carrying the marker, a build, the apt repository's
    signing key) is ended or removed; state removed. A recorded dir that is not a key dir stays."""
    state = tmp_path / "state"
    state.mkdir()
    build_id = os.urandom(6).hex()
    key_dir = Path(tempfile.mkdtemp(prefix=GNUPGHOME_PREFIX))
    (key_dir / "private-keys-v1.d").mkdir()
    not_a_key_dir = tmp_path / "keep"
    not_a_key_dir.mkdir()
    recorded = {
        "harness_pid": 2**22 + 1,
        "box_dirs": [build_id],
        "key_dirs": [str(key_dir), str(not_a_key_dir)],
    }
    (state / STATE_FILE).write_text(json.dumps(recorded))
    stray = _spawn(
        [sys.executable, "-c", "import time; time.sleep(300)"], {**os.environ, MARKER_ENV: str(state)}
    )
    build = _spawn(["bash", "-c", f"sleep 300 & wait  # /var/tmp/amibake/{build_id}/scripts/build-image"])
    try:
        for _ in range(100):
            if _marked_processes(state) == [stray.pid]:
                break
            subprocess.run(["sleep", "0.05"])
        assert _marked_processes(state) == [stray.pid]
        assert clean_up_earlier(state) is True
        assert stray.wait(timeout=30) != 0 and build.wait(timeout=30) != 0
        assert _marked_processes(state) == [] and _box_processes([build_id]) == []
        assert not (state / STATE_FILE).exists()
        assert not key_dir.exists() and not_a_key_dir.is_dir()
        assert clean_up_earlier(state) is False  # nothing left the second time
    finally:
        for proc in (stray, build):
            proc.kill()
            proc.wait()
        shutil.rmtree(key_dir, ignore_errors=True)


def test_clean_up_earlier_ends_recorded_sessions_whole_and_spares_a_reused_pid(tmp_path: Path):
    """A recorded service whose environment shows no marker (Airflow's api-server rewrites its title
    over it) is ended with everything it forked; the killed run's sshd keys are removed; a recorded
    session id that now belongs to another process (different start time) is left alone."""
    state = tmp_path / "state"
    state.mkdir()
    no_marker = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    service = _spawn(["bash", "-c", "sleep 300 & wait"], no_marker)
    innocent = _spawn(["sleep", "300"], no_marker)
    keys = state / f"{WORK_DIR_PREFIX}killed"
    keys.mkdir()
    (keys / "user_ed25519").write_text("throwaway\n")
    try:
        for _ in range(100):  # until bash has forked its sleep
            if len(processes.members([service.pid])) == 2:
                break
            subprocess.run(["sleep", "0.05"])
        forked = [pid for pid in processes.members([service.pid]) if pid != service.pid]
        assert len(forked) == 1 and _marked_processes(state) == []
        pid, started = processes.record(innocent.pid)
        recorded = {"harness_pid": 2**22 + 1, "sessions": [processes.record(service.pid), [pid, started + 1]]}
        (state / STATE_FILE).write_text(json.dumps(recorded))

        assert clean_up_earlier(state) is True
        assert service.wait(timeout=30) != 0
        assert processes.members([service.pid]) == []  # the forked sleep went with it
        assert not keys.exists()
        assert innocent.poll() is None
        assert clean_up_earlier(state) is False
    finally:
        for proc in (service, innocent):
            proc.kill()
            proc.wait()
        processes.end([service.pid], grace=1)


def test_holding_finds_a_process_by_its_open_log_and_the_leak_check_names_it(tmp_path: Path):
    """A process whose only trace is its log (no marker, no session record) is found, but not when it
    started before the given time; ``python -m rehearsal.processes`` names it and exits 1."""
    log = (tmp_path / "service.log").open("wb")
    with log:
        service = subprocess.Popen(["sleep", "300"], stdout=log, cwd="/")
    try:
        started = processes.start_time(service.pid)
        assert started is not None
        assert list(processes.holding([tmp_path])) == [service.pid]
        assert processes.holding([tmp_path], started_after=started) == {}
        assert processes.holding([tmp_path / "elsewhere"]) == {}
        check = subprocess.run(
            [sys.executable, "-m", "rehearsal.processes", "--grace", "1", "--started-after", str(started - 1)]
            + [str(tmp_path)],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 1 and f"process {service.pid}: sleep" in check.stdout
        service.kill()
        service.wait()
        assert processes.main(["--started-after", "0", str(tmp_path)]) == 0
        # the shell that runs the check (here: with its cwd in the dir) is not a leak
        script = 'cd "$2" && "$1" -m rehearsal.processes --started-after 0 "$2"; echo "rc=$?"'
        in_dir = subprocess.run(
            ["bash", "-c", script, "check", sys.executable, str(tmp_path)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        assert in_dir.stdout == "rc=0\n", in_dir.stdout + in_dir.stderr
    finally:
        service.kill()
        service.wait()


def test_cpu_seconds_counts_a_process_and_the_children_it_reaped():
    """A process that spends 0.6 CPU-s, then reaps a child that spent 0.6 CPU-s: both count; a process
    that is gone counts 0."""
    spin = "import time; t = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    child = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {spin!r}])"
    script = f"{spin}\n{child}\ntime.sleep(300)"
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while processes.cpu_seconds(proc.pid) < 1.2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes.cpu_seconds(proc.pid) >= 1.2
    finally:
        proc.kill()
        proc.wait()
    assert processes.cpu_seconds(proc.pid) == 0.0
