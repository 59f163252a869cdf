"""Airflow operators of the orphan sweeper and of safe AMI rotation.

They describe, ask ``operators.rules.lifecycle`` what to do, and do it through the Amazon provider's
``EC2Hook``. Every decision rule lives in ``lifecycle``; this module only talks to AWS and Airflow.

"Is the build still running?" Tasks have no metadata-DB access in Airflow 3, so the sweeper asks
the Task SDK (``ti.get_dr_count``, answered by the API server) whether the DAG run named by a
resource's ``amibake:dag-id`` / ``amibake:run-id`` tags is queued or running. A build whose run
cannot be identified (tags missing) counts as finished and is protected by the age threshold alone.
A leaked box that is still up does not make its build "running": terminating it is the point.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import BaseOperator, Context

from operators import defaults
from operators.rules import lifecycle, naming
from operators.rules.validation import ParamError, validate_number

#: Error codes that mean "already gone": the sweeper's goal is reached, not an error.
GONE_CODES = frozenset(
    {
        "InvalidInstanceID.NotFound",
        "InvalidVolume.NotFound",
        "InvalidGroup.NotFound",
        "InvalidAMIID.NotFound",
        "InvalidAMIID.Unavailable",
        "InvalidSnapshot.NotFound",
    }
)
#: DAG run states in which a build may still create or use resources.
ACTIVE_RUN_STATES = ("queued", "running")
#: Bounds of the sweeper's age threshold, in hours.
MAX_AGE_HOURS_RANGE = (1.0, 24.0 * 90)
DEFAULT_MAX_AGE_HOURS = 6
_OURS = [{"Name": "tag-key", "Values": [naming.TAG_BUILD_ID]}]


def parse_bool(field: str, value: Any) -> bool:
    """A real bool from a Param or its rendered template ("True"/"false"); anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ParamError(field, f"must be true or false, got {value!r}")


def _client(aws_conn_id: str) -> Any:
    """A boto3 EC2 client from the Amazon provider's hook (endpoint, region, retries from the connection)."""
    from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

    return EC2Hook(aws_conn_id=aws_conn_id, api_type="client_type").conn


def _error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def _paginate(client: Any, method: str, key: str, **kwargs: Any) -> list[dict]:
    return [item for page in client.get_paginator(method).paginate(**kwargs) for item in page[key]]


def describe_images(client: Any) -> list[dict]:
    """Every AMI of this account, ours or not, including disabled ones (their snapshots are in use)."""
    return _paginate(
        client, "describe_images", "Images", Owners=["self"], IncludeDisabled=True, IncludeDeprecated=True
    )


def describe_our_snapshots(client: Any) -> list[dict]:
    """Every snapshot of this account that carries our build-id tag."""
    return _paginate(client, "describe_snapshots", "Snapshots", OwnerIds=["self"], Filters=_OURS)


