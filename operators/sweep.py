"""``SweepOrphans``: remove what crashed builds left behind (decisions: ``rules.lifecycle``).

It describes through the project's EC2 hook, asks ``operators.rules.lifecycle`` what to do, and does it
through the same hook. Every decision rule lives in ``lifecycle``; this module only talks to Airflow.

"Is the build still running?" Tasks have no metadata-DB access in Airflow 3, so the sweeper asks
the Task SDK (``ti.get_dr_count``, answered by the API server) whether the DAG run named by a
resource's ``amibake:dag-id`` / ``amibake:run-id`` tags is queued or running. A build whose run
cannot be identified (tags missing) counts as finished and is protected by the age threshold alone.
A leaked box that is still up does not make its build "running": terminating it is the point.
A copy of an AMI in another region names the run that made it (and its own creation time), so it
is judged by that run and its own age, not by its source's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from operators import defaults, metrics
from operators.base import AmibakeOperator
from operators.rules import definition, lifecycle
from operators.rules.validation import ParamError, as_bool, validate_number

if TYPE_CHECKING:
    from airflow.sdk import Context

    from operators.hooks.ec2 import BuildEc2Hook

#: DAG run states in which a build may still create or use resources.
ACTIVE_RUN_STATES = ("queued", "running")
#: Bounds of the sweeper's age threshold, in hours.
MAX_AGE_HOURS_RANGE = (1.0, 24.0 * 90)
DEFAULT_MAX_AGE_HOURS = 6


class SweepOrphans(AmibakeOperator):
    """Remove every amibake resource whose build is over and which is older than ``max_age_hours``.

    Order: instances (terminate, wait), volumes (detach from our box if still attached, delete),
    security groups, half-registered AMIs, unused snapshots. It sweeps the connection's region, then
    every region an image definition's ``distribution`` copies to (a copy pending past the age or
    failed, and its snapshots). Each removal is logged with its region and reason; with ``dry_run``
    nothing is changed and the same list is logged as "would remove". Returns the list
    (``lifecycle.Action.as_dict`` items with their ``region``) to XCom. One failed removal does not
    stop the others; the task fails at the end, listing what could not be removed.
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
        """Describe, decide, then remove (or only log, in a dry run), region by region."""
        if self.dry_run is None:
            raise ParamError("dry_run", "must be true or false, got None")
        dry_run = as_bool({"dry_run": self.dry_run}, "dry_run", False)
        max_age = timedelta(hours=validate_number("max_age_hours", self.max_age_hours, *MAX_AGE_HOURS_RANGE))
        swept: list[dict[str, Any]] = []
        done: list[lifecycle.Action] = []
        failures: list[str] = []
        ti = context.get("ti")

        @functools.cache
        def running(dag_id: str, run_id: str) -> bool:
            """Whether a DAG run is queued or running (the Task SDK asks the API server; once per run,
            however many regions hold its resources)."""
            return ti.get_dr_count(dag_id=dag_id, run_ids=[run_id], states=list(ACTIVE_RUN_STATES)) > 0

        for region, hook in self._regions():
            plan = self._plan(hook, region, max_age, dry_run, running)
            swept += [{**a.as_dict(), "region": region} for a in plan]
            if not dry_run:
                removed, failed = self._remove(hook, plan)
                done += removed
                failures += [f"{f} ({region})" for f in failed]
        if dry_run:
            return swept
        metrics.swept({kind: sum(1 for a in done if a.kind == kind) for kind in lifecycle.KIND_ORDER})
        if failures:
            raise RuntimeError("sweep incomplete, could not remove: " + "; ".join(failures))
        return swept

    def _regions(self) -> list[tuple[str, BuildEc2Hook]]:
        """The connection's region, then every region an image definition copies its AMI to (copies
        left half-made there are swept too). A definition that cannot be read is named in the log:
        the regions only it copies to are not swept until it is fixed."""
        home = self.hook.conn_region_name or ""
        regions, broken = definition.distribution_regions(defaults.images_dir())
        for error in broken:
            self.log.warning("not sweeping the regions only this definition copies to: %s", error)
        return [(home, self.hook)] + [(r, self.hook_in(r)) for r in regions if r != home]

    def _plan(
        self,
        hook: BuildEc2Hook,
        region: str,
        max_age: timedelta,
        dry_run: bool,
        running: Callable[[str, str], bool],
    ) -> list[lifecycle.Action]:
        """Describe one region and decide; log what stays, and what goes (or would, in a dry run).
        A build is active while any DAG run its resources name is ``running``."""
        inventory = hook.inventory()
        refs = lifecycle.run_refs(inventory)
        active = {build for build, runs in refs.items() if any(running(*run) for run in sorted(runs))}
        plan = lifecycle.plan_sweep(inventory, active_builds=active, now=datetime.now(UTC), max_age=max_age)
        for kept in plan.keep:
            self.log.info("%s: keeping %s %s: %s", region, kept.kind, kept.resource_id, kept.reason)
        verb = "would remove" if dry_run else "removing"
        for action in plan.remove:
            self.log.info("%s: %s %s %s (%s, build %s): %s", region, verb, action.kind, action.resource_id,
                          action.action, action.build_id, action.reason)  # fmt: skip
        if not plan.remove:
            self.log.info("%s: nothing to sweep", region)
        return plan.remove

    def _remove(
        self, hook: BuildEc2Hook, actions: list[lifecycle.Action]
    ) -> tuple[list[lifecycle.Action], list[str]]:
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
            lambda: hook.terminate_instances([a.resource_id for a in boxes]),
        )
        if terminated:
            for action in by_kind["volume"]:
                attempt(action, lambda a=action: hook.delete_volume(a.resource_id))
            for action in by_kind["security-group"]:
                attempt(action, lambda a=action: hook.delete_security_group(a.resource_id))
        else:
            # their volumes and security groups cannot go while the boxes are up: next sweep
            self.log.error("build boxes not all terminated: leaving volumes and security groups for now")
        for action in by_kind["image"]:
            attempt(action, lambda a=action: hook.deregister_image(a.resource_id))
        for action in by_kind["snapshot"]:
            attempt(action, lambda a=action: hook.delete_snapshot(a.resource_id))
        return done, failures
