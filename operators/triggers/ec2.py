"""Deferrable waits of amibake, run by the triggerer so no worker slot is held while AWS works.

The three AWS waits subclass the provider's ``AwsBaseWaiterTrigger`` with :class:`BuildEc2Hook`
(client API, which the async waiters need) and botocore's EC2 waiters. Each names its resource and
waiter in class attributes; the operator passes the limits (see :mod:`operators.defaults`: a
snapshot or an AMI may take 30+ minutes).
"""

from __future__ import annotations

from typing import ClassVar

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
    """Wait for one EC2 resource, given as ``<id_field>=<id>`` (its serialized field and the key of
    the event it returns)."""

    aws_hook_class = BuildEc2Hook
    id_field: ClassVar[str]
    #: what "done" is, in the messages ("reach running")
    goal: ClassVar[str]
    waiter_name: ClassVar[str]
    #: the waiter's request parameter that takes the id ("InstanceIds")
    ids_param: ClassVar[str]
    status_queries: ClassVar[list[str]]
    acceptors: ClassVar[list[dict[str, str]] | None] = None

    def __init__(
        self,
        *,
        waiter_delay: int,
        waiter_max_attempts: int,
        aws_conn_id: str | None = defaults.AWS_CONN_ID,
        region_name: str | None = None,
        verify: bool | str | None = None,
        botocore_config: dict | None = None,
        **resource: str,
    ) -> None:
        if set(resource) != {self.id_field}:
            raise TypeError(f"{type(self).__name__} takes {self.id_field}=, not {sorted(resource)}")
        resource_id, noun = resource[self.id_field], self.id_field.removesuffix("_id")
        super().__init__(
            serialized_fields=resource,
            waiter_name=self.waiter_name,
            waiter_args={self.ids_param: [resource_id]},
            failure_message=f"{noun} {resource_id} did not {self.goal}",
            status_message=f"{noun} {resource_id} state",
            status_queries=self.status_queries,
            return_key=self.id_field,
            return_value=resource_id,
            waiter_delay=waiter_delay,
            waiter_max_attempts=waiter_max_attempts,
            waiter_config_overrides={"acceptors": self.acceptors} if self.acceptors else None,
            aws_conn_id=aws_conn_id,
            region_name=region_name,
            verify=verify,
            botocore_config=botocore_config,
        )


class InstanceRunningTrigger(_Ec2WaiterTrigger):
    """Wait until an instance is ``running``."""

    id_field, goal = "instance_id", "reach running"
    waiter_name, ids_param = "instance_running", "InstanceIds"
    status_queries = ["Reservations[].Instances[].State.Name"]


class SnapshotCompletedTrigger(_Ec2WaiterTrigger):
    """Wait until a snapshot is ``completed``; fail at once when it is ``error``."""

    id_field, goal = "snapshot_id", "complete"
    waiter_name, ids_param = "snapshot_completed", "SnapshotIds"
    status_queries = ["Snapshots[].State", "Snapshots[].Progress"]
    acceptors = SNAPSHOT_ACCEPTORS


class ImageAvailableTrigger(_Ec2WaiterTrigger):
    """Wait until an AMI is ``available`` (botocore's waiter fails at once on ``failed``)."""

    id_field, goal = "image_id", "become available"
    waiter_name, ids_param = "image_available", "ImageIds"
    status_queries = ["Images[].State"]
