"""Copies are retired with their source: ``lifecycle.plan_copy_rotation`` (pure) and ``RotateAmis``
with a distribution, against the local EC2 API in two regions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from distribution_helpers import EU, copies_of, distribute, make_verified_ami

from operators.rotate import RotateAmis
from operators.rules import lifecycle, naming

HOME = "us-east-1"
NOW = datetime(2026, 11, 30, 21, 0, tzinfo=UTC)


def _image(
    image_id: str,
    *,
    source: str = "",
    region: str = HOME,
    line: str = "amibake-centos7",
    snapshot: str = "",
    state: str = "available",
    build: str = "0123456789ab",
) -> dict[str, Any]:
    tags = {naming.TAG_BUILD_ID: build, naming.TAG_RECIPE: "centos7", naming.TAG_IMAGE_LINE: line}
    if source:
        tags |= {naming.TAG_SOURCE_AMI: source, naming.TAG_SOURCE_REGION: region}
    mappings = [{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot}}] if snapshot else []
    return {"ImageId": image_id, "State": state, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
            "BlockDeviceMappings": mappings, "CreationDate": NOW.isoformat()}  # fmt: skip


def _snapshot(snapshot_id: str) -> dict[str, Any]:
    return {"SnapshotId": snapshot_id, "Tags": [{"Key": naming.TAG_BUILD_ID, "Value": "0123456789ab"}]}


def test_copies_follow_their_sources_and_nothing_else() -> None:
    at = (NOW + timedelta(minutes=1)).isoformat()
    plan = lifecycle.RotationPlan(
        kept=["ami-new"],
        deprecate=[lifecycle.Action("image", "ami-mid", "deprecate", "", "b", {"deprecate_at": at})],
        deregister=[lifecycle.Action("image", "ami-old", "deregister", "", "b")],
        delete_snapshots=[],
    )
    home = [_image("ami-new"), _image("ami-mid"), _image("ami-old")]  # ami-gone: deregistered earlier
    images = [
        _image("ami-c-new", source="ami-new", snapshot="snap-new"),
        _image("ami-c-mid", source="ami-mid", snapshot="snap-mid"),
        _image("ami-c-old", source="ami-old", snapshot="snap-old"),
        _image("ami-c-gone", source="ami-gone", snapshot="snap-gone"),
        _image("ami-c-shared", source="ami-old", snapshot="snap-used"),
        _image("ami-not-ours", snapshot="snap-used"),  # uses snap-used: it stays
        _image("ami-c-other-home", source="ami-old", region="eu-central-1", snapshot="snap-x"),
        _image("ami-c-other-line", source="ami-old", line="amibake-test", snapshot="snap-y"),
    ]
    images[5]["Tags"] = []
    snapshots = [
        _snapshot(s) for s in ("snap-new", "snap-mid", "snap-old", "snap-gone", "snap-used", "snap-x")
    ]
    copy_plan = lifecycle.plan_copy_rotation(
        plan, home_region=HOME, home_images=home, images=images, snapshots=snapshots,
        recipe="centos7", line="amibake-centos7",
    )  # fmt: skip
    assert [(a.resource_id, a.detail["deprecate_at"]) for a in copy_plan.deprecate] == [("ami-c-mid", at)]
    assert sorted(a.resource_id for a in copy_plan.deregister) == ["ami-c-gone", "ami-c-old", "ami-c-shared"]
    assert "which is gone" in next(a.reason for a in copy_plan.deregister if a.resource_id == "ami-c-gone")
    assert sorted(a.resource_id for a in copy_plan.delete_snapshots) == ["snap-gone", "snap-old"]


@pytest.mark.long
def test_rotation_retires_the_copies_with_their_source(ec2: Any) -> None:
    """Three nightly AMIs copied to eu-west-1; keep 1 + grace 1: the oldest is deregistered and its
    copy too (with the copy's snapshot), the middle one deprecated and its copy too, at the same
    time; the newest and its copy stay. A second rotation changes nothing."""
    now = datetime.now(UTC)
    amis = [
        make_verified_ami(ec2, f"scheduled__night{n}", created=now - timedelta(days=n)) for n in (2, 1, 0)
    ]
    wanted = {"regions": [{"region": EU}]}
    copies = [distribute(a["ami_id"], wanted).result["copies"][EU] for a in amis]
    (old_copy,) = copies_of(ec2, EU, amis[0]["ami_id"])
    old_snapshot = old_copy["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    ec2.clear_requests()

    rotate = RotateAmis(task_id="rotate", recipe="centos7", new_ami_id=amis[2]["ami_id"], keep="1", grace="1",
                        distribution=wanted)  # fmt: skip
    result = rotate.execute({})
    assert result["deregistered"] == [amis[0]["ami_id"]] and result["deprecated"] == [amis[1]["ami_id"]]
    assert result["copies"] == {
        EU: {"deprecated": [copies[1]], "deregistered": [copies[0]], "deleted_snapshots": [old_snapshot]}
    }
    assert [c["ImageId"] for c in ec2.calls("DeregisterImage", region=EU)] == [copies[0]]
    assert [c["SnapshotId"] for c in ec2.calls("DeleteSnapshot", region=EU)] == [old_snapshot]
    (home_at,) = [c["DeprecateAt"] for c in ec2.calls("EnableImageDeprecation", region=HOME)]
    (eu_at,) = [c["DeprecateAt"] for c in ec2.calls("EnableImageDeprecation", region=EU)]
    assert home_at == eu_at
    assert not copies_of(ec2, EU, amis[0]["ami_id"])
    assert [c["ImageId"] for c in copies_of(ec2, EU, amis[2]["ami_id"])] == [copies[2]]

    ec2.clear_requests()
    again = RotateAmis(task_id="rotate_again", recipe="centos7", new_ami_id=amis[2]["ami_id"], keep="1",
                       grace="1", distribution=wanted).execute({})  # fmt: skip
    assert again["copies"] == {EU: {"deprecated": [], "deregistered": [], "deleted_snapshots": []}}
    assert [r["action"] for r in ec2.requests if not r["action"].startswith("Describe")] == []
