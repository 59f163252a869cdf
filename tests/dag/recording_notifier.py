"""A real Airflow notifier that appends what it is told to a file.

It stands in for the SMTP / Slack / SNS notifier a deployment would configure, which cannot
reach anything from this machine; it goes through the same ``[amibake] notifier`` path.
"""

from __future__ import annotations

import json
from typing import Any

from airflow.sdk import BaseNotifier


class FileNotifier(BaseNotifier):
    """Writes one JSON line per notification to ``path``."""

    template_fields = ("path",)

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def get_template_env(self, dag: Any = None) -> Any:
        """Airflow's default template environment.

        ``dag.test()`` hands DAG callbacks the scheduler's ``SerializedDAG``, which has no template
        environment (the DAG processor, where callbacks run in a deployment, hands the real DAG).
        """
        return super().get_template_env(dag=None)

    def notify(self, context: Any) -> None:
        """Record which run the notification was about."""
        dag_run = context["dag_run"]
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"dag_id": dag_run.dag_id, "run_id": dag_run.run_id}) + "\n")

    async def async_notify(self, context: Any) -> None:
        """Record a deadline alert: which run missed which deadline (runs in the triggerer).

        Airflow 3.3 hands an ``AsyncCallback`` of a ``DeadlineAlert`` no task context but
        ``{"dag_run": <the run as the REST API shows it, a dict>, "deadline": {"id", "deadline_time"}}``.
        """
        dag_run = context["dag_run"]
        deadline = context.get("deadline") or {}
        record = {
            "kind": "deadline_missed",
            "dag_id": dag_run["dag_id"],
            "run_id": dag_run["dag_run_id"],
            "deadline_id": deadline.get("id"),
            "deadline_time": str(deadline.get("deadline_time")),
            "context_keys": sorted(context),
        }
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
