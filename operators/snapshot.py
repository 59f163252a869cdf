"""``FrozenSnapshot``: a consistent EBS snapshot of the canvas, taken with its filesystems frozen."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException

from operators import defaults
from operators.base import AmibakeOperator
from operators.hooks.ec2 import LIVE_SNAPSHOT_STATES
from operators.links.ec2 import SnapshotLink
from operators.rules import records, remote
from operators.rules.naming import Role
from operators.triggers.ec2 import SnapshotCompletedTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context


class FrozenSnapshot(AmibakeOperator):
    """Freeze the canvas's filesystems on the box, CreateSnapshot, thaw at once, wait until completed.

    AWS fixes a snapshot's content when CreateSnapshot returns, so the filesystems are thawed right
    after the call, in a ``finally``: a failed call never leaves the box frozen (and the box thaws by
    itself after ``freeze_timeout`` seconds if this worker dies). The wait for ``completed`` is
    deferred. A snapshot this build already took is reused; one in ``error`` fails the task and is
    deleted, so the retry takes a new one. XCom: ``{"snapshot_id", "volume_id"}``.

    :param box: ``LaunchBuildBox``'s XCom.
    :param canvas: ``AttachCanvas``'s XCom.
    :param freeze_timeout: seconds after which the box thaws by itself.
    :param deferrable: wait in the triggerer (default).
    :param waiter_delay: seconds between snapshot polls.
    :param waiter_max_attempts: polls before giving up.
    """

    template_fields: Sequence[str] = (*AmibakeOperator.template_fields, "box", "canvas")
    operator_extra_links = (SnapshotLink(),)
    ui_color = "#e6d5f5"

    def __init__(
        self,
        *,
        box: Any,
        canvas: Any,
        freeze_timeout: int = defaults.FREEZE_TIMEOUT_S,
        deferrable: bool = True,
        waiter_delay: int = defaults.WAIT_SNAPSHOT_COMPLETED[0],
        waiter_max_attempts: int = defaults.WAIT_SNAPSHOT_COMPLETED[1],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.box = box
        self.canvas = canvas
        self.freeze_timeout = freeze_timeout
        self.deferrable = deferrable
        self.waiter_delay = waiter_delay
        self.waiter_max_attempts = waiter_max_attempts

    def execute(self, context: Context) -> dict[str, str]:
        """Reuse or take the snapshot, then wait for it."""
        _, canvas = records.box_and_canvas(self.box, self.canvas)
        volume_id, device, size = canvas["volume_id"], canvas["device_name"], canvas["size_gib"]
        hook = self.hook
        build = self.build_of(context)
        snapshot_id = ""
        for snap in hook.find_snapshots(build):
            if snap["State"] == "error":
                self.log.warning("deleting failed snapshot %s of an earlier try", snap["SnapshotId"])
                hook.delete_snapshot(snap["SnapshotId"])
            elif snap.get("VolumeId") != volume_id:
                # a cleared run rebuilt the canvas: an older canvas's snapshot is not this image
                self.log.info(
                    "ignoring snapshot %s of another canvas %s", snap["SnapshotId"], snap.get("VolumeId")
                )
            elif snap["State"] in LIVE_SNAPSHOT_STATES and not snapshot_id:
                snapshot_id = snap["SnapshotId"]
                self.log.info("build %s: reusing snapshot %s (%s)", build, snapshot_id, snap["State"])
        if not snapshot_id:
            snapshot_id = self._freeze_and_snapshot(context, build, volume_id, device, size)
        self.persist_link(SnapshotLink, context, snapshot_id=snapshot_id)
        return self.defer_or_wait(
            context,
            done=lambda: hook.snapshot_state(snapshot_id) == "completed",
            trigger=SnapshotCompletedTrigger(
                snapshot_id=snapshot_id,
                waiter_delay=self.waiter_delay,
                waiter_max_attempts=self.waiter_max_attempts,
                **self.trigger_kwargs(),
            ),
            method_name="execute_complete",
            event={"snapshot_id": snapshot_id},
        )

    def _freeze_and_snapshot(
        self, context: Context, build: str, volume_id: str, device: str, size: int
    ) -> str:
        """freeze on the box → CreateSnapshot → thaw (always)."""
        from operators.hooks.box import box_session, run_streaming

        ssh, common = box_session(
            self.box,
            self.ssh_conn_id,
            build=build,
            volume_id=volume_id,
            recipe=self.recipe,
            device=device,
            size=size,
        )
        freeze = remote.build_image_command(action="freeze", freeze_timeout=self.freeze_timeout, **common)
        thaw = remote.build_image_command(action="thaw", **common)
        with contextlib.closing(ssh.get_conn()) as client:
            try:
                self.log.info("freezing: %s", freeze)
                frozen = run_streaming(client, freeze, timeout_s=self.freeze_timeout, log=self.log)
                if frozen.exit_code != 0:
                    rc = frozen.exit_code if frozen.exit_code is not None else -1
                    raise AirflowException(f"freeze failed: {frozen.progress.failure(rc)}")
                if not frozen.progress.frozen:
                    raise AirflowException("freeze reported no frozen filesystem: is the canvas mounted?")
                snapshot_id = self.hook.create_snapshot(
                    build,
                    volume_id=volume_id,
                    description=f"amibake build {build} ({self.recipe}) canvas {volume_id}",
                    tags=self.tags(context, Role.SNAPSHOT),
                )
                self.log.info("build %s: snapshot %s started", build, snapshot_id)
            finally:
                self.log.info("thawing: %s", thaw)
                thawed = run_streaming(client, thaw, timeout_s=self.freeze_timeout, log=self.log)
                if thawed.exit_code != 0:
                    self.log.error(
                        "thaw exited with %s; the box thaws by itself within %s s",
                        thawed.exit_code,
                        self.freeze_timeout,
                    )
        return snapshot_id

    def execute_complete(self, context: Context, event: dict[str, Any]) -> records.Snapshot:
        """The snapshot completed, or the wait ended without it.

        Only a snapshot AWS reports in ``error`` is deleted (so the retry takes a new one). A wait
        that ran out while AWS is still copying keeps the snapshot: the retry finds it and waits again
        instead of freezing and snapshotting a second time.
        """
        snapshot_id = event["snapshot_id"]
        if event.get("status") != "success":
            state = self.hook.snapshot_state(snapshot_id)
            if state == "error":
                self.log.error("snapshot %s failed: %s; deleting it", snapshot_id, event.get("message"))
                self.hook.delete_snapshot(snapshot_id)
            else:
                self.log.error(
                    "gave up waiting for snapshot %s (state %s): %s; a retry waits for it again",
                    snapshot_id,
                    state,
                    event.get("message"),
                )
            raise AirflowException(f"snapshot {snapshot_id} did not complete: {event.get('message')}")
        volume_id = self.canvas["volume_id"] if isinstance(self.canvas, dict) else ""
        self.log.info("snapshot %s completed", snapshot_id)
        return {"snapshot_id": snapshot_id, "volume_id": volume_id}
