"""The worker process dies (SIGKILL) in the middle of each AWS task, then the task is retried.

Each try 1 runs in its own process (tests/faults/worker.py, the operator harness) against moto behind
the recording proxy and its real boxes. The proxy holds the task's key request for a few seconds
(``add_latency``) and the test kills the worker as soon as that request is recorded: the request is
in flight, AWS goes on and finishes it, but the worker never learns the answer (the worst moment).
Try 2 then runs in this process, as Airflow's retry would, and must find what try 1 made: one
resource of each kind, one create request each, and after the teardowns nothing of the build left
but its snapshot and AMI.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG, BaseOperator
from fault_helpers import kill_when, left, nothing_left, start_worker, wait_until
from operator_harness import make_context, run_operator

from operators.ami import RegisterHVMAmi
from operators.build_box import LaunchBuildBox, TerminateBuildBox
from operators.canvas import AttachCanvas, DeleteCanvas
from operators.rules import naming
from operators.rules.naming import Role
from rehearsal.ec2_local import tag_specs

RUN_ID = "scheduled__2026-11-25T02:00:00+00:00"
IN_FLIGHT_S = 3
CREATES = ("RunInstances", "CreateSecurityGroup", "CreateVolume", "AttachVolume", "RegisterImage")


def _kill_then_retry(
    ec2: Any,
    tmp_path: Path,
    dag_id: str,
    cls: type[BaseOperator],
    task_id: str,
    kwargs: dict,
    action: str,
    done: Any,
) -> Any:
    """Try 1 in a worker killed while ``action`` is in flight; wait until AWS ``done`` and EC2 shows
    what it made; try 2 here.

    ``done`` looks at moto itself. The local EC2 API hides a new instance, volume or snapshot for a
    moment, as EC2 does (``EventualConsistency``); Airflow's retry comes ``retry_delay`` later (30 s,
    dags/amibake_images.py), far past that, so try 2 starts only once nothing is hidden any more.
    """
    ec2.add_latency(action, IN_FLIGHT_S, times=1)
    worker = start_worker(tmp_path, f"{cls.__module__}.{cls.__name__}", task_id, kwargs, dag_id, RUN_ID)
    kill_when(worker, lambda: ec2.calls(action), f"{action} sent by {task_id}")
    consistency = ec2.rule("EventualConsistency")
    wait_until(lambda: done() and not consistency.hidden(), f"AWS finishing the {action} of try 1, seen")
    with DAG(dag_id, schedule=None) as dag:
        op = cls(task_id=task_id, **kwargs)
    return run_operator(op, make_context(dag, RUN_ID, try_number=2, max_tries=3)).result


@pytest.mark.long
def test_each_aws_task_killed_mid_request_is_retried_without_a_duplicate(
    ec2: Any, box_login: Any, subnet: dict, airflow_db: None, tmp_path: Path
) -> None:
    client = ec2.boto3_client()
    dag_id = f"amibake_t_kill_{uuid.uuid4().hex[:10]}"
    build = naming.build_id(dag_id, RUN_ID)
    base = ec2.register_base_image("amibake-test-base")

    def kill(cls: type[BaseOperator], task_id: str, kwargs: dict, action: str, done: Any) -> Any:
        return _kill_then_retry(ec2, tmp_path, dag_id, cls, task_id, kwargs, action, done)

    box = kill(
        LaunchBuildBox,
        "launch_build_box",
        {"recipe": "debian12", "base_ami": base},
        "RunInstances",
        lambda: left(client, build)["instances"],
    )
    assert left(client, build)["instances"] == [box["instance_id"]]
    assert left(client, build)["security_groups"] == [box["security_group_id"]]

    def canvases() -> list[dict]:
        return client.describe_volumes(Filters=naming.build_filters(build, Role.CANVAS))["Volumes"]

    def attached() -> bool:
        return bool(canvases()) and canvases()[0]["State"] == "in-use"

    canvas = kill(
        AttachCanvas,
        "attach_canvas",
        {"recipe": "debian12", "box": box, "size_gib": 2},
        "AttachVolume",
        attached,
    )
    assert [v["VolumeId"] for v in canvases()] == [canvas["volume_id"]]

    tags = naming.resource_tags(
        build=build, dag_id=dag_id, run_id=RUN_ID, recipe="debian12", role=Role.SNAPSHOT
    )
    snapshot = client.create_snapshot(
        VolumeId=canvas["volume_id"], TagSpecifications=[naming.tag_specification("snapshot", tags)]
    )["SnapshotId"]  # what FrozenSnapshot leaves (its kill needs a frozen canvas: see test_box_faults.py)

    def registered() -> list[str]:
        """The AMI the killed worker's request made, tagged as AWS tags it from the request's
        TagSpecifications (moto drops them and the block device mapping: see shared notes/moto.md)."""
        made = [
            i["ImageId"] for i in client.describe_images(Owners=["self"])["Images"] if i["ImageId"] != base
        ]
        if made:
            sent = tag_specs(ec2.calls("RegisterImage")[0])["image"]
            client.create_tags(Resources=made, Tags=[{"Key": k, "Value": v} for k, v in sent.items()])
        return made

    image = kill(
        RegisterHVMAmi,
        "register_hvm_ami",
        {
            "recipe": "debian12",
            "snapshot": {"snapshot_id": snapshot, "volume_id": canvas["volume_id"]},
            "size_gib": 2,
        },
        "RegisterImage",
        registered,
    )
    assert left(client, build)["images"] == [image["ami_id"]], "the retry reused the AMI the dead worker made"
    assert image["snapshot_id"] == snapshot
    assert [i["ImageId"] for i in client.describe_images(Owners=["self"])["Images"]] in (
        [base, image["ami_id"]],
        [image["ami_id"], base],
    ), "no second AMI"

    def gone(kind: str) -> Any:
        return lambda: not left(client, build)[kind]

    kill(
        TerminateBuildBox,
        "terminate_build_box",
        {"recipe": "debian12"},
        "TerminateInstances",
        gone("instances"),
    )
    kill(DeleteCanvas, "delete_canvas", {"recipe": "debian12"}, "DeleteVolume", lambda: not canvases())

    assert left(client, build) == {**nothing_left(), "snapshots": [snapshot], "images": [image["ami_id"]]}
    made = Counter(r["action"] for r in ec2.requests if r["action"] in CREATES and "fault" not in r)
    assert made == Counter(dict.fromkeys(CREATES, 1)), made
