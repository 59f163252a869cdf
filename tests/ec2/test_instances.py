"""Instances as AWS has them: unknown for a moment after RunInstances, one instance per ClientToken
even when the answer is lost, and a terminated box's network interface holding its security group
for a while; and the product's launch and teardown against that."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from airflow.sdk import DAG
from ec2_helpers import answers, build_tags, error_of
from operator_harness import make_context, rebuild, run_operator

from operators.build_box import LaunchBuildBox
from operators.rules import naming
from operators.triggers.ec2 import InstanceRunningTrigger

RUN_ID = "manual__2026-11-25T02:00:00+00:00"


def _run(client: Any, image: str, **kwargs: Any) -> str:
    return client.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.small", **kwargs)[
        "Instances"
    ][0]["InstanceId"]


def test_a_new_instance_is_unknown_for_a_moment_and_the_running_wait_copes(aws: Any, client: Any) -> None:
    aws.configure_rule("EventualConsistency", delay=4.0)  # longer than the triggerer takes to start
    instance_id = _run(client, aws.register_base_image("amibake-test-base"))
    error = error_of(client.describe_instances, InstanceIds=[instance_id])
    assert (error["Code"], error["Message"]) == (
        "InvalidInstanceID.NotFound",
        f"The instance ID '{instance_id}' does not exist",
    )
    assert client.describe_instances()["Reservations"] == []
    assert (
        error_of(client.terminate_instances, InstanceIds=[instance_id])["Code"]
        == "InvalidInstanceID.NotFound"
    )
    trigger = rebuild(InstanceRunningTrigger(instance_id=instance_id, waiter_delay=1, waiter_max_attempts=10))

    async def first_event() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    assert asyncio.run(first_event()) == {"status": "success", "instance_id": instance_id}
    codes = [code for _, code in answers(aws, "DescribeInstances")]
    assert "InvalidInstanceID.NotFound" in codes[2:] and codes[-1] is None


def test_security_group_is_held_by_a_live_and_a_just_terminated_box(
    aws: Any, client: Any, admin: Any
) -> None:
    aws.configure_rule("EventualConsistency", delay=0)
    aws.configure_rule("LingeringInterfaces", linger=1.0)
    subnet = admin.describe_subnets()["Subnets"][0]
    group = client.create_security_group(GroupName="g", Description="g", VpcId=subnet["VpcId"])["GroupId"]
    instance_id = _run(
        client, aws.register_base_image("b"), SubnetId=subnet["SubnetId"], SecurityGroupIds=[group]
    )
    error = error_of(client.delete_security_group, GroupId=group)
    assert (error["Code"], error["Message"]) == (
        "DependencyViolation",
        f"resource {group} has a dependent object",
    )
    client.terminate_instances(InstanceIds=[instance_id])
    assert error_of(client.delete_security_group, GroupId=group)["Code"] == "DependencyViolation"
    time.sleep(1.1)
    client.delete_security_group(GroupId=group)


def test_teardown_waits_out_the_lingering_interface(ec2: Any, hook: Any, moto: Any, subnet: dict) -> None:
    """The product's teardown: terminate, wait, delete the group, retrying DependencyViolation."""
    ec2.configure_rule("LingeringInterfaces", linger=1.5)
    build = "lingering"
    group = hook.ensure_security_group(
        build, vpc_id=subnet["VpcId"], ssh_cidr="", tags=build_tags(build, naming.Role.BUILD_SG)
    )
    tags = build_tags(build, naming.Role.BUILD_BOX)
    instance_id = _run(
        moto,
        ec2.register_base_image("b"),
        SubnetId=subnet["SubnetId"],
        SecurityGroupIds=[group],
        TagSpecifications=[naming.tag_specification("instance", tags)],
    )
    started = time.monotonic()
    assert hook.terminate_build_instances(build) == [instance_id]
    assert hook.delete_security_groups(build) == [group]
    assert time.monotonic() - started < 10, "the retry backs off from 0.5 s, not the 10 s of its cap"
    statuses = answers(ec2, "DeleteSecurityGroup")
    assert statuses[0] == (400, "DependencyViolation") and statuses[-1] == (200, None)
    assert (
        moto.describe_security_groups(GroupIds=[], Filters=[{"Name": "group-id", "Values": [group]}])[
            "SecurityGroups"
        ]
        == []
    )


def test_a_lost_run_instances_answer_launches_one_box(
    ec2: Any, boxes: Any, box_login: Any, subnet: dict
) -> None:
    """RunInstances acts, its answer is lost (connection closed): botocore sends it again with the
    same ClientToken and EC2 answers the original instance: LaunchBuildBox ends with ONE box."""
    ec2.add_fault("RunInstances", when="after", drop_connection=True)
    with DAG("amibake_t_ec2_lost_run", schedule=None) as dag:
        op = LaunchBuildBox(
            task_id="launch_build_box",
            recipe="debian12",
            instance_type="t3.small",
            base_ami=ec2.register_base_image("amibake-test-base"),
        )
    box = run_operator(op, make_context(dag, RUN_ID)).result
    runs = ec2.calls("RunInstances")
    assert len(runs) == 2 and runs[0]["ClientToken"] == runs[1]["ClientToken"]
    assert [r.get("fault") for r in ec2.requests if r["action"] == "RunInstances"] == ["after:dropped", None]
    build = naming.build_id(dag.dag_id, RUN_ID)
    found = ec2.boto3_client().describe_instances(Filters=naming.build_filters(build, naming.Role.BUILD_BOX))
    assert [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]] == [box["instance_id"]]
