"""``RotateAmis``: retire old AMIs of one image line once the new one is available."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import BaseOperator, Context

from operators import defaults
from operators.rules import lifecycle
from operators.rules.validation import AMI_ID_RE, ParamError, require_id, validate_number
from operators.sweep import _client, describe_images, describe_our_snapshots


class RotateAmis(BaseOperator):
    """Retire old AMIs of one recipe once ``new_ami_id`` is available (policy: ``operators.rules.lifecycle``).

    Keeps the newest ``keep`` (>= 1), sets ``deprecate_at`` on the next ``grace``, deregisters the
    rest and deletes their snapshots. Does nothing unless the newest available amibake AMI of the
    recipe is ``new_ami_id``: it fails when that AMI is missing or not available, and is skipped
    when a newer one exists (that one's run rotates). Returns what it did to XCom.
    """

    template_fields: Sequence[str] = ("recipe", "keep", "grace", "new_ami_id")
    ui_color = "#d9ead3"

    def __init__(
        self,
        *,
        recipe: str,
        new_ami_id: str,
        keep: int | str = defaults.DEFAULT_KEEP_AMIS,
        grace: int | str = defaults.DEFAULT_DEPRECATE_GRACE,
        aws_conn_id: str = defaults.AWS_CONN_ID,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.recipe = recipe
        self.new_ami_id = new_ami_id
        self.keep = keep
        self.grace = grace
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Context) -> dict[str, list[str]]:
        """Validate, describe, plan, then deprecate, deregister and delete snapshots in that order."""
        from airflow.sdk.exceptions import AirflowSkipException

        if self.recipe not in defaults.RECIPES:
            raise ParamError("recipe", f"must be one of {', '.join(defaults.RECIPES)}, got {self.recipe!r}")
        new_ami_id = require_id("new_ami_id", self.new_ami_id, AMI_ID_RE, "an AMI id (ami-...)")
        keep = int(validate_number("keep", self.keep, *defaults.KEEP_AMIS_RANGE, integer=True))
        grace = int(validate_number("grace", self.grace, *defaults.DEPRECATE_GRACE_RANGE, integer=True))
        client = _client(self.aws_conn_id)
        try:
            plan = lifecycle.plan_rotation(
                describe_images(client),
                describe_our_snapshots(client),
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
                client.enable_image_deprecation(ImageId=action.resource_id, DeprecateAt=at)
            elif action.action == "deregister":
                client.deregister_image(ImageId=action.resource_id)
            else:
                client.delete_snapshot(SnapshotId=action.resource_id)
        return {
            "kept": plan.kept,
            "deprecated": [a.resource_id for a in plan.deprecate],
            "deregistered": [a.resource_id for a in plan.deregister],
            "deleted_snapshots": [a.resource_id for a in plan.delete_snapshots],
        }
