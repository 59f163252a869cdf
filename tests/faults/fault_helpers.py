"""Helpers of the fault tests: age a build's resources, list what is left of it, run the sweeper."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from operators import naming

REPO = Path(__file__).resolve().parents[2]
READS = ("Describe", "Get")


def age(client: Any, build: str, hours: float) -> list[str]:
    """Rewrite ``amibake:created-at`` of every resource of a build to ``hours`` ago (time passing)."""
    when = (datetime.now(UTC) - timedelta(hours=hours)).replace(microsecond=0).isoformat()
    found = [i for ids in left(client, build, include_terminated=True).values() for i in ids]
    client.create_tags(Resources=found, Tags=[{"Key": naming.TAG_CREATED_AT, "Value": when}])
    return found


def left(client: Any, build: str, *, include_terminated: bool = False) -> dict[str, list[str]]:
    """What of a build exists (terminated instances count only with ``include_terminated``)."""
    ours = [{"Name": f"tag:{naming.TAG_BUILD_ID}", "Values": [build]}]
    return {
        "instances": [
            i["InstanceId"]
            for r in client.describe_instances(Filters=ours)["Reservations"]
            for i in r["Instances"]
            if include_terminated or i["State"]["Name"] != "terminated"
        ],
        "volumes": [v["VolumeId"] for v in client.describe_volumes(Filters=ours)["Volumes"]],
        "security_groups": [
            g["GroupId"] for g in client.describe_security_groups(Filters=ours)["SecurityGroups"]
        ],
        "snapshots": [
            s["SnapshotId"] for s in client.describe_snapshots(OwnerIds=["self"], Filters=ours)["Snapshots"]
        ],
        "images": [i["ImageId"] for i in client.describe_images(Owners=["self"], Filters=ours)["Images"]],
    }


def nothing_left() -> dict[str, list[str]]:
    return {"instances": [], "volumes": [], "security_groups": [], "snapshots": [], "images": []}


def touched(requests: list[dict[str, Any]]) -> set[str]:
    """Every resource id named by a recorded call that changes something."""
    return {
        v
        for r in requests
        if not r["action"].startswith(READS)
        for k, v in r["params"].items()
        if k.split(".")[0].endswith("Id")
    }


def images(client: Any) -> dict[str, dict]:
    """Every AMI of the account by id, as described."""
    return {i["ImageId"]: i for i in client.describe_images(Owners=["self"])["Images"]}


def run_sweeper(max_age_hours: float = 6) -> Any:
    """One real run of dags/amibake_sweeper.py (dag.test: the Task SDK answers the run-state question)."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags" / "amibake_sweeper.py")).dags["amibake_sweeper"]
    return dag.test(run_after=datetime.now(UTC), run_conf={"max_age_hours": max_age_hours})
