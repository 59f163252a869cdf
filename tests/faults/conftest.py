"""Fault-test fixtures on top of tests/conftest.py."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from operators import naming
from operators.naming import Role

# The operator harness of tests/operators runs an operator as the task runner + triggerer would.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operators"))
PREVIOUS_RUN = "scheduled__2026-11-24T02:00:00+00:00"


@pytest.fixture
def previous_good(ec2: Any) -> dict[str, str]:
    """Last night's debian12 AMI and its snapshot, tagged as the nightly tags them."""
    client = ec2.boto3_client()
    build = naming.build_id("amibake_nightly", PREVIOUS_RUN)
    created = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0).isoformat()

    def tags(role: Role) -> list[dict[str, str]]:
        return naming.resource_tags(
            build=build,
            dag_id="amibake_nightly",
            run_id=PREVIOUS_RUN,
            recipe="debian12",
            role=role,
            created_at=created,
        )

    vol = client.create_volume(Size=2, AvailabilityZone=f"{ec2.region}a")["VolumeId"]
    snap = client.create_snapshot(
        VolumeId=vol, TagSpecifications=[naming.tag_specification("snapshot", tags(Role.SNAPSHOT))]
    )["SnapshotId"]
    client.delete_volume(VolumeId=vol)
    ami = client.register_image(
        Name=f"amibake-debian12-20261124-0200-{build}",
        RootDeviceName="/dev/sda1",
        VirtualizationType="hvm",
        BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap}}],
    )["ImageId"]
    client.create_tags(
        Resources=[ami], Tags=[*tags(Role.AMI), {"Key": naming.TAG_SNAPSHOT_ID, "Value": snap}]
    )
    return {"ami": ami, "snapshot": snap, "build": build}
