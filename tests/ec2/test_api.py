"""The API-wide behaviours: DryRun, RequestLimitExceeded bursts, and answers lost after EC2 acted;
each with the product's own code (hook, operators) coping: exactly one resource per create."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
from airflow.sdk import DAG
from botocore.config import Config
from ec2_helpers import answers, build_tags, completed_snapshot, error_of, tagged_volume
from operator_harness import make_context, run_operator
from test_volumes import _attach, _box, _instance

from operators.ami import RegisterHVMAmi
from operators.rules import naming
from rehearsal.ec2_local import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, Ec2Control, LocalEc2, standard_extensions

RUN_ID = "manual__2026-11-25T02:00:00+00:00"
OPERATORS = Path(__file__).resolve().parents[2] / "operators"


def product_actions() -> set[str]:
    """Every EC2 action the product's code can send: each botocore EC2 operation whose client method
    (``describe_images(``, ``"describe_volumes"`` for paginators, waiters' operations) the sources of
    ``operators/`` name."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("ec2")
    source = "\n".join(p.read_text() for p in OPERATORS.rglob("*.py"))
    found = {
        op for op in model.operation_names if re.search(rf"[.\"']{botocore.xform_name(op)}[\"'(]", source)
    }
    waiters = botocore.session.get_session().get_waiter_model("ec2")
    for name in waiters.waiter_names:
        if re.search(rf"\"{botocore.xform_name(name)}\"", source):
            found.add(waiters.get_waiter(name).operation)
    return found


def _raw(endpoint: str, action: str, **params: str) -> tuple[int, str]:
    """One EC2 query call as it goes over the wire; (HTTP status, body)."""
    data = urllib.parse.urlencode({"Action": action, "Version": "2016-11-15", **params}).encode()
    request = urllib.request.Request(
        endpoint, data=data, headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# -- 4. DryRun ----------------------------------------------------------------------------------------
def test_every_action_the_product_sends_answers_dry_run_operation(aws: Any, admin: Any) -> None:
    from operators.hooks.ec2 import BuildEc2Hook

    actions = product_actions()
    assert {"RunInstances", "CreateVolume", "AttachVolume", "CreateSnapshot", "RegisterImage"} <= actions
    assert {"EnableImageDeprecation", "DeleteSecurityGroup", "DescribeSnapshots"} <= actions
    for action in sorted(actions):
        status, body = _raw(aws.endpoint_url, action, DryRun="true")
        assert (status, "<Code>DryRunOperation</Code>" in body) == (412, True), (action, status, body)
    assert admin.describe_instances()["Reservations"] == [] and admin.describe_volumes()["Volumes"] == []
    # and through the product's hook, as preflight calls it
    hook = BuildEc2Hook(aws_conn_id="amibake_aws")
    code, _ = hook.dry_run("create_volume", AvailabilityZone="us-east-1a", Size=8)
    assert code == "DryRunOperation"
    assert aws.calls("CreateVolume", dry_run=True)[-1]["DryRun"] == "true"
    assert admin.describe_volumes()["Volumes"] == []


def test_dry_run_under_a_policy_that_denies_is_unauthorized(tmp_path: Path) -> None:
    """IAM answers first: a denied DryRun is UnauthorizedOperation, not DryRunOperation."""
    pytest.importorskip("rehearsal.iam")
    describe_only = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "ec2:DescribeImages", "Resource": "*"}],
    }
    with LocalEc2(extensions=standard_extensions(policy=describe_only)) as local:
        status, body = _raw(
            local.endpoint_url, "CreateVolume", DryRun="true", AvailabilityZone="us-east-1a", Size="8"
        )
    assert status in (400, 403) and "<Code>UnauthorizedOperation</Code>" in body, body


# -- 9. RequestLimitExceeded -----------------------------------------------------------------------
def test_a_burst_over_the_token_bucket_is_throttled_and_the_hook_retries(ec2: Any, hook: Any) -> None:
    ec2.configure_rule("RequestThrottling", category="non-mutating", capacity=3, refill=2)
    hook.conn  # noqa: B018 - one client for the burst's threads (botocore clients are thread-safe)
    # a burst: eight requests at once, so the bucket runs dry however slow the machine
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda _: hook.find_security_groups("burst"), range(8))) == [[]] * 8
    throttled = [a for a in answers(ec2, "DescribeSecurityGroups") if a != (200, None)]
    assert throttled and set(throttled) == {(503, "RequestLimitExceeded")}
    assert answers(ec2, "DescribeSecurityGroups")[-1] == (200, None)


def test_attach_canvas_under_throttling_creates_one_volume(ec2: Any, moto: Any, subnet: dict) -> None:
    ec2.register_base_image("amibake-test-base")
    zone = subnet["AvailabilityZone"]
    instance_id = _instance(moto, zone)
    # the first call of each kind throttled (a token bucket's refill would race a busy machine)
    for action in ("CreateVolume", "DescribeVolumes", "AttachVolume"):
        ec2.add_fault(action, "RequestLimitExceeded", 503)
    dag, op = _attach("amibake_t_ec2_canvas_throttled", _box(instance_id, zone, "b"))
    result = run_operator(op, make_context(dag, RUN_ID)).result
    assert any(r.get("error") == "RequestLimitExceeded" for r in ec2.requests)
    build = naming.build_id(dag.dag_id, RUN_ID)
    ours = moto.describe_volumes(Filters=naming.build_filters(build, naming.Role.CANVAS))["Volumes"]
    assert [(v["VolumeId"], v["State"]) for v in ours] == [(result["volume_id"], "in-use")]


