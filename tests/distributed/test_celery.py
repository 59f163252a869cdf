"""The nightly DAG on a distributed CeleryExecutor deployment (issue 6), the same topology as
docker-compose.yaml: PostgreSQL + Redis started by the test, api-server, scheduler, dag-processor,
triggerer and a Celery worker as separate processes (``rehearsal.distributed.CeleryAirflow``), and
the rehearsal's real services around it: moto behind the recording proxy with a real box per instance,
loop devices as the EBS canvas.

Two runs are triggered at once with different AMI name prefixes. The DAG has ``max_active_runs=1``,
so the second must wait queued (not fail) and then build on its own box, canvas and tags.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import rehearsal.__main__ as rh
from operators.rules import naming
from rehearsal.airflow_env import MARKER_ENV
from rehearsal.distributed import CeleryAirflow
from rehearsal.ec2_local import tag_specs

#: two whole builds one after the other (debian12, the first with its boot check)
pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(3600)]

DAG_ID = rh.DAG_ID
#: Tasks that wait in the triggerer here. A task whose resource is ready at its first look does not
#: defer at all (the deferral race, apache/airflow#66374), and the local EC2 API's instances and AMIs
#: are; its snapshots stay pending for SNAPSHOT_PENDING_S (set below), so the snapshot wait defers.
DEFERRING_TASKS = ("frozen_snapshot",)
SNAPSHOT_PENDING_S = 15  # well past the first look (right after the thaw), short of a second poll
RUN_TIMEOUT_S = 1800


@pytest.fixture
def celery_rehearsal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    """The rehearsal's services with its Airflow swapped for the Celery deployment.

    ``rehearsal_services`` builds the connections and settings and starts moto with its boxes and LoopEbs
    exactly as ``./rehearse`` does; only the Airflow class differs. Everything is stopped on exit.
    """
    monkeypatch.setattr(rh, "LocalAirflow", CeleryAirflow)
    monkeypatch.setenv(MARKER_ENV, "")  # the harness sets it; restored afterwards
    state_dir = tmp_path / "rehearsal"
    with rh.rehearsal_services(rh.Options(state_dir=state_dir)) as services:
        assert isinstance(services[0], CeleryAirflow)
        yield services
    assert rh.leftovers(state_dir) == []
    assert not (state_dir / rh.STATE_FILE).exists()  # nothing left, so nothing for a next run to clean


def _run(airflow: Any, run_id: str) -> dict[str, Any]:
    return airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{rh._q(run_id)}")


def _explain(airflow: Any, run_id: str) -> str:
    """States and failed tasks' log tails, for an assertion message."""
    lines = []
    for ti in rh.task_instances(airflow, DAG_ID, run_id):
        lines.append(f"{ti['task_id']}: {ti['state']}")
        if ti["state"] == "failed":
            lines.append(rh.log_tail(airflow, DAG_ID, run_id, ti))
    return "\n".join(lines)


