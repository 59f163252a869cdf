"""LaunchBuildBox / TerminateBuildBox against the local EC2 API, whose instances are real boxes
(``rehearsal.boxes``: sshd on the instance's own address, the base AMI's non-root user)."""

from __future__ import annotations

import base64
import io
import json
from datetime import UTC, datetime
from typing import Any

import paramiko
import pytest
from airflow.sdk import DAG
from operator_harness import make_context, run_operator

from operators.build_box import LaunchBuildBox, TerminateBuildBox
from operators.rules import naming
from operators.rules.validation import ParamError
from rehearsal.ec2_local import tag_specs

RUN_ID = "manual__2026-11-25T02:00:00+00:00"


def _launch(dag_id: str, **kwargs: Any) -> tuple[DAG, LaunchBuildBox]:
    with DAG(dag_id, schedule=None) as dag:
        op = LaunchBuildBox(task_id="launch_build_box", recipe="debian12", instance_type="t3.small", **kwargs)
    return dag, op


def test_launch_sends_the_right_requests_and_answers_on_ssh(
    ec2: Any, boxes: Any, box_login: Any, subnet: dict
) -> None:
    ami = ec2.register_base_image("amibake-test-base")
    dag, op = _launch("amibake_t_launch", base_ami=ami)
    context = make_context(dag, RUN_ID)
    record = run_operator(op, context)
    build = naming.build_id(dag.dag_id, RUN_ID)

    # it defers only for what is not there yet (the box answers at once here)
    assert set(record.deferrals) <= {"InstanceRunningTrigger", "SshReachableTrigger"}
    box = record.result
    assert box["build_id"] == build
    # reached as on AWS: the instance's public IP (its box's own address), port 22
    assert box["ssh_address"] == "public_ip"
    assert (box["address"], box["port"]) == (boxes.get(box["instance_id"]).address, 22)
    assert box["host_key"] == boxes.get(box["instance_id"]).host_key
    assert box["availability_zone"] == subnet["AvailabilityZone"]
    assert json.dumps(box).find("PRIVATE KEY") == -1

    (run,) = ec2.calls("RunInstances")
    assert run["ImageId"] == ami
    assert run["InstanceType"] == "t3.small"
    assert run["SubnetId"] == subnet["SubnetId"]
    assert run["MetadataOptions.HttpTokens"] == "required"
    assert run["SecurityGroupId.1"] == box["security_group_id"]
    assert run["ClientToken"] == f"amibake-{build}-box-1"
    assert "KeyName" not in run, "no EC2 key pair: the key goes in through cloud-init"
    specs = tag_specs(run)
    assert set(specs) == {"instance", "volume", "network-interface"}
    for tags in specs.values():
        assert tags[naming.TAG_BUILD_ID] == build
        assert tags[naming.TAG_ROLE] == "build-box"
        assert tags[naming.TAG_RUN_ID] == RUN_ID
        assert tags[naming.TAG_DAG_ID] == dag.dag_id
        assert tags[naming.TAG_CREATED_AT]
    user_data = base64.b64decode(run["UserData"]).decode()
    assert user_data.startswith("#cloud-config\n")
    config = json.loads(user_data.split("\n", 1)[1])
    (authorized,) = config["ssh_authorized_keys"]
    assert authorized.split()[1] == _public_key_b64(box_login.private_key_pem)
    assert config["ssh_keys"]["ed25519_public"] == box["host_key"], "the per-build host key is pinned"

    (sg,) = ec2.calls("CreateSecurityGroup")
    assert sg["GroupName"] == naming.resource_name(build, naming.Role.BUILD_SG)
    assert sg["VpcId"] == subnet["VpcId"]
    assert tag_specs(sg)["security-group"][naming.TAG_ROLE] == "build-sg"
    (ingress,) = ec2.calls("AuthorizeSecurityGroupIngress")
    assert ingress["IpPermissions.1.IpProtocol"] == "tcp"
    assert (ingress["IpPermissions.1.FromPort"], ingress["IpPermissions.1.ToPort"]) == ("22", "22")
    assert ingress["IpPermissions.1.IpRanges.1.CidrIp"] == "127.0.0.0/8"
    assert not any(v == "0.0.0.0/0" for v in ingress.values())
    assert context["ti"].pushed["_instance_id"]["instance_id"] == box["instance_id"]


def _public_key_b64(private_pem: str) -> str:
    import io

    import paramiko

    return paramiko.Ed25519Key.from_private_key(io.StringIO(private_pem)).get_base64()


