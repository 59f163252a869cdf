"""A build whose Airflow worker died for good (no retry, no teardown ever ran) leaves its box, security
group and canvas behind; the sweeper removes all of it and nothing else, and the previous good AMI
of the recipe stays as it was.

The leftovers are made by the nightly's own operators (LaunchBuildBox, AttachCanvas) against moto
behind the recorder and its real boxes, so the tags the sweeper relies on are the ones the pipeline
really writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG
from fault_helpers import age, images, left, nothing_left, run_sweeper, touched
from operator_harness import make_context, run_operator

from operators.build_box import LaunchBuildBox
from operators.canvas import AttachCanvas
from operators.rules import naming

RUN_ID = "scheduled__2026-11-25T02:00:00+00:00"


@pytest.mark.long
def test_a_dead_builds_leftovers_are_swept_and_the_previous_ami_stays(
    ec2: Any, box_login: Any, subnet: dict, previous_good: dict[str, str], airflow_db: None, tmp_path: Path
) -> None:
    client = ec2.boto3_client()
    dag_id = f"amibake_t_crash_{tmp_path.name[-12:]}"
    build = naming.build_id(dag_id, RUN_ID)
    base = ec2.register_base_image("amibake-test-base")
    with DAG(dag_id, schedule=None) as dag:
        launch = LaunchBuildBox(task_id="launch_build_box", recipe="debian12", base_ami=base)
    box = run_operator(launch, make_context(dag, RUN_ID)).result
    with dag:
        attach = AttachCanvas(task_id="attach_canvas", recipe="debian12", box=box, size_gib=2)
    canvas = run_operator(attach, make_context(dag, RUN_ID)).result
    # the worker died here: no retry, no teardown. Time passes.
    leftovers = age(client, build, hours=7)
    assert {box["instance_id"], box["security_group_id"], canvas["volume_id"]} <= set(leftovers)
    before = images(client)
    ec2.clear_requests()

    assert run_sweeper(max_age_hours=6).state == "success"

    assert left(client, build) == nothing_left()
    changed = touched(ec2.requests)
    assert {box["instance_id"], canvas["volume_id"], box["security_group_id"]} <= changed
    assert not changed & {previous_good["ami"], previous_good["snapshot"]}
    assert images(client) == before  # no AMI deregistered or added, the previous good one unchanged
    assert left(client, previous_good["build"])["snapshots"] == [previous_good["snapshot"]]
