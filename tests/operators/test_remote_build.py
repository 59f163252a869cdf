"""RemoteChrootBuild on a real box: shipping, quoting, streaming, failure naming, timeout, abort.

The box is an instance of the local EC2 API (``rehearsal.boxes``): sshd on its own address, the base
AMI's non-root user, the build run through ``sudo -n`` as on AWS.

The box-side script here is a small stand-in for ``build-image`` written by each test (it speaks
the same ``AMIBAKE {json}`` protocol and records how it was called), because these tests drive
situations the real build cannot produce on demand: a phase failing with a chosen code, a build
that never ends, a retry. The real ``build-image`` runs in tests/dag (whole-DAG runs) and in
test_snapshot.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowException
from operator_harness import make_context, run_operator

from operators.remote_build import RemoteChrootBuild
from operators.rules import naming
from operators.rules.manifest import ManifestError
from operators.rules.remote import remote_dir
from operators.rules.validation import ParamError

REPO = Path(__file__).resolve().parents[2]
RUN_ID = "manual__2026-11-25T03:00:00+00:00"
VOLUME = "vol-0123456789abcdef0"
#: What build-image reports after its verify phase (lib/verify.sh write_expectations).
EXPECTATIONS = {
    "login_user": "admin",
    "cmdline": "root=UUID=0b5fe0d4-8f3a-4c4e-9d71-3e7d2d6c1a10 console=ttyS0",
    "baked_host_keys": [],
    "require_selinux": False,
    "checks": [],
}
EXPECTATIONS_LINE = "AMIBAKE " + json.dumps({"event": "expectations", **EXPECTATIONS})
OK_LINE = 'AMIBAKE {"event":"result","status":"ok"}'
#: The list the stand-in's report_packages writes and announces (lib/verify.sh write_package_list).
PACKAGES = [
    {"name": "base-files", "epoch": 0, "version": "12.4+deb12u11", "release": "", "arch": "amd64"},
    {"name": "libc6", "epoch": 0, "version": "2.36", "release": "9+deb12u14", "arch": "amd64"},
]
HEADER = """#!/usr/bin/env bash
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
marks=$here/../marks
mkdir -p "$marks"
action=${!#}
printf '%s\\n' "$action" >>"$marks/actions"
[[ $action == abort ]] && { echo 'AMIBAKE {"event":"result","status":"aborted"}'; exit 0; }
if [[ $action == credentials ]]; then
    cat >"$marks/credentials" && printf '%s\n' "$@" >"$marks/credentials-argv" && exit 0
fi
printf '%s\\n' "$@" >"$marks/argv"
# the package list (root's, as the real one) and its event; $1: a sha256 to announce instead
report_packages() {
    local list=${here%/scripts}/run/packages.tsv sum
    mkdir -p "${list%/*}"
    printf 'base-files\\t0\\t12.4+deb12u11\\t\\tamd64\\nlibc6\\t0\\t2.36\\t9+deb12u14\\tamd64\\n' >"$list"
    chmod 0600 "$list"
    sum=${1:-$(sha256sum "$list" | cut -d' ' -f1)}
    printf 'AMIBAKE {"event":"packages","path":"%s","count":2,"sha256":"%s"}\\n' "$list" "$sum"
}
"""


@dataclass
class Rig:
    """One test's build: its DAG id, the local scripts dir to ship, the box (XCom and machine)."""

    dag_id: str
    scripts: Path
    box: dict[str, Any]
    on_box: Any

    @property
    def marks(self) -> Path:
        """Where the stand-in build-image records how it was called (on the box, seen from here)."""
        return self.on_box.path(remote_dir(naming.build_id(self.dag_id, RUN_ID))) / "marks"

    def remote_pid_gone(self, pid: int, timeout: float = 10.0) -> bool:
        """Whether a process of the box (its own pid) ends within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.on_box.run(["kill", "-0", str(pid)]).returncode != 0:
                return True
            time.sleep(0.1)
        return False


@pytest.fixture
def rig(tmp_path: Path, request: pytest.FixtureRequest, launched_box: tuple[dict[str, Any], Any]) -> Rig:
    """A :class:`Rig` with an empty local scripts dir."""
    dag_id = f"amibake_t_rb_{request.node.name[:40].replace('[', '_').replace(']', '')}_{os.getpid()}"
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    return Rig(dag_id, scripts, *launched_box)


def _write(scripts: Path, body: str) -> None:
    path = scripts / "build-image"
    path.write_text(HEADER + textwrap.dedent(body))
    path.chmod(0o755)
    (scripts / "lib").mkdir(exist_ok=True)
    (scripts / "lib" / "common.sh").write_text("# shipped too\n")


def _op(rig: Rig, **kwargs: Any) -> tuple[DAG, RemoteChrootBuild]:
    canvas = {"volume_id": VOLUME, "device_name": "/dev/sdf", "size_gib": 4}
    with DAG(rig.dag_id, schedule=None) as dag:
        op = RemoteChrootBuild(
            task_id="remote_chroot_build",
            recipe="debian12",
            box=rig.box,
            canvas=canvas,
            scripts_dir=str(rig.scripts),
            **kwargs,
        )
    return dag, op


@contextlib.contextmanager
def _watch_task_log(text: str, action: Callable[[], None]) -> Iterator[None]:
    """Call ``action`` when a task log line containing ``text`` is emitted (structlog processor)."""

    def watcher(logger: Any, method: str, event_dict: dict) -> dict:
        parts = [event_dict.get("event", ""), *(event_dict.get("positional_args") or ())]
        if any(text in str(part) for part in parts):
            action()
        return event_dict

    old = structlog.get_config()["processors"]
    structlog.configure(processors=[watcher, *old])
    try:
        yield
    finally:
        structlog.configure(processors=old)


def test_build_ships_scripts_quotes_arguments_and_streams(rig: Rig) -> None:
    go = rig.marks / "go"
    _write(
        rig.scripts,
        """
        echo 'AMIBAKE {"event":"phase-start","phase":"mkfs"}'
        echo "waiting for the task log to show this line"
        for _ in $(seq 600); do [[ -e $marks/go ]] && break; sleep 0.1; done
        [[ -e $marks/go ]] || exit 9
        echo 'AMIBAKE {"event":"phase-end","phase":"mkfs","seconds":0.5}'
        echo 'EXPECTATIONS'
        report_packages
        echo 'AMIBAKE {"event":"result","status":"ok"}'
        """.replace("EXPECTATIONS", EXPECTATIONS_LINE),
    )

    dag, op = _op(rig, mirror_url="http://127.0.0.1:9/debian/bookworm-mirror", boot_check=True)
    with _watch_task_log("waiting for the task log", go.touch):
        result = run_operator(op, make_context(dag, RUN_ID)).result
    assert result == {"volume_id": VOLUME, "expectations": EXPECTATIONS, "packages": PACKAGES}
    shipped = rig.on_box.path(remote_dir(naming.build_id(rig.dag_id, RUN_ID))) / "scripts"
    # shipped over SFTP by the box's non-root user, into a dir only it may change
    assert (shipped.stat().st_uid, shipped.stat().st_mode & 0o777) == (1000, 0o700)
    assert (shipped / "lib" / "common.sh").read_text() == "# shipped too\n"
    assert os.access(shipped / "build-image", os.X_OK)
    # every shipped file is in SHA256SUMS, whose own digest the box is given to check it against
    sums = shipped.parent / "SHA256SUMS"
    assert {line.split("  ", 1)[1] for line in sums.read_text().splitlines()} == {
        "scripts/build-image", "scripts/lib/common.sh",
    }  # fmt: skip
    assert (rig.marks / "argv").read_text().splitlines() == [
        "--recipe", "debian12",
        "--volume-id", VOLUME,
        "--device-name", "/dev/sdf",
        "--size-gib", "4",
        "--mirror", "http://127.0.0.1:9/debian/bookworm-mirror",
        "--manifest-sha256", hashlib.sha256(sums.read_bytes()).hexdigest(),
        "--boot-check",
        "all",
    ]  # fmt: skip
    assert (rig.marks / "actions").read_text().split() == ["all"], "first try: no abort"


def test_an_image_definition_ships_its_bundle_and_hands_the_credentials_over_stdin(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """With ``image``: the definition's bundle goes next to the scripts, both under one SHA256SUMS;
    ``build-image credentials`` gets the repository's login from its Airflow connection on stdin
    (not argv, not the log), then ``all`` names the bundle and the build."""
    images = tmp_path / "images"
    (images / "web" / "keys").mkdir(parents=True)
    (images / "web" / "files").mkdir()
    shutil.copy(REPO / "images/examples/centos7-web/keys/internal.asc", images / "web/keys/internal.asc")
    (images / "web/files/motd").write_text("hello\n")
    (images / "web.yaml").write_text(
        "name: web\nrecipe: debian12\nrepositories:\n"
        "- {name: internal, base_url: 'http://127.0.0.1:9/debian', suite: bookworm, components: [main], "
        "gpg_key: internal.asc, "
        "gpg_fingerprint: B984D6DCA059F90D49E80E9E4039B6FC71634273, connection_id: repo_web}\n"
        "files: [{source: motd, destination: /etc/motd}]\n"
        "smoke_checks: [{name: motd, command: test -s /etc/motd}]\n"
    )
    password = "Web-Repo-Pass-93f1c"
    monkeypatch.setenv("AIRFLOW__AMIBAKE__IMAGES_DIR", str(images))
    monkeypatch.setenv(
        "AIRFLOW_CONN_REPO_WEB", json.dumps({"conn_type": "http", "login": "builder", "password": password})
    )
    _write(
        rig.scripts,
        """
        echo 'EXPECTATIONS'
        report_packages
        echo 'AMIBAKE {"event":"result","status":"ok"}'
        """.replace("EXPECTATIONS", EXPECTATIONS_LINE),
    )
    dag, op = _op(rig, image="web")
    run_operator(op, make_context(dag, RUN_ID))
    build = naming.build_id(rig.dag_id, RUN_ID)
    shipped = rig.on_box.path(remote_dir(build))
    assert (rig.marks / "actions").read_text().split() == ["credentials", "all"]
    assert (rig.marks / "credentials").read_text() == f"internal\tbuilder\t{password}\n"
    argv = (rig.marks / "argv").read_text().splitlines()
    assert argv[argv.index("--image-dir") + 1] == f"{remote_dir(build)}/image"
    assert argv[argv.index("--build-id") + 1] == build
    assert password not in (rig.marks / "credentials-argv").read_text() + "\n".join(argv)
    assert "IMAGE_REPO_1_AUTH='1'" in (shipped / "image/image.env").read_text()
    listed = {line.split("  ", 1)[1] for line in (shipped / "SHA256SUMS").read_text().splitlines()}
    assert {"image/image.env", "image/files/motd", "image/keys/internal.asc", "image/checks/1"} <= listed
    assert password not in capfd.readouterr().out


def test_failure_names_phase_and_exit_code(rig: Rig) -> None:
    _write(
        rig.scripts,
        """
        echo 'AMIBAKE {"event":"phase-start","phase":"bootstrap"}'
        echo "E: Failed getting release file" >&2
        echo 'AMIBAKE {"event":"phase-fail","phase":"bootstrap","rc":4,"log":"/x/bootstrap.log"}'
        echo 'AMIBAKE {"event":"result","status":"fail","phase":"bootstrap","rc":4}'
        exit 4
        """,
    )
    dag, op = _op(rig)
    with pytest.raises(
        AirflowException, match=r"failed in phase 'bootstrap' with exit code 4; full log on the box"
    ):
        run_operator(op, make_context(dag, RUN_ID))


def test_exit_zero_without_ok_result_is_a_failure(rig: Rig) -> None:
    _write(rig.scripts, 'echo \'AMIBAKE {"event":"phase-start","phase":"verify"}\'\n')
    dag, op = _op(rig)
    with pytest.raises(AirflowException, match=r"failed in phase 'verify' with exit code 0"):
        run_operator(op, make_context(dag, RUN_ID))


def test_hard_timeout_hangs_up_and_aborts(rig: Rig) -> None:
    _write(
        rig.scripts,
        """
        echo $$ >"$marks/pid"
        echo 'AMIBAKE {"event":"phase-start","phase":"relabel"}'
        sleep 600
        """,
    )
    dag, op = _op(rig, build_timeout=3)
    with pytest.raises(AirflowException, match=r"exceeded build_timeout of 3 s in phase 'relabel'"):
        run_operator(op, make_context(dag, RUN_ID))
    assert (rig.marks / "actions").read_text().split() == ["all", "abort"]
    pid = int((rig.marks / "pid").read_text())  # the hang-up reaches the remote shell asynchronously
    assert rig.remote_pid_gone(pid), (
        f"the remote build (pid {pid} on the box) kept running after the time limit"
    )


def test_retry_aborts_the_earlier_build_first(rig: Rig) -> None:
    ok = 'AMIBAKE {"event":"result","status":"ok"}'
    _write(rig.scripts, f"echo '{EXPECTATIONS_LINE}'\nreport_packages\necho '{ok}'\n")
    dag, op = _op(rig)
    run_operator(op, make_context(dag, RUN_ID, try_number=2, max_tries=1))
    assert (rig.marks / "actions").read_text().split() == ["abort", "all"]


def test_a_build_that_reports_no_expectations_is_refused(rig: Rig) -> None:
    """The smoke check needs them: a build-image that succeeds without saying what its first boot
    must show (an older script, a broken contract) fails here, naming the record and the field."""
    _write(rig.scripts, 'echo \'AMIBAKE {"event":"result","status":"ok"}\'\n')
    dag, op = _op(rig)
    with pytest.raises(ParamError, match="^build.expectations: .*RemoteChrootBuild's XCom"):
        run_operator(op, make_context(dag, RUN_ID))


def test_a_build_that_reports_no_package_list_is_refused(rig: Rig) -> None:
    """An image whose package list was not announced (an older script, a broken contract) is not
    handed on: the record's check names the field."""
    _write(rig.scripts, f"echo '{EXPECTATIONS_LINE}'\necho '{OK_LINE}'\n")
    dag, op = _op(rig)
    with pytest.raises(ParamError, match="^build.packages: .*RemoteChrootBuild's XCom"):
        run_operator(op, make_context(dag, RUN_ID))


def test_a_package_list_that_is_not_the_announced_one_is_refused(rig: Rig) -> None:
    """The file fetched from the box must have the sha256 the event announced (root-only file, read
    through sudo over the build's SSH client)."""
    other = "0" * 64
    _write(rig.scripts, f"echo '{EXPECTATIONS_LINE}'\nreport_packages {other}\necho '{OK_LINE}'\n")
    dag, op = _op(rig)
    with pytest.raises(ManifestError, match=f"not the announced {other}"):
        run_operator(op, make_context(dag, RUN_ID))


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("mirror_url", {"mirror_url": "http://x/ $(reboot)"}), ("boot_check", {"boot_check": "sometimes"})],
)
def test_bad_values_never_reach_the_box(rig: Rig, field: str, kwargs: dict) -> None:
    _write(rig.scripts, "exit 0\n")
    dag, op = _op(rig, **kwargs)
    with pytest.raises(ParamError, match=f"^{field}: "):
        run_operator(op, make_context(dag, RUN_ID))
    assert not rig.marks.exists()


def test_on_kill_hangs_up_and_aborts_the_remote_build(rig: Rig) -> None:
    """A killed task must not leave the build running on the box (apache/airflow#40338)."""
    import threading

    _write(
        rig.scripts,
        """
        echo $$ >"$marks/pid"
        echo 'AMIBAKE {"event":"phase-start","phase":"bootstrap"}'
        sleep 600
        """,
    )
    dag, op = _op(rig)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            run_operator(op, make_context(dag, RUN_ID))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    pid_file = rig.marks / "pid"
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the remote build never started")
    op.on_kill()
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert isinstance(outcome[0], AirflowException)
    assert (rig.marks / "actions").read_text().split() == ["all", "abort"]
    pid = int(pid_file.read_text())
    assert rig.remote_pid_gone(pid), f"the remote build (pid {pid} on the box) kept running after on_kill"