def test_launch_retry_creates_nothing_twice(ec2: Any, box_login: Any, subnet: dict) -> None:
    ami = ec2.register_base_image("amibake-test-base")
    dag, op = _launch("amibake_t_launch_retry", base_ami=ami)
    first = run_operator(op, make_context(dag, RUN_ID, try_number=1, max_tries=2)).result
    second = run_operator(op, make_context(dag, RUN_ID, try_number=2, max_tries=2)).result
    assert first["instance_id"] == second["instance_id"]
    assert first["security_group_id"] == second["security_group_id"]
    assert len(ec2.calls("RunInstances")) == 1
    assert len(ec2.calls("CreateSecurityGroup")) == 1
    assert len(ec2.calls("AuthorizeSecurityGroupIngress")) == 1


def test_launch_survives_throttling_with_one_box(ec2: Any, box_login: Any, subnet: dict) -> None:
    ami = ec2.register_base_image("amibake-test-base")
    ec2.add_fault("RunInstances", "RequestLimitExceeded", 503, times=1)
    dag, op = _launch("amibake_t_launch_throttle", base_ami=ami)
    run_operator(op, make_context(dag, RUN_ID))
    calls = ec2.calls("RunInstances")
    assert len(calls) == 2 and calls[0]["ClientToken"] == calls[1]["ClientToken"]
    live = ec2.boto3_client().describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    )["Reservations"]
    assert len(live) == 1


def test_launch_finds_the_newest_base_ami_by_owner_and_name(ec2: Any, box_login: Any, subnet: dict) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    # moto stamps CreationDate in whole seconds: set them so that creation order and name order disagree
    newest = ec2.register_base_image("el7-base-2026-01")
    older = ec2.register_base_image("el7-base-2026-02")
    ec2.register_base_image("other-2026-03")
    amis = ec2_backends[DEFAULT_ACCOUNT_ID][ec2.region].amis
    amis[newest].creation_date = datetime(2026, 2, 1, tzinfo=UTC)
    amis[older].creation_date = datetime(2026, 1, 1, tzinfo=UTC)
    dag, op = _launch("amibake_t_launch_filter", base_ami_owner="self", base_ami_name="el7-base-*")
    run_operator(op, make_context(dag, RUN_ID))
    assert ec2.calls("RunInstances")[0]["ImageId"] == newest


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("instance_type", {"instance_type": "t3 small"}),
        ("base_ami", {"base_ami": "ami-nothex"}),
        ("subnet_id", {"subnet_id": "subnet-$(x)"}),
    ],
)
def test_launch_refuses_bad_input_before_creating(
    ec2: Any, box_login: Any, subnet: dict, field: str, kwargs: dict
) -> None:
    with DAG("amibake_t_launch_bad", schedule=None) as dag:
        op = LaunchBuildBox(task_id="launch_build_box", **{"instance_type": "t3.small", **kwargs})
    with pytest.raises(ParamError, match=f"^{field}: "):
        run_operator(op, make_context(dag, RUN_ID))
    assert ec2.requests == []


