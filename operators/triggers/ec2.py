"""Deferrable waits of amibake, run by the triggerer so no worker slot is held while AWS works.

The three AWS waits subclass the provider's ``AwsBaseWaiterTrigger`` with :class:`BuildEc2Hook`
(client API, which the async waiters need) and botocore's EC2 waiters. Their limits are explicit
and generous (see :mod:`operators.defaults`): a snapshot or an AMI may take 30+ minutes.
"""

from __future__ import annotations

from airflow.providers.amazon.aws.triggers.base import AwsBaseWaiterTrigger

from operators import defaults
from operators.hooks.ec2 import BuildEc2Hook

#: botocore's snapshot_completed waiter has no failure acceptor: a snapshot in ``error`` would be
#: polled until the attempts run out. Fail at once instead.
SNAPSHOT_ACCEPTORS = [
    {"matcher": "pathAll", "argument": "Snapshots[].State", "expected": "completed", "state": "success"},
    {"matcher": "pathAny", "argument": "Snapshots[].State", "expected": "error", "state": "failure"},
]


class _Ec2WaiterTrigger(AwsBaseWaiterTrigger):
    """Common constructor of the EC2 waiter triggers."""

    aws_hook_class = BuildEc2Hook


class InstanceRunningTrigger(_Ec2WaiterTrigger):
    """Wait until an instance is ``running``."""

    def __init__(
        self,
        *,
        instance_id: str,
        waiter_delay: int = defaults.WAIT_INSTANCE_RUNNING[0],
        waiter_max_attempts: int = defaults.WAIT_INSTANCE_RUNNING[1],
        aws_conn_id: str | None = defaults.AWS_CONN_ID,
        region_name: str | None = None,
        verify: bool | str | None = None,
        botocore_config: dict | None = None,
    ) -> None:
        super().__init__(
            serialized_fields={"instance_id": instance_id},
            waiter_name="instance_running",
            waiter_args={"InstanceIds": [instance_id]},
            failure_message=f"instance {instance_id} did not reach running",
            status_message=f"instance {instance_id} state",
            status_queries=["Reservations[].Instances[].State.Name"],
            return_key="instance_id",
            return_value=instance_id,
            waiter_delay=waiter_delay,
            waiter_max_attempts=waiter_max_attempts,
            aws_conn_id=aws_conn_id,
            region_name=region_name,
            verify=verify,
            botocore_config=botocore_config,
        )


class SnapshotCompletedTrigger(_Ec2WaiterTrigger):
    """Wait until a snapshot is ``completed``; fail at once when it is ``error``."""

    def __init__(
        self,
        *,
        snapshot_id: str,
        waiter_delay: int = defaults.WAIT_SNAPSHOT_COMPLETED[0],
        waiter_max_attempts: int = defaults.WAIT_SNAPSHOT_COMPLETED[1],
        aws_conn_id: str | None = defaults.AWS_CONN_ID,
        region_name: str | None = None,
        verify: bool | str | None = None,
        botocore_config: dict | None = None,
    ) -> None:
        super().__init__(
            serialized_fields={"snapshot_id": snapshot_id},
            waiter_name="snapshot_completed",
            waiter_args={"SnapshotIds": [snapshot_id]},
            failure_message=f"snapshot {snapshot_id} did not complete",
            status_message=f"snapshot {snapshot_id} state",
            status_queries=["Snapshots[].State", "Snapshots[].Progress"],
            return_key="snapshot_id",
            return_value=snapshot_id,
            waiter_delay=waiter_delay,
            waiter_max_attempts=waiter_max_attempts,
            waiter_config_overrides={"acceptors": SNAPSHOT_ACCEPTORS},
            aws_conn_id=aws_conn_id,
            region_name=region_name,
            verify=verify,
            botocore_config=botocore_config,
        )


class ImageAvailableTrigger(_Ec2WaiterTrigger):
    """Wait until an AMI is ``available`` (botocore's waiter fails at once on ``failed``)."""

    def __init__(
        self,
        *,
        image_id: str,
        waiter_delay: int = defaults.WAIT_IMAGE_AVAILABLE[0],
        waiter_max_attempts: int = defaults.WAIT_IMAGE_AVAILABLE[1],
        aws_conn_id: str | None = defaults.AWS_CONN_ID,
        region_name: str | None = None,
        verify: bool | str | None = None,
        botocore_config: dict | None = None,
    ) -> None:
        super().__init__(
            serialized_fields={"image_id": image_id},
            waiter_name="image_available",
            waiter_args={"ImageIds": [image_id]},
            failure_message=f"image {image_id} did not become available",
            status_message=f"image {image_id} state",
            status_queries=["Images[].State"],
            return_key="image_id",
            return_value=image_id,
            waiter_delay=waiter_delay,
            waiter_max_attempts=waiter_max_attempts,
            aws_conn_id=aws_conn_id,
            region_name=region_name,
            verify=verify,
            botocore_config=botocore_config,
        )