# -- 10. answers lost after EC2 acted -----------------------------------------------------------------
@pytest.mark.parametrize(
    "fault",
    [{"drop_connection": True}, {"error_code": "InternalError", "http_status": 500}],
    ids=["connection-closed", "internal-error"],
)
def test_a_lost_create_volume_answer_leaves_one_canvas(
    ec2: Any, moto: Any, subnet: dict, fault: dict
) -> None:
    ec2.register_base_image("amibake-test-base")
    zone = subnet["AvailabilityZone"]
    instance_id = _instance(moto, zone)
    ec2.add_fault("CreateVolume", when="after", **fault)
    dag, op = _attach("amibake_t_ec2_canvas_lost", _box(instance_id, zone, "b"))
    result = run_operator(op, make_context(dag, RUN_ID)).result
    creates = ec2.calls("CreateVolume")
    assert len(creates) == 2 and creates[0]["ClientToken"] == creates[1]["ClientToken"]
    assert [r["fault"].startswith("after:") for r in ec2.requests if r.get("fault")] == [True]
    build = naming.build_id(dag.dag_id, RUN_ID)
    ours = moto.describe_volumes(Filters=naming.build_filters(build, naming.Role.CANVAS))["Volumes"]
    assert [v["VolumeId"] for v in ours] == [result["volume_id"]]


@pytest.mark.parametrize(
    "fault",
    [{"drop_connection": True}, {"error_code": "InternalError", "http_status": 500}],
    ids=["connection-closed", "internal-error"],
)
def test_a_lost_create_snapshot_answer_leaves_one_snapshot(
    ec2: Any, moto: Any, hook: Any, fault: dict
) -> None:
    """CreateSnapshot has no ClientToken: the product must not send it blindly again."""
    build = "lostsnap"
    volume_id = tagged_volume(moto, "us-east-1a", build)
    ec2.add_fault("CreateSnapshot", when="after", **fault)
    snap = hook.create_snapshot(
        build, volume_id=volume_id, description="t", tags=build_tags(build, naming.Role.SNAPSHOT)
    )
    assert len(ec2.calls("CreateSnapshot")) == 1
    assert [s["SnapshotId"] for s in moto.describe_snapshots(OwnerIds=["self"])["Snapshots"]] == [snap]


def test_create_snapshot_throttled_before_acting_is_sent_again(ec2: Any, moto: Any, hook: Any) -> None:
    volume_id = tagged_volume(moto, "us-east-1a", "throttled")
    ec2.add_fault("CreateSnapshot", "RequestLimitExceeded", 503, times=2)
    snap = hook.create_snapshot(
        "throttled", volume_id=volume_id, description="t", tags=build_tags("throttled", naming.Role.SNAPSHOT)
    )
    assert answers(ec2, "CreateSnapshot") == [(503, "RequestLimitExceeded")] * 2 + [(200, None)]
    assert [s["SnapshotId"] for s in moto.describe_snapshots(OwnerIds=["self"])["Snapshots"]] == [snap]


def test_a_lost_register_image_answer_leaves_one_ami(ec2: Any, moto: Any) -> None:
    snap = completed_snapshot(moto, "us-east-1a")
    ec2.add_fault("RegisterImage", when="after", drop_connection=True)
    with DAG("amibake_t_ec2_lost_register", schedule=None) as dag:
        op = RegisterHVMAmi(
            task_id="register_hvm_ami",
            recipe="debian12",
            snapshot={"snapshot_id": snap, "volume_id": "vol-0123456789abcdef0"},
            size_gib=8,
        )
    result = run_operator(op, make_context(dag, RUN_ID)).result
    assert answers(ec2, "RegisterImage") == [(0, None), (400, "InvalidAMIName.Duplicate")]
    assert [i["ImageId"] for i in moto.describe_images(Owners=["self"])["Images"]] == [result["ami_id"]]


def test_after_faults_through_the_standalone_control_api() -> None:
    """``python -m rehearsal.ec2_local``: an "after" fault set through Ec2Control; moto acted."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rehearsal.ec2_local", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=OPERATORS.parent,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        control = Ec2Control(info["endpoint_url"])
        control.add_fault("CreateSecurityGroup", "InternalError", 500, when="after")
        import boto3

        client = boto3.client(
            "ec2",
            endpoint_url=info["endpoint_url"],
            region_name=info["region"],
            aws_access_key_id=FAKE_ACCESS_KEY,
            aws_secret_access_key=FAKE_SECRET_KEY,
            config=Config(retries={"total_max_attempts": 1}),
        )
        with pytest.raises(botocore.exceptions.ClientError, match="InternalError"):
            client.create_security_group(GroupName="lost", Description="lost")
        assert [g["GroupName"] for g in client.describe_security_groups()["SecurityGroups"]].count(
            "lost"
        ) == 1
        assert [r.get("fault") for r in control.requests if r["action"] == "CreateSecurityGroup"] == [
            "after:InternalError"
        ]
        control.configure_rule("EventualConsistency", delay=5)
        volume = client.create_volume(AvailabilityZone=f"{info['region']}a", Size=8)["VolumeId"]
        assert error_of(client.describe_volumes, VolumeIds=[volume])["Code"] == "InvalidVolume.NotFound"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