def test_two_runs_on_celery_queue_and_do_not_interfere(
    celery_rehearsal: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    airflow, ec2, ebs, base_ami, record_run, _repo = celery_rehearsal
    ec2.control.configure_rule("SnapshotProgress", duration=SNAPSHOT_PENDING_S)
    rh.wait_for_dag(airflow, DAG_ID)
    conf = {"base_ami": base_ami}
    prefixes = {"celery-first": "", "celery-second": ""}
    started = time.monotonic()
    for prefix in prefixes:
        # both boots (the box's boot check, the smoke instance) are proven by the green night in the
        # same DAG; here they would only add TCG boots to what two runs on Celery prove
        run_conf = {**conf, "ami_name_prefix": prefix, "boot_check": False, "smoke_check": False}
        prefixes[prefix] = rh.trigger(airflow, DAG_ID, run_conf)
        record_run(prefixes[prefix])  # so the harness removes what the build left on the "box"
    first, second = prefixes.values()

    # Follow both runs; record what the second one was while the first was still going.
    second_while_first: set[str] = set()
    first_wall = None
    while True:
        airflow.check_alive()
        state1, state2 = _run(airflow, first)["state"], _run(airflow, second)["state"]
        if state1 not in rh.TERMINAL_STATES:
            second_while_first.add(state2)
        elif first_wall is None:
            first_wall = time.monotonic() - started
        if state1 in rh.TERMINAL_STATES and state2 in rh.TERMINAL_STATES:
            break
        assert time.monotonic() - started < 2 * RUN_TIMEOUT_S, f"runs still {state1} / {state2}"
        time.sleep(2)
    with capsys.disabled():
        print(f"\nCelery deployment: first run (no boot) took {first_wall:.0f} s wall time")

    assert state1 == "success", _explain(airflow, first)
    assert state2 == "success", _explain(airflow, second)
    # max_active_runs=1: the second run waited in the queue, then started after the first ended.
    assert second_while_first == {"queued"}
    assert _run(airflow, second)["start_date"] >= _run(airflow, first)["end_date"]

    # Every task instance ran on the Celery worker.
    worker_log = (airflow.log_dir / "worker.log").read_text(errors="replace")
    executed = [line for line in worker_log.splitlines() if "Executing workload in Celery" in line]
    for run_id in (first, second):
        tis = rh.task_instances(airflow, DAG_ID, run_id)
        # smoke_check off: the smoke task skips itself (on the worker) and rotation never runs
        skipped = {"smoke_instance", "rotate_amis"}
        assert {ti["task_id"]: ti["state"] for ti in tis} == {
            ti["task_id"]: "skipped" if ti["task_id"] in skipped else "success" for ti in tis
        }
        for ti in (ti for ti in tis if ti["task_id"] != "rotate_amis"):
            assert any(
                f"task_id='{ti['task_id']}'" in line and f"run_id='{run_id}'" in line for line in executed
            ), f"{ti['task_id']} of {run_id} was not executed by the Celery worker"

    # The deferred waits were handled by the triggerer: it wrote each trigger's own log beside
    # the task's, and the task resumed on the worker (same try, second workload).
    for run_id in (first, second):
        for task_id in DEFERRING_TASKS:
            task_dir = airflow.log_dir / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task_id}"
            assert list(task_dir.glob("attempt=*.log.trigger.*.log")), f"{task_id} of {run_id} never deferred"
            workloads = [ln for ln in executed if f"task_id='{task_id}'" in ln and f"run_id='{run_id}'" in ln]
            assert len(workloads) >= 2, f"{task_id} of {run_id} did not resume on the worker after deferring"

    # Separate boxes, canvases and tags: judged from the requests the DAG sent.
    builds = {prefix: naming.build_id(DAG_ID, run_id) for prefix, run_id in prefixes.items()}
    assert len(set(builds.values())) == 2
    launches = ec2.control.calls("RunInstances")
    volumes = ec2.control.calls("CreateVolume")
    snapshots = ec2.control.calls("CreateSnapshot")
    images = ec2.control.calls("RegisterImage")
    for calls, resource, role in (
        (launches, "instance", naming.Role.BUILD_BOX),
        (volumes, "volume", naming.Role.CANVAS),
        (snapshots, "snapshot", naming.Role.SNAPSHOT),
    ):
        tagged = sorted(
            (tag_specs(c)[resource][naming.TAG_BUILD_ID], tag_specs(c)[resource][naming.TAG_RUN_ID])
            for c in calls
        )
        assert tagged == sorted((builds[p], r) for p, r in prefixes.items()), resource
        assert {tag_specs(c)[resource][naming.TAG_ROLE] for c in calls} == {str(role)}
    for prefix, build in builds.items():
        named = [c["Name"] for c in images if c["Name"].startswith(f"{prefix}-")]
        assert len(named) == 1 and named[0].endswith(build), images

    # Each canvas was attached to its own build's box, and both were removed again.
    moto = ec2.moto_client()
    box_of: dict[str, str] = {}
    for build in builds.values():
        found = moto.describe_instances(Filters=naming.build_filters(build, naming.Role.BUILD_BOX))
        (instance,) = [i for r in found["Reservations"] for i in r["Instances"]]
        box_of[build] = instance["InstanceId"]
    canvas_of = {tag_specs(c)["snapshot"][naming.TAG_BUILD_ID]: c["VolumeId"] for c in snapshots}
    attached = {(c["VolumeId"], c["InstanceId"]) for c in ec2.control.calls("AttachVolume")}
    assert attached == {(canvas_of[b], box_of[b]) for b in builds.values()}
    assert len(set(box_of.values())) == len(set(canvas_of.values())) == 2
    assert {c["InstanceId.1"] for c in ec2.control.calls("TerminateInstances")} >= set(box_of.values())
    assert {c["VolumeId"] for c in ec2.control.calls("DeleteVolume")} >= set(canvas_of.values())
    assert ebs.devices == {}
