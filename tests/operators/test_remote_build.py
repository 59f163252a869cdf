"""RemoteChrootBuild over a real sshd: shipping, quoting, streaming, failure naming, timeout, abort.

The box-side script here is a small stand-in for ``build-image`` written by each test (it speaks
the same ``AMIBAKE {json}`` protocol and records how it was called), because these tests drive
situations the real build cannot produce on demand: a phase failing with a chosen code, a build
that never ends, a retry. The real ``build-image`` runs in tests/dag (whole-DAG runs) and in
test_snapshot.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowException
from operator_harness import make_context, run_operator

from operators.remote_build import RemoteChrootBuild
from operators.rules import naming
from operators.rules.remote import remote_dir
from operators.rules.validation import ParamError

RUN_ID = "manual__2026-11-25T03:00:00+00:00"
VOLUME = "vol-0123456789abcdef0"
HEADER = """#!/usr/bin/env bash
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
marks=$here/../marks
mkdir -p "$marks"
action=${!#}
printf '%s\\n' "$action" >>"$marks/actions"
[[ $action == abort ]] && { echo 'AMIBAKE {"event":"result","status":"aborted"}'; exit 0; }
printf '%s\\n' "$@" >"$marks/argv"
"""


@pytest.fixture
def box_scripts(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    """(dag id, local scripts dir); removes the build's directory on this "box" afterwards."""
    dag_id = f"amibake_t_rb_{request.node.name[:40].replace('[', '_').replace(']', '')}_{os.getpid()}"
    build = naming.build_id(dag_id, RUN_ID)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    yield dag_id, scripts
    shutil.rmtree(remote_dir(build), ignore_errors=True)


def _write(scripts: Path, body: str) -> None:
    path = scripts / "build-image"
    path.write_text(HEADER + textwrap.dedent(body))
    path.chmod(0o755)
    (scripts / "lib").mkdir(exist_ok=True)
    (scripts / "lib" / "common.sh").write_text("# shipped too\n")


def _op(dag_id: str, scripts: Path, **kwargs: Any) -> tuple[DAG, RemoteChrootBuild]:
    box = {
        "instance_id": "i-0123456789abcdef0",
        "ssh_address": "connection",
        "address": "127.0.0.1",
        "port": 22,
    }
    canvas = {"volume_id": VOLUME, "device_name": "/dev/sdf", "size_gib": 4}
    with DAG(dag_id, schedule=None) as dag:
        op = RemoteChrootBuild(
            task_id="remote_chroot_build",
            recipe="debian12",
            box=box,
            canvas=canvas,
            scripts_dir=str(scripts),
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


def _marks(dag_id: str) -> Path:
    return Path(remote_dir(naming.build_id(dag_id, RUN_ID))) / "marks"


def test_build_ships_scripts_quotes_arguments_and_streams(box_scripts: tuple[str, Path], sshd: Any) -> None:
    dag_id, scripts = box_scripts
    go = _marks(dag_id) / "go"
    _write(
        scripts,
        """
        echo 'AMIBAKE {"event":"phase-start","phase":"mkfs"}'
        echo "waiting for the task log to show this line"
        for _ in $(seq 600); do [[ -e $marks/go ]] && break; sleep 0.1; done
        [[ -e $marks/go ]] || exit 9
        echo 'AMIBAKE {"event":"phase-end","phase":"mkfs","seconds":0.5}'
        echo 'AMIBAKE {"event":"result","status":"ok"}'
        """,
    )

    dag, op = _op(dag_id, scripts, mirror_url="http://127.0.0.1:9/debian?suite=bookworm", boot_check=True)
    with _watch_task_log("waiting for the task log", go.touch):
        result = run_operator(op, make_context(dag, RUN_ID)).result
    assert result == {"volume_id": VOLUME, "phases": {"mkfs": 0.5}}
    build = naming.build_id(dag_id, RUN_ID)
    shipped = Path(remote_dir(build)) / "scripts"
    assert (shipped / "lib" / "common.sh").read_text() == "# shipped too\n"
    assert os.access(shipped / "build-image", os.X_OK)
    assert (_marks(dag_id) / "argv").read_text().splitlines() == [
        "--recipe", "debian12",
        "--volume-id", VOLUME,
        "--device-name", "/dev/sdf",
        "--size-gib", "4",
        "--mirror", "http://127.0.0.1:9/debian?suite=bookworm",
        "--boot-check",
        "all",
    ]  # fmt: skip
    assert (_marks(dag_id) / "actions").read_text().split() == ["all"], "first try: no abort"


def test_failure_names_phase_and_exit_code(box_scripts: tuple[str, Path], sshd: Any) -> None:
    dag_id, scripts = box_scripts
    _write(
        scripts,
        """
        echo 'AMIBAKE {"event":"phase-start","phase":"bootstrap"}'
        echo "E: Failed getting release file" >&2
        echo 'AMIBAKE {"event":"phase-fail","phase":"bootstrap","rc":4,"log":"/x/bootstrap.log"}'
        echo 'AMIBAKE {"event":"result","status":"fail","phase":"bootstrap","rc":4}'
        exit 4
        """,
    )
    dag, op = _op(dag_id, scripts)
    with pytest.raises(
        AirflowException, match=r"failed in phase 'bootstrap' with exit code 4; full log on the box"
    ):
        run_operator(op, make_context(dag, RUN_ID))


def test_exit_zero_without_ok_result_is_a_failure(box_scripts: tuple[str, Path], sshd: Any) -> None:
    dag_id, scripts = box_scripts
    _write(scripts, 'echo \'AMIBAKE {"event":"phase-start","phase":"verify"}\'\n')
    dag, op = _op(dag_id, scripts)
    with pytest.raises(AirflowException, match=r"failed in phase 'verify' with exit code 0"):
        run_operator(op, make_context(dag, RUN_ID))


def test_hard_timeout_hangs_up_and_aborts(box_scripts: tuple[str, Path], sshd: Any) -> None:
    dag_id, scripts = box_scripts
    _write(
        scripts,
        """
        echo $$ >"$marks/pid"
        echo 'AMIBAKE {"event":"phase-start","phase":"relabel"}'
        sleep 600
        """,
    )
    dag, op = _op(dag_id, scripts, build_timeout=3)
    with pytest.raises(AirflowException, match=r"exceeded build_timeout of 3 s in phase 'relabel'"):
        run_operator(op, make_context(dag, RUN_ID))
    assert (_marks(dag_id) / "actions").read_text().split() == ["all", "abort"]
    pid = int((_marks(dag_id) / "pid").read_text())
    for _ in range(100):  # the hang-up reaches the remote shell asynchronously
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the remote build (pid {pid}) kept running after the time limit")


def test_retry_aborts_the_earlier_build_first(box_scripts: tuple[str, Path], sshd: Any) -> None:
    dag_id, scripts = box_scripts
    _write(scripts, 'echo \'AMIBAKE {"event":"result","status":"ok"}\'\n')
    dag, op = _op(dag_id, scripts)
    run_operator(op, make_context(dag, RUN_ID, try_number=2, max_tries=1))
    assert (_marks(dag_id) / "actions").read_text().split() == ["abort", "all"]


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("mirror_url", {"mirror_url": "http://x/ $(reboot)"}), ("boot_check", {"boot_check": "sometimes"})],
)
def test_bad_values_never_reach_the_box(
    box_scripts: tuple[str, Path], sshd: Any, field: str, kwargs: dict
) -> None:
    dag_id, scripts = box_scripts
    _write(scripts, "exit 0\n")
    dag, op = _op(dag_id, scripts, **kwargs)
    with pytest.raises(ParamError, match=f"^{field}: "):
        run_operator(op, make_context(dag, RUN_ID))
    assert not _marks(dag_id).exists()


def test_on_kill_hangs_up_and_aborts_the_remote_build(box_scripts: tuple[str, Path], sshd: Any) -> None:
    """A killed task must not leave the build running on the box (apache/airflow#40338)."""
    import threading

    dag_id, scripts = box_scripts
    _write(
        scripts,
        """
        echo $$ >"$marks/pid"
        echo 'AMIBAKE {"event":"phase-start","phase":"bootstrap"}'
        sleep 600
        """,
    )
    dag, op = _op(dag_id, scripts)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            run_operator(op, make_context(dag, RUN_ID))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    pid_file = _marks(dag_id) / "pid"
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
    assert (_marks(dag_id) / "actions").read_text().split() == ["all", "abort"]
    pid = int(pid_file.read_text())
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the remote build (pid {pid}) kept running after on_kill")