def test_launch_without_ssh_cidr_is_refused_off_the_tunnel(
    ec2: Any, box_login: Any, subnet: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__AMIBAKE__SSH_ADDRESS", "public_ip")
    monkeypatch.setenv("AIRFLOW__AMIBAKE__SSH_CIDR", "")
    dag, op = _launch("amibake_t_launch_nocidr", base_ami="ami-0123456789abcdef0")
    with pytest.raises(ParamError, match="^ssh_cidr: "):
        run_operator(op, make_context(dag, RUN_ID))
    assert ec2.requests == []


def test_public_ip_mode_gives_the_box_a_per_build_host_key(
    ec2: Any, boxes: Any, box_login: Any, subnet: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The box gets its host key through user data; every try pins it, a retry reads it back."""
    monkeypatch.setenv("AIRFLOW__AMIBAKE__SSH_CIDR", "198.51.100.0/24")
    ami = ec2.register_base_image("amibake-test-base")
    dag, op = _launch("amibake_t_launch_public", base_ami=ami)
    first = run_operator(op, make_context(dag, RUN_ID, try_number=1, max_tries=2)).result
    again = run_operator(op, make_context(dag, RUN_ID, try_number=2, max_tries=2)).result
    (run,) = ec2.calls("RunInstances")
    config = json.loads(base64.b64decode(run["UserData"]).decode().split("\n", 1)[1])
    public = config["ssh_keys"]["ed25519_public"]
    assert public.startswith("ssh-ed25519 ")
    host_private = paramiko.Ed25519Key.from_private_key(io.StringIO(config["ssh_keys"]["ed25519_private"]))
    # the private host key the box gets is the one whose public half the tasks pin
    assert public.split()[:2] == [host_private.get_name(), host_private.get_base64()]
    assert config["ssh_genkeytypes"] == []
    # the box really serves it (cloud-init applied the user data), and the retry read it back
    assert first["host_key"] == again["host_key"] == boxes.get(first["instance_id"]).host_key == public
    assert op._recover_host_key(first["instance_id"]) == public
    assert (
        ec2.calls("AuthorizeSecurityGroupIngress")[0]["IpPermissions.1.IpRanges.1.CidrIp"]
        == "198.51.100.0/24"
    )


def test_failed_launch_cleans_up_on_its_last_try_only(ec2: Any, box_login: Any, subnet: dict) -> None:
    ami = ec2.register_base_image("amibake-test-base")
    dag, op = _launch("amibake_t_launch_fail", base_ami=ami)
    client = ec2.boto3_client()
    ec2.add_fault("RunInstances", "InsufficientInstanceCapacity", 400, times=2)

    with pytest.raises(Exception, match="InsufficientInstanceCapacity"):
        run_operator(op, make_context(dag, RUN_ID, try_number=1, max_tries=1))
    assert (
        len(
            client.describe_security_groups(Filters=naming.project_filters(naming.Role.BUILD_SG))[
                "SecurityGroups"
            ]
        )
        == 1
    )
    assert ec2.calls("DeleteSecurityGroup") == [], "a retry follows: keep the group for it"

    with pytest.raises(Exception, match="InsufficientInstanceCapacity"):
        run_operator(op, make_context(dag, RUN_ID, try_number=2, max_tries=1))
    assert len(ec2.calls("CreateSecurityGroup")) == 1
    assert len(ec2.calls("DeleteSecurityGroup")) == 1
    assert (
        client.describe_security_groups(Filters=naming.project_filters(naming.Role.BUILD_SG))[
            "SecurityGroups"
        ]
        == []
    )


def test_terminate_build_box_removes_box_and_group(ec2: Any, box_login: Any, subnet: dict) -> None:
    ami = ec2.register_base_image("amibake-test-base")
    dag, op = _launch("amibake_t_terminate", base_ami=ami)
    box = run_operator(op, make_context(dag, RUN_ID)).result
    with dag:
        teardown = TerminateBuildBox(task_id="terminate_build_box")
    ec2.clear_requests()
    result = run_operator(teardown, make_context(dag, RUN_ID)).result
    assert result == {"terminated": [box["instance_id"]], "security_groups": [box["security_group_id"]]}
    assert ec2.calls("TerminateInstances")[0]["InstanceId.1"] == box["instance_id"]
    assert ec2.calls("DeleteSecurityGroup")[0]["GroupId"] == box["security_group_id"]
    state = ec2.boto3_client().describe_instances(InstanceIds=[box["instance_id"]])
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] == "terminated"
    # a second run (a retried teardown) finds nothing more to do
    assert run_operator(teardown, make_context(dag, RUN_ID)).result == {
        "terminated": [],
        "security_groups": [],
    }


def test_security_group_deletion_waits_out_a_lingering_interface(
    ec2: Any, box_login: Any, subnet: dict
) -> None:
    """EC2 refuses to delete a group while a terminated box's interface still uses it: retry."""
    from operators.hooks.ec2 import BuildEc2Hook

    ami = ec2.register_base_image("amibake-test-base")
    dag, op = _launch("amibake_t_sg_linger", base_ami=ami)
    box = run_operator(op, make_context(dag, RUN_ID)).result
    hook = BuildEc2Hook(aws_conn_id="amibake_aws")
    # the interface lingering is injected here, counted; the local EC2 API's own rule (tested in
    # tests/ec2/test_instances.py) would add refusals of its own within its linger time
    ec2.configure_rule("LingeringInterfaces", linger=0)
    hook.terminate_build_instances(box["build_id"])
    ec2.add_fault("DeleteSecurityGroup", "DependencyViolation", 400, times=2)
    hook.delete_security_group(box["security_group_id"], limits=(0, 3))
    assert [r.get("fault") for r in ec2.requests if r["action"] == "DeleteSecurityGroup"] == [
        "DependencyViolation",
        "DependencyViolation",
        None,
    ]
    ec2.add_fault("DeleteSecurityGroup", "DependencyViolation", 400, times=None)
    tags = naming.resource_tags(
        build=box["build_id"], dag_id=dag.dag_id, run_id=RUN_ID, recipe="debian12", role=naming.Role.BUILD_SG
    )
    other = ec2.boto3_client().create_security_group(
        GroupName="amibake-other",
        Description="a group that stays in use",
        VpcId=subnet["VpcId"],
        TagSpecifications=[naming.tag_specification("security-group", tags)],
    )["GroupId"]
    with pytest.raises(Exception, match="DependencyViolation"):
        hook.delete_security_group(other, limits=(0, 2))


def test_launch_with_an_instance_profile(ec2: Any, box_login: Any, subnet: dict) -> None:
    iam = ec2.boto3_client("iam")
    iam.create_instance_profile(InstanceProfileName="amibake-builder")
    ami = ec2.register_base_image("amibake-test-base")
    dag, op = _launch("amibake_t_launch_profile", base_ami=ami, instance_profile="amibake-builder")
    run_operator(op, make_context(dag, RUN_ID))
    (run,) = ec2.calls("RunInstances")
    assert run["IamInstanceProfile.Name"] == "amibake-builder"
