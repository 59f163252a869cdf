"""``SweepOrphans``: remove what crashed builds left behind (decisions: ``rules.lifecycle``).

It describes through the project's EC2 hook, asks ``operators.rules.lifecycle`` what to do, and does it
through the same hook. Every decision rule lives in ``lifecycle``; this module only talks to Airflow.

"Is the build still running?" Tasks have no metadata-DB access in Airflow 3, so the sweeper asks
the Task SDK (``ti.get_dr_count``, answered by the API server) whether the DAG run named by a
resource's ``amibake:dag-id`` / ``amibake:run-id`` tags is queued or running. A build whose run
cannot be identified (tags missing) counts as finished and is protected by the age threshold alone.
A leaked box that is still up does not make its build "running": terminating it is the point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from operators import metrics
from operators.base import AmibakeOperator
from operators.rules import lifecycle
from operators.rules.validation import ParamError, as_bool, validate_number

if TYPE_CHECKING:
    from airflow.sdk import Context

#: DAG run states in which a build may still create or use resources.
ACTIVE_RUN_STATES = ("queued", "running")
#: Bounds of the sweeper's age threshold, in hours.
MAX_AGE_HOURS_RANGE = (1.0, 24.0 * 90)
DEFAULT_MAX_AGE_HOURS = 6


class SweepOrphans(AmibakeOperator):
    """Remove every amibake resource whose build is over and which is older than ``max_age_hours``.

    Order: instances (terminate, wait), volumes (detach from our box if still attached, delete),
    security groups, half-registered AMIs, unused snapshots. Each removal is logged with its
    reason; with ``dry_run`` nothing is changed and the same list is logged as "would remove".
    Returns the list (``lifecycle.Action.as_dict`` items) to XCom. One failed removal does not stop
    the others; the task fails at the end, listing what could not be removed.
    """

    template_fields: Sequence[str] = (*AmibakeOperator.template_fields, "dry_run", "max_age_hours")
    ui_color = "#f2d4c2"

    def __init__(
        self,
        *,
        dry_run: bool | str = False,
        max_age_hours: float | str = DEFAULT_MAX_AGE_HOURS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dry_run = dry_run
        self.max_age_hours = max_age_hours

    def execute(self, context: Context) -> list[dict[str, Any]]:
        """Describe, decide, then remove (or only log, in a dry run)."""
        if self.dry_run is None:
            raise ParamError("dry_run", "must be true or false, got None")
        dry_run = as_bool({"dry_run": self.dry_run}, "dry_run", False)
        max_age = timedelta(hours=validate_number("max_age_hours", self.max_age_hours, *MAX_AGE_HOURS_RANGE))
        inventory = self.hook.inventory()
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
        done, failures = self._remove(plan.remove)
        metrics.swept({kind: sum(1 for a in done if a.kind == kind) for kind in lifecycle.KIND_ORDER})
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

    def _remove(self, actions: list[lifecycle.Action]) -> tuple[list[lifecycle.Action], list[str]]:
        """Carry out the plan in its order; return what was done and what failed (the hook treats
        "already gone" as done)."""
        done: list[lifecycle.Action] = []
        failures: list[str] = []

        def attempt(action: lifecycle.Action, call: Callable[[], object]) -> bool:
            """Run one removal; a failure is logged and listed, and the sweep goes on."""
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - report every failure, keep sweeping the rest
                self.log.error("could not %s %s %s: %s", action.action, action.kind, action.resource_id, exc)
                failures.append(f"{action.kind} {action.resource_id}: {exc}")
                return False
            self.log.info("%s %s: %s done", action.kind, action.resource_id, action.action)
            done.extend(boxes if action.kind == "instance" else [action])
            return True

        by_kind = {kind: [a for a in actions if a.kind == kind] for kind in lifecycle.KIND_ORDER}
        boxes = by_kind["instance"]
        terminated = not boxes or attempt(
            lifecycle.Action("instance", ",".join(a.resource_id for a in boxes), "terminate and wait", ""),
            lambda: self.hook.terminate_instances([a.resource_id for a in boxes]),
        )
        if terminated:
            for action in by_kind["volume"]:
                attempt(action, lambda a=action: self.hook.delete_volume(a.resource_id))
            for action in by_kind["security-group"]:
                attempt(action, lambda a=action: self.hook.delete_security_group(a.resource_id))
        else:
            # their volumes and security groups cannot go while the boxes are up: next sweep
            self.log.error("build boxes not all terminated: leaving volumes and security groups for now")
        for action in by_kind["image"]:
            attempt(action, lambda a=action: self.hook.deregister_image(a.resource_id))
        for action in by_kind["snapshot"]:
            attempt(action, lambda a=action: self.hook.delete_snapshot(a.resource_id))
        return done, failures
