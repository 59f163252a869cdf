"""Snapshots as AWS has them: unknown for a moment, then ``pending`` with Progress rising, then
``completed``; and the product's snapshot wait (the trigger the triggerer runs, and the blocking wait)
and CreateSnapshot against that."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from ec2_helpers import answers, build_tags, error_of, tagged_volume
from operator_harness import make_context, rebuild, run_operator
from test_snapshot import RUN_ID, _assert_writable

from operators.rules import naming
from operators.snapshot import FrozenSnapshot
from operators.triggers.ec2 import SnapshotCompletedTrigger


def test_a_snapshot_is_pending_with_rising_progress_then_completed(aws: Any, admin: Any, client: Any) -> None:
    aws.configure_rule("EventualConsistency", delay=0)
    aws.configure_rule("SnapshotProgress", duration=2.0)
    started = client.create_snapshot(VolumeId=tagged_volume(admin, "us-east-1a", "b"))
    assert started["State"] == "pending"
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        snap = client.describe_snapshots(SnapshotIds=[started["SnapshotId"]])["Snapshots"][0]
        seen.append((snap["State"], int(snap["Progress"].rstrip("%"))))
        if snap["State"] == "completed":
            break
        time.sleep(0.4)
    states = [s for s, _ in seen]
    progress = [p for _, p in seen]
    assert states[0] == "pending" and states[-1] == "completed"
    assert progress == sorted(progress) and progress[-1] == 100
    assert len({p for s, p in seen if s == "pending"}) >= 2, f"progress did not rise while pending: {seen}"


def test_a_new_snapshot_is_unknown_for_a_moment(aws: Any, admin: Any, client: Any) -> None:
    aws.configure_rule("EventualConsistency", delay=1.0)
    snap = client.create_snapshot(VolumeId=tagged_volume(admin, "us-east-1a", "b"))["SnapshotId"]
    error = error_of(client.describe_snapshots, SnapshotIds=[snap])
    assert (error["Code"], error["HTTPStatusCode"]) == ("InvalidSnapshot.NotFound", 400)
    assert snap not in [s["SnapshotId"] for s in client.describe_snapshots(OwnerIds=["self"])["Snapshots"]]


@pytest.mark.parametrize("deferred", [True, False], ids=["trigger", "blocking"])
def test_the_snapshot_wait_copes_with_an_unknown_then_pending_snapshot(
    ec2: Any, moto: Any, hook: Any, deferred: bool
) -> None:
    """Right after CreateSnapshot the product waits: its waiter meets NotFound, then pending, and
    must end with success (botocore's own snapshot_completed waiter fails at once on NotFound)."""
    ec2.configure_rule("EventualConsistency", delay=4.0)  # longer than a client and its waiter take to start
    ec2.configure_rule("SnapshotProgress", duration=5.0)
    build = "snapwait"
    snap = hook.create_snapshot(
        build,
        volume_id=tagged_volume(moto, "us-east-1a", build),
        description="t",
        tags=build_tags(build, naming.Role.SNAPSHOT),
    )
    if deferred:
        trigger = rebuild(SnapshotCompletedTrigger(snapshot_id=snap, waiter_delay=1, waiter_max_attempts=10))

        async def first_event() -> dict[str, Any]:
            async for event in trigger.run():
                return event.payload
            raise AssertionError("no event")

        assert asyncio.run(first_event()) == {"status": "success", "snapshot_id": snap}
    else:
        hook.wait("snapshot_completed", (1, 10), SnapshotIds=[snap])
    codes = [code for _, code in answers(ec2, "DescribeSnapshots")]
    assert codes[0] == "InvalidSnapshot.NotFound" and codes[-1] is None
    assert len(ec2.calls("CreateSnapshot")) == 1
    assert moto.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]["State"] == "completed"


def test_a_lost_create_snapshot_answer_in_frozen_snapshot_takes_one_snapshot(
    ec2: Any, mounted_canvas: dict[str, Any]
) -> None:
    """The real FrozenSnapshot on a real box with a mounted canvas: CreateSnapshot acts, its answer
    never comes; the operator finds the snapshot instead of taking a second one, and thaws."""
    ec2.add_fault("CreateSnapshot", when="after", drop_connection=True)
    setup = mounted_canvas
    with setup["dag"]:
        op = FrozenSnapshot(
            task_id="frozen_snapshot_lost",
            recipe="debian12",
            box=setup["box"],
            canvas=setup["canvas"],
            freeze_timeout=60,
            waiter_delay=1,
            waiter_max_attempts=30,
        )
    result = run_operator(op, make_context(setup["dag"], RUN_ID)).result
    assert [r.get("fault") for r in ec2.requests if r["action"] == "CreateSnapshot"] == ["after:dropped"]
    ours = ec2.boto3_client().describe_snapshots(
        OwnerIds=["self"], Filters=naming.build_filters(setup["build"], naming.Role.SNAPSHOT)
    )["Snapshots"]
    assert [(s["SnapshotId"], s["State"]) for s in ours] == [(result["snapshot_id"], "completed")]
    _assert_writable(setup)
