"""amibake_sweeper: hourly removal of resources left behind by amibake builds."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from operators.sweep import DEFAULT_MAX_AGE_HOURS, MAX_AGE_HOURS_RANGE, SweepOrphans

DOC = f"""
### amibake orphan sweeper

Every hour, finds every EC2 resource tagged `amibake:build-id` whose build is over and that is
older than **max_age_hours** (default {DEFAULT_MAX_AGE_HOURS}), and removes it, in this order:
build boxes (terminate and wait), canvas volumes (detach from our box, delete), security
groups, AMIs left half-registered (pending too long, or failed), snapshots no AMI uses. It
sweeps the connection's region, then every region an image definition copies its AMI to
(`distribution.regions`): a copy is judged by the run that made it and its own age.

- Never touches anything without the amibake tags, nor an `available` AMI (that is the
  nightly DAG's rotation, which keeps the newest ones), nor a snapshot any AMI still uses.
- A build counts as running while its DAG run (tags `amibake:dag-id` / `amibake:run-id`) is
  queued or running; the sweeper asks Airflow through the Task SDK.
- **dry_run** (trigger form) only logs what would be removed. Scheduled runs act.
- Each removal is logged with its reason; the list is the task's XCom. The task fails if any
  removal failed (the others are still done), so a stuck resource shows up as a red run.
"""

with DAG(
    dag_id="amibake_sweeper",
    description="Remove leaked amibake instances, volumes, security groups, half-registered AMIs, snapshots",
    schedule="@hourly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(minutes=55),
    doc_md=DOC,
    tags=["amibake"],
    params={
        "dry_run": Param(False, type="boolean", description="Only log what would be removed."),
        "max_age_hours": Param(
            DEFAULT_MAX_AGE_HOURS,
            type="number",
            minimum=MAX_AGE_HOURS_RANGE[0],
            maximum=MAX_AGE_HOURS_RANGE[1],
            description="Leave alone anything younger than this many hours.",
        ),
    },
    default_args={"retries": 1, "retry_delay": timedelta(minutes=5)},
):
    SweepOrphans(
        task_id="sweep_orphans",
        dry_run="{{ params.dry_run }}",
        max_age_hours="{{ params.max_age_hours }}",
        execution_timeout=timedelta(minutes=50),
    )
