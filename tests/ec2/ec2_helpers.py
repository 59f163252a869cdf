"""Small helpers of the local-EC2-API tests."""

from __future__ import annotations

from typing import Any

import botocore.exceptions
import pytest

from operators.rules import naming

#: The CentOS project's account: its public CentOS 7 AMIs are all deprecated by now.
CENTOS_OWNER = "125523088429"


def error_of(call: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The AWS error a call answers with (fails the test if it succeeds)."""
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        call(*args, **kwargs)
    response = raised.value.response
    return {**response["Error"], "HTTPStatusCode": response["ResponseMetadata"]["HTTPStatusCode"]}


def answers(ec2: Any, action: str) -> list[tuple[int | None, str | None]]:
    """(HTTP status, AWS error code) of every recorded call of one action, oldest first."""
    return [(r.get("status"), r.get("error")) for r in ec2.requests if r["action"] == action]


def build_tags(build: str, role: naming.Role) -> list[dict[str, str]]:
    """The tag set the product gives a resource of one build (what the IAM policy asks for)."""
    return naming.resource_tags(
        build=build, dag_id="amibake_t_ec2", run_id="manual__t", recipe="debian12", role=role
    )


def tagged_volume(moto: Any, zone: str, build: str, size: int = 8) -> str:
    """A canvas volume of ``build``, made straight in moto (the rules never saw it being created)."""
    spec = [naming.tag_specification("volume", build_tags(build, naming.Role.CANVAS))]
    return moto.create_volume(AvailabilityZone=zone, Size=size, TagSpecifications=spec)["VolumeId"]


def completed_snapshot(moto: Any, zone: str, build: str = "b", size: int = 8) -> str:
    """A completed snapshot of ``build``, made straight in moto (no delay, never pending)."""
    spec = [naming.tag_specification("snapshot", build_tags(build, naming.Role.SNAPSHOT))]
    volume = tagged_volume(moto, zone, build, size)
    return moto.create_snapshot(VolumeId=volume, TagSpecifications=spec)["SnapshotId"]