class SweepOrphans(BaseOperator):
    """Remove every amibake resource whose build is over and which is older than ``max_age_hours``.

    Order: instances (terminate, wait), volumes (detach from our box if still attached, delete),
    security groups, half-registered AMIs, unused snapshots. Each removal is logged with its
    reason; with ``dry_run`` nothing is changed and the same list is logged as "would remove".
    Returns the list (``lifecycle.Action.as_dict`` items) to XCom. One failed removal does not stop
    the others; the task fails at the end, listing what could not be removed.
    """

    template_fields: Sequence[str] = ("dry_run", "max_age_hours")
    ui_color = "#f2d4c2"

    def __init__(
        self,
        *,
        dry_run: bool | str = False,
        max_age_hours: float | str = DEFAULT_MAX_AGE_HOURS,
        aws_conn_id: str = defaults.AWS_CONN_ID,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dry_run = dry_run
        self.max_age_hours = max_age_hours
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Context) -> list[dict[str, Any]]:
        """Describe, decide, then remove (or only log, in a dry run)."""
        dry_run = parse_bool("dry_run", self.dry_run)
        max_age = timedelta(hours=validate_number("max_age_hours", self.max_age_hours, *MAX_AGE_HOURS_RANGE))
        client = _client(self.aws_conn_id)
        inventory = lifecycle.Inventory(
            instances=[
                i
                for r in _paginate(client, "describe_instances", "Reservations", Filters=_OURS)
                for i in r["Instances"]
            ],
            volumes=_paginate(client, "describe_volumes", "Volumes", Filters=_OURS),
            security_groups=_paginate(client, "describe_security_groups", "SecurityGroups", Filters=_OURS),
            images=describe_images(client),
            snapshots=describe_our_snapshots(client),
        )
        active = self._active_builds(context, lifecycle.run_refs(inventory))
        plan = lifecycle.plan_sweep(inventory, active_builds=active, now=datetime.now(UTC), max_age=max_age)
        for kept in plan.keep:
            self.log.info("keeping %s %s: %s", kept.kind, kept.resource_id, kept.reason)
        verb = "would remove" if dry_run else "removing"
        for action in plan.remove:
            self.log.info(
                "%s %s %s (%s, build %s): %s",
                verb,
                action.kind,
                action.resource_id,
                action.action,
                action.build_id,
                action.reason,
            )
        if not plan.remove:
            self.log.info("nothing to sweep")
        if dry_run:
            return [a.as_dict() for a in plan.remove]
        failures = self._remove(client, plan.remove)
        if failures:
            raise RuntimeError("sweep incomplete, could not remove: " + "; ".join(failures))
        return [a.as_dict() for a in plan.remove]

    def _active_builds(self, context: Context, refs: dict[str, tuple[str, str]]) -> set[str]:
        """Builds whose DAG run is queued or running, asked through the Task SDK (one call per build)."""
        if not refs:
            return set()
        ti = context["ti"]
        return {
            build
            for build, (dag_id, run_id) in refs.items()
            if ti.get_dr_count(dag_id=dag_id, run_ids=[run_id], states=list(ACTIVE_RUN_STATES)) > 0
        }

    def _remove(self, client: Any, actions: list[lifecycle.Action]) -> list[str]:
        """Carry out the plan in its order; return what failed (already-gone counts as done)."""
        failures: list[str] = []

        def attempt(action: lifecycle.Action, call: Callable[[], object]) -> str:
            """Run one removal: "done", "gone" (already removed) or "failed" (logged, listed)."""
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - report every failure, keep sweeping the rest
                if _error_code(exc) in GONE_CODES:
                    self.log.info("%s %s was already gone", action.kind, action.resource_id)
                    return "gone"
                self.log.error("could not %s %s %s: %s", action.action, action.kind, action.resource_id, exc)
                failures.append(f"{action.kind} {action.resource_id}: {exc}")
                return "failed"
            self.log.info("%s %s: %s done", action.kind, action.resource_id, action.action)
            return "done"

        by_kind = {kind: [a for a in actions if a.kind == kind] for kind in lifecycle.KIND_ORDER}
        outcomes = {
            a.resource_id: attempt(a, lambda a=a: client.terminate_instances(InstanceIds=[a.resource_id]))
            for a in by_kind["instance"]
        }
        terminating = [iid for iid, outcome in outcomes.items() if outcome == "done"]
        if terminating:
            delay, attempts = defaults.WAIT_INSTANCE_TERMINATED
            waited = attempt(
                lifecycle.Action("instance", ",".join(terminating), "wait for termination", ""),
                lambda: client.get_waiter("instance_terminated").wait(
                    InstanceIds=terminating, WaiterConfig={"Delay": delay, "MaxAttempts": attempts}
                ),
            )
            if waited == "failed":
                outcomes.update(dict.fromkeys(terminating, "failed"))
        if "failed" in outcomes.values():
            # their volumes and security groups cannot go while the boxes are up: next sweep
            self.log.error("build boxes not all terminated: leaving volumes and security groups for now")
        else:
            for action in by_kind["volume"]:
                attempt(action, lambda a=action: self._delete_volume(client, a))
            for action in by_kind["security-group"]:
                attempt(action, lambda a=action: self._delete_group(client, a.resource_id))
        for action in by_kind["image"]:
            attempt(action, lambda a=action: client.deregister_image(ImageId=a.resource_id))
        for action in by_kind["snapshot"]:
            attempt(action, lambda a=action: client.delete_snapshot(SnapshotId=a.resource_id))
        return failures

    def _delete_volume(self, client: Any, action: lifecycle.Action) -> None:
        """Detach (always naming the instance) if still attached, wait until available, delete."""
        volume = client.describe_volumes(VolumeIds=[action.resource_id])["Volumes"][0]
        for attachment in volume.get("Attachments") or []:
            if attachment.get("State") in ("attached", "attaching"):
                self.log.info("detaching %s from %s", action.resource_id, attachment["InstanceId"])
                client.detach_volume(VolumeId=action.resource_id, InstanceId=attachment["InstanceId"])
        if volume.get("State") != "available":
            delay, attempts = defaults.WAIT_VOLUME_AVAILABLE
            client.get_waiter("volume_available").wait(
                VolumeIds=[action.resource_id], WaiterConfig={"Delay": delay, "MaxAttempts": attempts}
            )
        client.delete_volume(VolumeId=action.resource_id)

    def _delete_group(self, client: Any, group_id: str) -> None:
        """Delete a security group, retrying while a terminated box's network interface lingers."""
        delay, attempts = defaults.SG_DELETE_ATTEMPTS
        for n in range(1, attempts + 1):
            try:
                client.delete_security_group(GroupId=group_id)
                return
            except Exception as exc:
                if _error_code(exc) != "DependencyViolation" or n == attempts:
                    raise
                self.log.info("security group %s still in use (try %d/%d)", group_id, n, attempts)
                time.sleep(delay)
