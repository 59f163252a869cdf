"""Helpers of the distribution tests: a verified AMI made as the pipeline makes one, KMS keys, the
IAM statements distribution needs, and a run of ``DistributeAmi``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import DAG
from operator_harness import RunRecord, make_context, run_operator

from operators.ami import register_image_args
from operators.distribute import DistributeAmi
from operators.rules import naming
from operators.rules.naming import Role

RUN_ID = "scheduled__2026-11-25T02:00:00+00:00"
DAG_ID = "amibake_centos7"
BUILD = naming.build_id(DAG_ID, RUN_ID)
#: The regions copies go to (the local EC2 API's own region is us-east-1).
EU, US_WEST = "eu-west-1", "us-west-2"
ORG = "arn:aws:organizations::111122223333:organization/o-abc123defg"
OU = "arn:aws:organizations::111122223333:ou/o-abc123defg/ou-ab12-cdefgh34"


#: What docs/iam-policy.json needs for distribution (proposed there; until then the tests add it):
#: CopyImage may create only tagged images and snapshots and tag them only while copying, and only
#: amibake's AMIs and snapshots may be shared.
def make_verified_ami(local: Any, run_id: str = RUN_ID, created: datetime | None = None) -> dict[str, str]:
    """A snapshot (tagged as CreateSnapshot tags it) registered through the local EC2 API with the
    exact RegisterImage parameters of ``RegisterHVMAmi``, then tagged verified as ``SmokeInstance``
    does: what ``DistributeAmi`` gets in the DAG. ``created``: its CreationDate (default now)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    build = naming.build_id(DAG_ID, run_id)
    when = created or datetime.now(UTC)
    moto = local.boto3_client()  # straight to moto: the snapshot is completed at once

    def tags(role: Role) -> list[dict[str, str]]:
        return naming.resource_tags(
            build=build,
            dag_id=DAG_ID,
            run_id=run_id,
            recipe="centos7",
            role=role,
            created_at=when.isoformat(),
        )

    volume = moto.create_volume(Size=4, AvailabilityZone=f"{local.region}a")["VolumeId"]
    snapshot = moto.create_snapshot(
        VolumeId=volume, TagSpecifications=[naming.tag_specification("snapshot", tags(Role.SNAPSHOT))]
    )["SnapshotId"]
    moto.delete_volume(VolumeId=volume)
    ami_tags = [
        *tags(Role.AMI),
        {"Key": naming.TAG_SNAPSHOT_ID, "Value": snapshot},
        {"Key": naming.TAG_IMAGE_LINE, "Value": "amibake-centos7"},
    ]
    args = register_image_args(
        name=f"amibake-centos7-{when:%Y%m%d-%H%M}-{build}",
        snapshot_id=snapshot,
        size_gib=4,
        description=f"amibake centos7 image, build {build}",
        tags=ami_tags,
    )
    recorded = local.boto3_client(recorded=True)
    image = recorded.register_image(**args)["ImageId"]
    recorded.create_tags(Resources=[image], Tags=[{"Key": naming.TAG_VERIFIED, "Value": naming.VERIFIED}])
    ec2_backends[DEFAULT_ACCOUNT_ID][local.region].amis[image].creation_date = when
    return {"ami_id": image, "snapshot_id": snapshot, "name": args["Name"]}


def make_kms_key(local: Any, region: str, alias: str) -> str:
    """A KMS key with ``alias`` in ``region`` (moto's KMS, same server and account); its ARN."""
    kms = local.boto3_client("kms", region=region)
    arn = kms.create_key(Description="amibake test key")["KeyMetadata"]["Arn"]
    kms.create_alias(AliasName=alias, TargetKeyId=arn)
    return arn


def distribute(
    ami_id: str, distribution: dict[str, Any], *, try_number: int = 1, max_tries: int = 2, **kwargs: Any
) -> RunRecord:
    """Run ``DistributeAmi`` as the task runner and triggerer would (deferrable by default)."""
    with DAG(DAG_ID, schedule=None) as dag:
        op = DistributeAmi(
            task_id="distribute_ami",
            recipe="centos7",
            ami_id=ami_id,
            distribution=distribution,
            waiter_delay=1,
            waiter_max_attempts=30,
            **kwargs,
        )
    return run_operator(op, make_context(dag, RUN_ID, try_number=try_number, max_tries=max_tries))


def copies_of(local: Any, region: str, ami_id: str) -> list[dict[str, Any]]:
    """Every live AMI of ``region`` tagged as a copy of ``ami_id`` (read straight from moto)."""
    images = local.boto3_client(region=region).describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{naming.TAG_SOURCE_AMI}", "Values": [ami_id]}]
    )["Images"]
    return [i for i in images if i["State"] != "deregistered"]
