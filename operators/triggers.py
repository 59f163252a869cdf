"""Deferrable waits of amibake, run by the triggerer so no worker slot is held while AWS works.

The three AWS waits subclass the provider's ``AwsBaseWaiterTrigger`` with :class:`BuildEc2Hook`
(client API, which the async waiters need) and botocore's EC2 waiters. Their limits are explicit
and generous (see :mod:`operators.defaults`): a snapshot or an AMI may take 30+ minutes.
``SshReachableTrigger`` waits until the box answers with an SSH banner.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.providers.amazon.aws.triggers.base import AwsBaseWaiterTrigger
from airflow.triggers.base import BaseTrigger, TriggerEvent

from operators import defaults
from operators.hooks import BuildEc2Hook

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


async def ssh_banner(host: str, port: int, timeout: float) -> str:
    """The SSH identification line a server sends first ('' if it sent something else)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()
    text = line.decode(errors="replace").strip()
    return text if text.startswith("SSH-") else ""


class SshReachableTrigger(BaseTrigger):
    """Wait until ``host:port`` answers with an SSH banner, polling until ``timeout`` seconds.

    ``instance_id`` is only passed through into the event, so the resumed task knows its box.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        timeout: float = defaults.SSH_READY_TIMEOUT_S,
        poll_interval: float = defaults.SSH_POLL_INTERVAL_S,
        instance_id: str = "",
    ) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.host = host
        self.port = int(port)
        self.timeout = float(timeout)
        self.poll_interval = float(poll_interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and arguments, so the triggerer can rebuild this trigger."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "host": self.host,
                "port": self.port,
                "timeout": self.timeout,
                "poll_interval": self.poll_interval,
                "instance_id": self.instance_id,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll the port until a banner arrives or the time is up."""
        deadline = time.monotonic() + self.timeout
        last_error = "no answer"
        while True:
            try:
                banner = await ssh_banner(self.host, self.port, defaults.SSH_CONNECT_TIMEOUT_S)
                if banner:
                    yield TriggerEvent(
                        {"status": "success", "banner": banner, "instance_id": self.instance_id}
                    )
                    return
                last_error = "not an SSH server"
            except (TimeoutError, OSError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                yield TriggerEvent(
                    {
                        "status": "error",
                        "instance_id": self.instance_id,
                        "message": f"{self.host}:{self.port} did not answer on SSH within "
                        f"{self.timeout:.0f} s ({last_error})",
                    }
                )
                return
            self.log.info("waiting for SSH on %s:%s (%s)", self.host, self.port, last_error)
            await asyncio.sleep(self.poll_interval)
