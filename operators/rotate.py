"""``RotateAmis``: retire old AMIs of one image line once the new one is available."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import Context

from operators import defaults
from operators.base import AmibakeOperator
from operators.rules import lifecycle
from operators.rules.validation import AMI_ID_RE, ParamError, require_id, validate_number


class RotateAmis(AmibakeOperator):
    """Retire old AMIs of ``new_ami_id``'s image line once it is available AND verified (policy:
    ``operators.rules.lifecycle``; the line is the recipe + AMI name prefix, ``lifecycle.line_of``).

    Runs after ``SmokeInstance``. Only verified AMIs (``amibake:verified=true``, read from EC2, not
    XCom) count as good: keeps the newest ``keep`` (>= 1) verified ones, sets ``deprecate_at`` on the
    next ``grace``, deregisters the rest and deletes their snapshots. An unverified AMI is never
    kept in a verified one's place: it is deprecated, and deregistered once ``keep + grace``
    verified AMIs are newer. AMIs of other lines are neither counted nor touched. Does nothing unless
    the newest available amibake AMI of the line is ``new_ami_id``: it fails when that AMI is
    missing, not available or not verified, and is skipped when a newer one exists (that one's run
    rotates). Returns what it did to XCom.
    """

    template_fields: Sequence[str] = (*AmibakeOperator.template_fields, "keep", "grace", "new_ami_id")
    ui_color = "#d9ead3"

    def __init__(
        self,
        *,
        recipe: str,
        new_ami_id: str,
        keep: int | str = defaults.DEFAULT_KEEP_AMIS,
        grace: int | str = defaults.DEFAULT_DEPRECATE_GRACE,
        **kwargs: Any,
    ) -> None:
        super().__init__(recipe=recipe, **kwargs)
        self.new_ami_id = new_ami_id
        self.keep = keep
        self.grace = grace

    def user_given_ids(self) -> dict[str, str]:
        """None: ``new_ami_id`` is this run's own AMI, so a ``NotFound`` of it is eventual consistency."""
        return {}

    def execute(self, context: Context) -> dict[str, list[str]]:
        """Validate, describe, plan, then deprecate, deregister and delete snapshots in that order."""
        from airflow.sdk.exceptions import AirflowSkipException

        if self.recipe not in defaults.RECIPES:
            raise ParamError("recipe", f"must be one of {', '.join(defaults.RECIPES)}, got {self.recipe!r}")
        new_ami_id = require_id("new_ami_id", self.new_ami_id, AMI_ID_RE, "an AMI id (ami-...)")
        keep = int(validate_number("keep", self.keep, *defaults.KEEP_AMIS_RANGE, integer=True))
        grace = int(validate_number("grace", self.grace, *defaults.DEPRECATE_GRACE_RANGE, integer=True))
        try:
            plan = lifecycle.plan_rotation(
                self.hook.account_images(),
                self.hook.our_snapshots(),
                recipe=self.recipe,
                new_image_id=new_ami_id,
                keep=keep,
                grace=grace,
                now=datetime.now(UTC),
            )
        except lifecycle.RotationRefused as refused:
            if refused.superseded:
                raise AirflowSkipException(f"rotation skipped: {refused}") from None
            raise
        self.log.info("keeping %s", ", ".join(plan.kept))
        for action in plan.actions():
            self.log.info(
                "%s %s %s: %s %s",
                action.action,
                action.kind,
                action.resource_id,
                action.reason,
                dict(action.detail) or "",
            )
            if action.action == "deprecate":
                at = datetime.fromisoformat(action.detail["deprecate_at"])
                self.hook.deprecate_image(action.resource_id, at)
            elif action.action == "deregister":
                self.hook.deregister_image(action.resource_id)
            else:
                self.hook.delete_snapshot(action.resource_id)
        return {
            "kept": plan.kept,
            "deprecated": [a.resource_id for a in plan.deprecate],
            "deregistered": [a.resource_id for a in plan.deregister],
            "deleted_snapshots": [a.resource_id for a in plan.delete_snapshots],
        }
