"""What every amibake operator shares: connection settings, the build id, tags, the EC2 hook.

Only light imports at module level (the DAG file imports the operators at parse time); the
provider hooks are imported when a task runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from operators import defaults
from operators.rules import naming
from operators.rules.naming import Role

if TYPE_CHECKING:
    from airflow.sdk import Context

    from operators.hooks.ec2 import BuildEc2Hook


def settings() -> dict[str, str]:
    """Every ``[amibake]`` setting, read from Airflow configuration."""
    return {key: defaults.setting(key) for key in defaults.SETTINGS}


class AmibakeOperator(BaseOperator):
    """Base of amibake's operators: which connections, which region, which build.

    :param aws_conn_id: AWS connection (default: ``[amibake] aws_conn_id``, else ``amibake_aws``).
    :param ssh_conn_id: SSH connection of the box (default: ``[amibake] ssh_conn_id``).
    :param region_name: AWS region (default: the AWS connection's ``region_name``).
    :param recipe: the image recipe, written into every tag set.
    """

    template_fields: Sequence[str] = ("recipe", "region_name")

    def __init__(
        self,
        *,
        recipe: str = defaults.DEFAULT_RECIPE,
        aws_conn_id: str | None = None,
        ssh_conn_id: str | None = None,
        region_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.recipe = recipe
        self.aws_conn_id = aws_conn_id
        self.ssh_conn_id = ssh_conn_id
        self.region_name = region_name

    # -- connections -----------------------------------------------------------------------------
    @property
    def resolved_aws_conn_id(self) -> str:
        """The AWS connection id in use."""
        return self.aws_conn_id or defaults.setting("aws_conn_id")

    @property
    def resolved_ssh_conn_id(self) -> str:
        """The SSH connection id in use."""
        return self.ssh_conn_id or defaults.setting("ssh_conn_id")

    def ec2(self) -> BuildEc2Hook:
        """The EC2 hook of this task (built on first use, in the worker)."""
        from operators.hooks.ec2 import BuildEc2Hook

        if getattr(self, "_ec2", None) is None:
            self._ec2 = BuildEc2Hook(aws_conn_id=self.resolved_aws_conn_id, region_name=self.region_name)
        return self._ec2

    def trigger_kwargs(self) -> dict[str, Any]:
        """Connection arguments every AWS trigger of this task needs."""
        hook = self.ec2()
        return {"aws_conn_id": self.resolved_aws_conn_id, "region_name": hook.conn_region_name}

    def persist_link(self, link: Any, context: Context, **ids: str) -> None:
        """Store what the console link of ``link`` needs."""
        hook = self.ec2()
        link.persist(
            context=context,
            operator=self,
            region_name=hook.conn_region_name,
            aws_partition=hook.conn_partition,
            **ids,
        )

    # -- the build -------------------------------------------------------------------------------
    @staticmethod
    def build_of(context: Context) -> str:
        """The build id of this run: the same for every try of every task."""
        return naming.build_id(context["dag"].dag_id, context["run_id"])

    def tags(self, context: Context, role: Role) -> list[dict[str, str]]:
        """The tag set of a resource of this build."""
        return naming.resource_tags(
            build=self.build_of(context),
            dag_id=context["dag"].dag_id,
            run_id=context["run_id"],
            recipe=self.recipe,
            role=role,
        )

    @staticmethod
    def is_last_try(context: Context) -> bool:
        """Whether a failure now is final (no retry will reuse what this try created)."""
        ti = context["ti"]
        return ti.try_number > (ti.max_tries or 0)
