"""The local EC2 API's CopyImage (rehearsal.aws_rules.CopyImageRules) and its regions: what moto
alone does not do (see /work/shared/notes/moto.md), answered as EC2 answers it."""

from __future__ import annotations

import time
from typing import Any

import pytest
from botocore.exceptions import ClientError
from distribution_helpers import EU, US_WEST, make_kms_key

from rehearsal.ec2_local import region_of

#: The tags the IAM policy wants on everything CopyImage creates.
OURS = [
    {"ResourceType": kind, "Tags": [{"Key": "amibake:build-id", "Value": "b"}]}
    for kind in ("image", "snapshot")
]


def _copy(local: Any, region: str, source: dict[str, str], **extra: Any) -> str:
    client = local.boto3_client(recorded=True, region=region)
    args = {"SourceImageId": source["ami_id"], "SourceRegion": local.region, "Name": source["name"]}
    return client.copy_image(**{**args, "TagSpecifications": OURS, **extra})["ImageId"]


def _image(local: Any, region: str, image_id: str) -> dict[str, Any]:
    return local.boto3_client(recorded=True, region=region).describe_images(ImageIds=[image_id])["Images"][0]


def _code(call: Any) -> str:
    with pytest.raises(ClientError) as exc:
        call()
    return exc.value.response["Error"]["Code"]


def test_a_copy_is_pending_then_available_with_the_sources_disk_and_the_tags_asked(
    ec2: Any, source: dict[str, str]
) -> None:
    spec = [{"ResourceType": "image", "Tags": [{"Key": "amibake:build-id", "Value": "b"}]},
            {"ResourceType": "snapshot", "Tags": [{"Key": "amibake:build-id", "Value": "s"}]}]  # fmt: skip
    ec2.configure_rule("CopyImageRules", duration=3600)  # AWS still copying, however slow this test
    image_id = _copy(ec2, EU, source, TagSpecifications=spec)
    copy = _image(ec2, EU, image_id)
    assert copy["State"] == "pending"
    assert copy["Tags"] == [{"Key": "amibake:build-id", "Value": "b"}]
    home = _image(ec2, ec2.region, source["ami_id"])
    (mapping,) = copy["BlockDeviceMappings"]
    assert mapping["DeviceName"] == home["RootDeviceName"] == copy["RootDeviceName"]
    assert mapping["Ebs"]["VolumeSize"] == 4 and mapping["Ebs"]["SnapshotId"] != source["snapshot_id"]
    snapshot = ec2.boto3_client(region=EU).describe_snapshots(SnapshotIds=[mapping["Ebs"]["SnapshotId"]])
    assert snapshot["Snapshots"][0]["Tags"] == [{"Key": "amibake:build-id", "Value": "s"}]
    assert (copy["BootMode"], copy.get("EnaSupport")) == (home["BootMode"], home.get("EnaSupport"))
    ec2.configure_rule("CopyImageRules", duration=0)  # AWS finished
    assert _image(ec2, EU, image_id)["State"] == "available"
    # moto alone: no such copy in the source's region
    assert not ec2.boto3_client().describe_images(Filters=[{"Name": "image-id", "Values": [image_id]}])[
        "Images"
    ]


def test_copy_image_is_refused_where_ec2_refuses_it(ec2: Any, source: dict[str, str]) -> None:
    assert _code(lambda: _copy(ec2, EU, source, KmsKeyId="alias/x")) == "InvalidParameterDependency"
    missing = {**source, "ami_id": "ami-0123456789abcdef0"}
    assert _code(lambda: _copy(ec2, EU, missing)) == "InvalidAMIID.NotFound"
    # (asked of the rule itself: the IAM policy refuses an untagged image or snapshot first)
    rule = ec2.rule("CopyImageRules")
    params = {"SourceImageId": source["ami_id"], "SourceRegion": ec2.region, "Name": "x-copy",
              "TagSpecification.1.ResourceType": "instance", "TagSpecification.1.Tag.1.Key": "k",
              "TagSpecification.1.Tag.1.Value": "v"}  # fmt: skip
    status, body = rule.before("CopyImage", params, ec2.moto_client(EU))
    assert status == 400 and b"<Code>InvalidParameterValue</Code>" in body
    assert rule.before("CopyImage", {**params, "SourceRegion": ""}, ec2.moto_client(EU))[0] == 400
    _copy(ec2, EU, source)
    assert _code(lambda: _copy(ec2, EU, source)) == "InvalidAMIName.Duplicate"  # names: per region
    _copy(ec2, US_WEST, source)


def test_a_repeated_client_token_gets_the_original_copy(ec2: Any, source: dict[str, str]) -> None:
    first = _copy(ec2, EU, source, ClientToken="t-1")
    assert _copy(ec2, EU, source, ClientToken="t-1") == first
    images = ec2.boto3_client(region=EU).describe_images(Owners=["self"])["Images"]
    assert [i["ImageId"] for i in images] == [first]


def test_the_kms_key_decides_encryption_and_a_missing_one_fails_the_copy_later(
    ec2: Any, source: dict[str, str]
) -> None:
    make_kms_key(ec2, EU, "alias/amibake")
    good = _copy(ec2, EU, source, Encrypted=True, KmsKeyId="alias/amibake")
    bad = _copy(ec2, US_WEST, source, Encrypted=True, KmsKeyId="alias/amibake")  # no key there
    time.sleep(0.6)
    ebs = _image(ec2, EU, good)["BlockDeviceMappings"][0]["Ebs"]
    assert (ebs["Encrypted"], ebs["KmsKeyId"], _image(ec2, EU, good)["State"]) == (
        True,
        "alias/amibake",
        "available",
    )
    assert _image(ec2, US_WEST, bad)["State"] == "failed"


def test_calls_are_recorded_and_faulted_per_region(ec2: Any, source: dict[str, str]) -> None:
    assert (
        region_of("AWS4-HMAC-SHA256 Credential=testing/20261130/eu-west-1/ec2/aws4_request, Sig", "x") == EU
    )
    assert region_of("", "us-east-1") == "us-east-1"
    ec2.add_fault("DescribeImages", "InternalError", 400, region=US_WEST, times=None)
    ec2.boto3_client(recorded=True, region=EU).describe_images(Owners=["self"])
    assert _code(lambda: ec2.boto3_client(recorded=True, region=US_WEST).describe_images()) == (
        "InternalError"
    )
    assert len(ec2.calls("DescribeImages", region=EU)) == 1
    assert len(ec2.calls("DescribeImages", region=US_WEST)) == 1
    assert ec2.calls("DescribeImages", region=ec2.region) == []
