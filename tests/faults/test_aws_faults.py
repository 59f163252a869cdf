"""AWS answering badly: throttling and 5xx on every call of the pipeline, and a waiter that runs out
while AWS is still working. Real loop-backed canvas and real build-image freeze/thaw (root).

Throttling and 5xx come from the recording proxy in front of moto (the request is refused before
moto sees it, as AWS does with RequestLimitExceeded); the slow snapshot is moto's own backend state
(``status = "pending"``, which moto never reports by itself: every snapshot it makes is ``completed``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fault_helpers import left, nothing_left

from operators.ami import RegisterHVMAmi
from operators.rules import naming
from operators.rules.naming import Role
from operators.snapshot import FrozenSnapshot

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and mounts"),
]
#: every EC2 action the nightly pipeline calls (launch, attach, snapshot, register, teardowns)
PIPELINE_ACTIONS = (
    "DescribeImages",
    "DescribeSubnets",
    "DescribeSecurityGroups",
    "CreateSecurityGroup",
    "AuthorizeSecurityGroupIngress",
    "DescribeInstances",
    "RunInstances",
    "DescribeVolumes",
    "CreateVolume",
    "AttachVolume",
    "DescribeSnapshots",
    "CreateSnapshot",
    "RegisterImage",
    "TerminateInstances",
    "DeleteSecurityGroup",
    "DeleteVolume",
)
CREATES = (
    "CreateSecurityGroup",
    "RunInstances",
    "CreateVolume",
    "AttachVolume",
    "CreateSnapshot",
    "RegisterImage",
)


@pytest.mark.long
def test_throttling_and_5xx_on_every_call_are_retried_without_a_duplicate(rig: Any) -> None:
    for action in PIPELINE_ACTIONS:  # the first call of each action throttled, the second a 5xx
        rig.ec2.add_fault(action, "RequestLimitExceeded", 503, times=1)
        rig.ec2.add_fault(action, "InternalError", 500, times=1)
    rig.launch_and_attach()
    rig.mount()
    snapshot = rig.run(FrozenSnapshot, "frozen_snapshot", box=rig.box, canvas=rig.canvas, freeze_timeout=60)
    rig.writable()
    image = rig.run(RegisterHVMAmi, "register_hvm_ami", snapshot=snapshot, size_gib=rig.canvas["size_gib"])
    rig.build_image("umount")
    rig.teardowns()

    requests = rig.ec2.requests
    answered = Counter(r["action"] for r in requests if "fault" not in r)
    faulted = Counter(r["action"] for r in requests if "fault" in r)
    assert {a: faulted[a] for a in PIPELINE_ACTIONS} == dict.fromkeys(PIPELINE_ACTIONS, 2), (
        "every fault was hit"
    )
    for action in PIPELINE_ACTIONS:  # each action's first answered call came right after its two faults
        calls = [r for r in requests if r["action"] == action]
        assert [r.get("fault") for r in calls[:3]] == ["RequestLimitExceeded", "InternalError", None], action
    assert {a: answered[a] for a in CREATES} == dict.fromkeys(CREATES, 1), answered
    runs = rig.ec2.calls("RunInstances")
    assert len({r["ClientToken"] for r in runs}) == 1, "botocore's retries kept the ClientToken"
    client = rig.ec2.boto3_client()
    assert left(client, rig.build) == {
        **nothing_left(),
        "snapshots": [snapshot["snapshot_id"]],
        "images": [image["ami_id"]],
    }


@contextmanager
def _snapshots_kept_pending(rig: Any) -> Iterator[None]:
    """Hold every new snapshot in ``pending`` (AWS still copying blocks): the local EC2 API's
    snapshot rule made slow, then finished."""
    rig.ec2.configure_rule("SnapshotProgress", duration=3600)
    try:
        yield
    finally:
        rig.ec2.configure_rule("SnapshotProgress", duration=0)  # AWS finished


def _snapshot_ids(rig: Any) -> list[str]:
    client = rig.ec2.boto3_client()
    found = client.describe_snapshots(
        OwnerIds=["self"], Filters=naming.build_filters(rig.build, Role.SNAPSHOT)
    )
    return [s["SnapshotId"] for s in found["Snapshots"]]


@pytest.mark.parametrize(
    "deferrable",
    [
        pytest.param(True, id="deferred"),
        pytest.param(False, id="in-worker"),
    ],
)
def test_a_waiter_running_out_while_aws_works_is_picked_up_by_the_next_try(
    rig: Any, deferrable: bool
) -> None:
    rig.launch_and_attach()
    rig.mount()
    rig.ec2.clear_requests()
    kwargs = {"box": rig.box, "canvas": rig.canvas, "freeze_timeout": 60, "deferrable": deferrable}
    with _snapshots_kept_pending(rig):
        with pytest.raises(Exception, match="(?i)max attempts|did not complete|waiter"):
            rig.run(FrozenSnapshot, "frozen_snapshot", waiter_delay=1, waiter_max_attempts=2, **kwargs)
        rig.writable()  # thawed right after CreateSnapshot, long before the wait ended
        (pending,) = _snapshot_ids(rig)
    again = rig.run(
        FrozenSnapshot, "frozen_snapshot", try_number=2, waiter_delay=1, waiter_max_attempts=5, **kwargs
    )
    assert again["snapshot_id"] == pending
    assert len(rig.ec2.calls("CreateSnapshot")) == 1
    assert _snapshot_ids(rig) == [pending]
