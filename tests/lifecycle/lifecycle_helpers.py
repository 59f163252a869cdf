"""Helpers of the lifecycle tests: make tagged and untagged resources in moto, read the recorder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from operators.rules import naming
from operators.rules.naming import Role

NOW = datetime.now(UTC).replace(microsecond=0)
OLD = NOW - timedelta(hours=30)
YOUNG = NOW - timedelta(minutes=20)
READ_ONLY_PREFIXES = ("Describe", "Get")


def tags(
    build: str | None,
    role: Role,
    created: datetime,
    *,
    dag_id: str = "amibake_debian12",
    run_id: str | None = None,
    recipe: str = "centos7",
) -> list[dict[str, str]]:
    """Our full tag set; ``build=None`` gives every amibake tag EXCEPT the build id (so: not ours)."""
    full = naming.resource_tags(
        build=build or "x" * naming.BUILD_ID_LEN,
        dag_id=dag_id,
        run_id=run_id or f"scheduled__{build}",
        recipe=recipe,
        role=role,
        created_at=created.isoformat(),
    )
    return [t for t in full if build is not None or t["Key"] != naming.TAG_BUILD_ID]


def make_build(local: Any, build: str | None, created: datetime, base_ami: str, **tag_args: Any) -> dict:
    """A build box with an attached canvas, a security group and a snapshot of the canvas."""
    ec2 = local.boto3_client()

    def spec(kind: str, role: Role) -> list[dict]:
        return [naming.tag_specification(kind, tags(build, role, created, **tag_args))]

    name = naming.resource_name(build or f"untagged{created.timestamp():.0f}", Role.BUILD_SG)
    sg = ec2.create_security_group(
        GroupName=f"{name}-{len(ec2.describe_security_groups()['SecurityGroups'])}",
        Description="amibake test",
        TagSpecifications=spec("security-group", Role.BUILD_SG),
    )["GroupId"]
    inst = ec2.run_instances(
        ImageId=base_ami,
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.medium",
        SecurityGroupIds=[sg],
        TagSpecifications=spec("instance", Role.BUILD_BOX),
    )["Instances"][0]
    vol = ec2.create_volume(
        Size=2,
        AvailabilityZone=inst["Placement"]["AvailabilityZone"],
        TagSpecifications=spec("volume", Role.CANVAS),
    )["VolumeId"]
    ec2.attach_volume(VolumeId=vol, InstanceId=inst["InstanceId"], Device="/dev/sdf")
    snap = ec2.create_snapshot(VolumeId=vol, TagSpecifications=spec("snapshot", Role.SNAPSHOT))["SnapshotId"]
    return {"instance": inst["InstanceId"], "volume": vol, "sg": sg, "snapshot": snap}


def make_snapshot(local: Any, build: str | None, created: datetime) -> str:
    """A tagged (or, build None, not ours) snapshot of a throwaway volume that is deleted again."""
    ec2 = local.boto3_client()
    vol = ec2.create_volume(Size=1, AvailabilityZone=f"{local.region}a")["VolumeId"]
    snap = ec2.create_snapshot(
        VolumeId=vol,
        TagSpecifications=[naming.tag_specification("snapshot", tags(build, Role.SNAPSHOT, created))],
    )["SnapshotId"]
    ec2.delete_volume(VolumeId=vol)
    return snap


def make_ami(
    local: Any,
    build: str | None,
    created: datetime,
    *,
    snapshot: str | None = None,
    recipe: str = "centos7",
    state: str = "available",
    line: str | None = None,
    verified: bool = True,
) -> str:
    """An AMI tagged like ours (moto drops RegisterImage tags, so they are added after), with the
    given state and CreationDate set in moto's backend, ``amibake:snapshot-id`` naming its snapshot,
    ``amibake:image-line`` its line (default ``amibake-<recipe>``, the default AMI name prefix) and,
    when ``verified``, ``amibake:verified=true`` (its smoke check passed, as ``SmokeInstance`` tags it)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    ec2 = local.boto3_client()
    image = ec2.register_image(
        Name=f"amibake-{recipe}-{build}-{created:%Y%m%d%H%M%S}",
        RootDeviceName="/dev/sda1",
        VirtualizationType="hvm",
        BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snapshot or "snap-00000000"}}],
    )["ImageId"]
    image_tags = [
        *tags(build, Role.AMI, created, recipe=recipe),
        {"Key": naming.TAG_IMAGE_LINE, "Value": line or f"amibake-{recipe}"},
    ]
    if snapshot:
        image_tags.append({"Key": naming.TAG_SNAPSHOT_ID, "Value": snapshot})
    if verified:
        image_tags.append({"Key": naming.TAG_VERIFIED, "Value": naming.VERIFIED})
    ec2.create_tags(Resources=[image], Tags=image_tags)
    moto_image = ec2_backends[DEFAULT_ACCOUNT_ID][local.region].amis[image]
    moto_image.state = state
    moto_image.creation_date = created
    return image


def set_instance_state(local: Any, instance_id: str, state: str) -> None:
    """Put a moto instance in a state the API cannot hold it in (moto terminates at once)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    ec2_backends[DEFAULT_ACCOUNT_ID][local.region].get_instance(instance_id)._state.name = state


def mutating(local: Any) -> list[dict[str, Any]]:
    """Every recorded call that is not a read."""
    return [r for r in local.requests if not r["action"].startswith(READ_ONLY_PREFIXES)]


def ids(calls: list[dict[str, Any]], action: str) -> list[str]:
    """Resource ids named by the recorded calls of one action (any ``...Id`` / ``...Id.N`` param)."""
    return [
        value
        for call in calls
        if call["action"] == action
        for key, value in sorted(call["params"].items())
        if key.split(".")[0].endswith("Id")
    ]


def all_ids(calls: list[dict[str, Any]]) -> set[str]:
    """Every resource id any recorded call names."""
    return {v for c in calls for k, v in c["params"].items() if k.split(".")[0].endswith("Id")}
