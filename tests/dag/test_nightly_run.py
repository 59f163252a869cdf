"""Whole runs of amibake_debian12 with ``dag.test()``: the local EC2 API with its boxes, real build-image.

A bad value fails before anything is created; a real build that fails (its package mirror is dead)
runs the teardowns and fails the run. The green run, on the instance's own box (rehearsal.boxes)
reached as on AWS, is tests/e2e/test_green_night.py: one night that all its readers share.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dag_runs import DAG_ID, left_in_moto, xcom_of

from operators.rules import naming

REPO = Path(__file__).resolve().parents[2]


def _task_states(dag_run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def _free_closed_port() -> int:
    """A local port nobody listens on (a dead mirror)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.long
def test_bad_value_fails_before_anything_is_created(
    nightly: Any, ec2: Any, box_login: Any, subnet: dict
) -> None:
    dag_run = nightly.test(run_conf={"mirror_url": "ftp://mirror.invalid/debian"})
    states = _task_states(dag_run)
    assert str(dag_run.state) == "failed"
    assert states["validate_params"] == "failed"
    assert states["launch_build_box"] == "upstream_failed"
    creates = [
        r["action"] for r in ec2.requests if r["action"].startswith(("Run", "Create", "Authorize", "Attach"))
    ]
    assert creates == []


@pytest.fixture
def loop_ebs(ec2: Any, tmp_path: Path) -> Iterator[Any]:
    """Every attached moto volume backed by a real loop device (root only)."""
    from rehearsal.ebs import LoopEbs

    with LoopEbs(ec2.moto_url, ec2.region, tmp_path / "ebs") as ebs:
        yield ebs


def _no_canvas_left(ebs: Any, boxes: Any, volume_ids: list[str]) -> None:
    """The canvases are detached and no box runs any more (their mounts died with them)."""
    for volume_id in volume_ids:
        ebs.wait_for(volume_id, attached=False)
    running = [(box.instance_id, box.mounts()) for box in boxes.boxes if box.alive]
    assert running == [], "a build box is still running"


def _run_with_dead_mirror(nightly: Any, ec2: Any, capfd: Any) -> tuple[Any, str]:
    """A run whose real build fails fast: its package mirror is a closed local port."""
    ami = ec2.register_base_image("amibake-e2e-base")
    dead_mirror = f"http://127.0.0.1:{_free_closed_port()}/debian"
    dag_run = nightly.test(
        run_conf={"base_ami": ami, "canvas_size_gib": 3, "mirror_url": dead_mirror}
    )
    return dag_run, capfd.readouterr().out  # dag.test runs the tasks in this process: their log is stdout


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and mounts")
def test_failed_build_runs_teardowns_and_fails_the_run(
    nightly: Any,
    ec2: Any,
    boxes: Any,
    box_login: Any,
    subnet: dict,
    loop_ebs: Any,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    notified = tmp_path / "notified.jsonl"
    monkeypatch.setenv("AIRFLOW__AMIBAKE__NOTIFIER", "recording_notifier.FileNotifier")
    monkeypatch.setenv("AIRFLOW__AMIBAKE__NOTIFIER_KWARGS", json.dumps({"path": str(notified)}))
    dag_run, log = _run_with_dead_mirror(nightly, ec2, capfd)
    build = naming.build_id(DAG_ID, dag_run.run_id)
    states = _task_states(dag_run)
    assert str(dag_run.state) == "failed"
    assert states["remote_chroot_build"] == "failed"
    assert states["frozen_snapshot"] == states["register_hvm_ami"] == "upstream_failed"
    assert states["terminate_build_box"] == states["delete_canvas"] == "success"
    # the task names the phase the box reported as failed, with its exit code
    reported = re.findall(r"phase (\w+) FAILED with exit code (\d+)", log)
    assert reported and reported[0][0] == "bootstrap", log[-3000:]
    assert f"build-image failed in phase 'bootstrap' with exit code {reported[0][1]}" in log
    assert "Failed getting release file" in log, "the failing phase's log tail streamed into the task log"
    assert ec2.calls("CreateSnapshot") == ec2.calls("RegisterImage") == ec2.calls("DeregisterImage") == []
    # the deployment's notifier heard about the failed run, once
    assert [json.loads(line) for line in notified.read_text().splitlines()] == [
        {"dag_id": DAG_ID, "run_id": dag_run.run_id}
    ]
    assert left_in_moto(ec2, build) == {"instances": [], "canvas_volumes": [], "security_groups": []}
    _no_canvas_left(loop_ebs, boxes, [c["VolumeId"] for c in ec2.calls("AttachVolume")])
    key_body = box_login.private_key_pem.splitlines()[1]
    assert key_body not in log, "the SSH private key must never reach a task log"
    assert key_body not in json.dumps([xcom_of(dag_run, t) for t in ("launch_build_box", "attach_canvas")])
