"""AMIs as AWS has them: deprecated public AMIs hidden, deprecation implemented, RegisterImage
validated and described as registered; and the product's base-AMI lookup, rotation and
RegisterHVMAmi against that."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from airflow.sdk import DAG
from ec2_helpers import CENTOS_OWNER, build_tags, completed_snapshot, error_of
from operator_harness import make_context, run_operator

from operators import defaults
from operators.ami import RegisterHVMAmi, register_image_args
from operators.rules import naming
from rehearsal.ec2_local import tag_specs

RUN_ID = "manual__2026-11-25T02:00:00+00:00"
ZONE = "us-east-1a"


# -- 1. deprecated AMIs ----------------------------------------------------------------------------
def test_another_accounts_deprecated_ami_is_hidden_unless_asked_for(aws: Any, client: Any) -> None:
    old = aws.register_base_image(
        "CentOS Linux 7 x86_64 HVM EBS 2002_01", owner=CENTOS_OWNER, deprecated=True
    )
    fresh = aws.register_base_image("CentOS Linux 7 x86_64 HVM EBS 2211", owner=CENTOS_OWNER)

    def names(**kwargs: Any) -> set[str]:
        return {i["ImageId"] for i in client.describe_images(Owners=[CENTOS_OWNER], **kwargs)["Images"]}

    assert names() == {fresh}
    assert names(IncludeDeprecated=False) == {fresh}
    assert names(IncludeDeprecated=True) == {old, fresh}
    # asked for by id, AWS returns it (with its DeprecationTime)
    (described,) = client.describe_images(ImageIds=[old])["Images"]
    assert datetime.fromisoformat(described["DeprecationTime"].replace("Z", "+00:00")) < datetime.now(UTC)
    assert described["Public"] is True and described["OwnerId"] == CENTOS_OWNER


def test_the_owner_always_sees_its_own_deprecated_amis(aws: Any, client: Any) -> None:
    own = aws.register_base_image("amibake-old-golden", deprecated=True)
    assert [i["ImageId"] for i in client.describe_images(Owners=["self"])["Images"]] == [own]


def test_base_ami_lookup_finds_a_deprecated_public_centos_image(ec2: Any, hook: Any) -> None:
    """A first night on AWS with the defaults: the newest CentOS 7 AMI, deprecated, of another account."""
    older = ec2.register_base_image(
        "CentOS Linux 7 x86_64 HVM EBS 2002_01", owner=CENTOS_OWNER, deprecated=True
    )
    ec2.register_base_image("CentOS Stream 9 x86_64", owner=CENTOS_OWNER)
    found = hook.resolve_base_ami(owner=defaults.DEFAULT_BASE_AMI_OWNER, name=defaults.DEFAULT_BASE_AMI_NAME)
    assert found["ImageId"] == older
    (sent,) = ec2.calls("DescribeImages")
    assert sent["IncludeDeprecated"] == "true"
    assert sent["Owner.1"] == CENTOS_OWNER


# -- 6. Enable / DisableImageDeprecation ----------------------------------------------------------------
def test_image_deprecation_is_set_rounded_shown_and_cleared(aws: Any, client: Any) -> None:
    image = aws.register_base_image("amibake-debian12-20261101-0200-x")
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3, seconds=40)
    client.enable_image_deprecation(ImageId=image, DeprecateAt=at)
    (sent,) = aws.calls("EnableImageDeprecation")
    assert sent["ImageId"] == image
    shown = client.describe_images(ImageIds=[image])["Images"][0]["DeprecationTime"]
    rounded = (at + timedelta(seconds=30)).replace(second=0)
    assert shown == rounded.strftime("%Y-%m-%dT%H:%M:00.000Z")
    client.disable_image_deprecation(ImageId=image)
    assert "DeprecationTime" not in client.describe_images(ImageIds=[image])["Images"][0]


def test_image_deprecation_refused_as_aws_refuses_it(aws: Any, client: Any) -> None:
    own = aws.register_base_image("amibake-own")
    foreign = aws.register_base_image("CentOS Linux 7", owner=CENTOS_OWNER)
    past = datetime.now(UTC) - timedelta(hours=1)
    assert (
        error_of(client.enable_image_deprecation, ImageId=own, DeprecateAt=past)["Code"]
        == "InvalidParameterValue"
    )
    far = datetime.now(UTC) + timedelta(days=11 * 365)
    assert (
        error_of(client.enable_image_deprecation, ImageId=own, DeprecateAt=far)["Code"]
        == "InvalidParameterValue"
    )
    soon = datetime.now(UTC) + timedelta(days=1)
    assert (
        error_of(client.enable_image_deprecation, ImageId=foreign, DeprecateAt=soon)["Code"] == "AuthFailure"
    )
    missing = "ami-0123456789abcdef0"
    assert error_of(client.enable_image_deprecation, ImageId=missing, DeprecateAt=soon)["Code"] == (
        "InvalidAMIID.NotFound"
    )


# -- 5. RegisterImage ---------------------------------------------------------------------------------
def _args(snapshot_id: str, **changes: Any) -> dict[str, Any]:
    args = register_image_args(
        name="amibake-t-20261125-0200-abc",
        snapshot_id=snapshot_id,
        size_gib=8,
        description="t",
        tags=build_tags("abc", naming.Role.AMI),
    )
    return {**args, **changes}


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"RootDeviceName": "/dev/xvda"}, "InvalidBlockDeviceMapping"),
        ({"BootMode": "bios"}, "InvalidParameterValue"),
        ({"ImdsSupport": "v1.0"}, "InvalidParameterValue"),
        ({"Architecture": "amd64"}, "InvalidParameterValue"),
        ({"Name": "night?build"}, "InvalidAMIName.Malformed"),
        ({"SriovNetSupport": "complex"}, "InvalidParameterValue"),
        (
            {"TagSpecifications": [{"ResourceType": "instance", "Tags": [{"Key": "k", "Value": "v"}]}]},
            "InvalidParameterValue",
        ),
    ],
)
def test_register_image_refuses_what_aws_refuses(
    aws: Any, admin: Any, client: Any, changes: dict[str, Any], code: str
) -> None:
    snap = completed_snapshot(admin, ZONE)
    assert error_of(client.register_image, **_args(snap, **changes))["Code"] == code
    assert admin.describe_images(Owners=["self"])["Images"] == []


def test_register_image_refuses_missing_pending_and_too_small_snapshots(
    aws: Any, admin: Any, client: Any
) -> None:
    missing = "snap-0123456789abcdef0"
    assert error_of(client.register_image, **_args(missing))["Code"] == "InvalidSnapshot.NotFound"
    big = completed_snapshot(admin, ZONE, size=20)
    assert error_of(client.register_image, **_args(big))["Code"] == "InvalidBlockDeviceMapping"
    volume = admin.create_volume(AvailabilityZone=ZONE, Size=8)["VolumeId"]
    pending = client.create_snapshot(VolumeId=_visible_volume(client, volume))["SnapshotId"]
    assert error_of(client.register_image, **_args(pending))["Code"] in (
        "IncorrectState",
        "InvalidSnapshot.NotFound",
    )
    assert admin.describe_images(Owners=["self"])["Images"] == []


def _visible_volume(client: Any, volume_id: str) -> str:
    """A volume made straight in moto is known at once (the rules never saw it being created)."""
    client.describe_volumes(VolumeIds=[volume_id])
    return volume_id


def test_register_image_refuses_a_duplicate_name(aws: Any, admin: Any, client: Any) -> None:
    first = client.register_image(**_args(completed_snapshot(admin, ZONE)))["ImageId"]
    error = error_of(client.register_image, **_args(completed_snapshot(admin, ZONE)))
    assert error["Code"] == "InvalidAMIName.Duplicate"
    assert first in error["Message"]


def test_registered_ami_is_described_as_registered_and_its_snapshot_stays_in_use(
    aws: Any, admin: Any, client: Any
) -> None:
    snap = completed_snapshot(admin, ZONE)
    args = _args(snap)
    image_id = client.register_image(**args)["ImageId"]
    image = client.describe_images(ImageIds=[image_id])["Images"][0]
    assert image["BlockDeviceMappings"] == args["BlockDeviceMappings"]
    assert image["RootDeviceName"] == args["RootDeviceName"] == "/dev/sda1"
    assert (image["BootMode"], image["ImdsSupport"], image["EnaSupport"], image["SriovNetSupport"]) == (
        "legacy-bios",
        "v2.0",
        True,
        "simple",
    )
    assert (image["VirtualizationType"], image["Architecture"], image["RootDeviceType"]) == (
        "hvm",
        "x86_64",
        "ebs",
    )
    assert naming.tags_to_dict(image["Tags"]) == naming.tags_to_dict(args["TagSpecifications"][0]["Tags"])
    # no made-up 15 GiB snapshot of admin's: the only snapshot is ours, and AWS keeps it while in use
    assert [s["SnapshotId"] for s in admin.describe_snapshots(OwnerIds=["self"])["Snapshots"]] == [snap]
    assert error_of(client.delete_snapshot, SnapshotId=snap)["Code"] == "InvalidSnapshot.InUse"
    client.deregister_image(ImageId=image_id)
    client.delete_snapshot(SnapshotId=snap)


def test_register_hvm_ami_tags_at_creation_and_sends_no_create_tags(ec2: Any, moto: Any) -> None:
    """The product's RegisterHVMAmi: one RegisterImage with its tags, no CreateTags (moto's
    workaround is gone), and DescribeImages shows what it sent."""
    snap = completed_snapshot(moto, ZONE)
    with DAG("amibake_t_ec2_register", schedule=None) as dag:
        op = RegisterHVMAmi(
            task_id="register_hvm_ami",
            recipe="debian12",
            snapshot={"snapshot_id": snap, "volume_id": "vol-0123456789abcdef0"},
            size_gib=8,
        )
    result = run_operator(op, make_context(dag, RUN_ID)).result
    (sent,) = ec2.calls("RegisterImage")
    assert ec2.calls("CreateTags") == []
    image = moto.describe_images(ImageIds=[result["ami_id"]])["Images"][0]
    assert naming.tags_to_dict(image["Tags"]) == tag_specs(sent)["image"]
    assert result["snapshot_id"] == snap
    assert image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] == snap
    assert image["BootMode"] == defaults.BOOT_MODE and image["ImdsSupport"] == defaults.IMDS_SUPPORT
