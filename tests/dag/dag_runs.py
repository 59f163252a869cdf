"""What a whole-DAG test reads after the run: a task's XCom, and what the build left in EC2."""

from __future__ import annotations

from typing import Any

from operators.rules import naming
from operators.rules.naming import Role

DAG_ID = "amibake_debian12"


def xcom_of(dag_run: Any, task_id: str, key: str = "return_value") -> Any:
    """The XCom ``key`` a task pushed (its return value by default), read from the metadata DB."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.scalars(
            select(XComModel).where(
                XComModel.dag_id == dag_run.dag_id,
                XComModel.run_id == dag_run.run_id,
                XComModel.task_id == task_id,
                XComModel.key == key,
            )
        ).one()
        return XComModel.deserialize_value(row)


def left_in_moto(ec2: Any, build: str) -> dict[str, list[str]]:
    """The build's live instances (build box, smoke instance), canvas volumes and security groups."""
    client = ec2.boto3_client()
    instances = [
        i["InstanceId"]
        for role in (Role.BUILD_BOX, Role.SMOKE)
        for r in client.describe_instances(Filters=naming.build_filters(build, role))["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    volumes = [
        v["VolumeId"]
        for v in client.describe_volumes(Filters=naming.build_filters(build, Role.CANVAS))["Volumes"]
    ]
    groups = [
        g["GroupId"]
        for g in client.describe_security_groups(Filters=naming.build_filters(build, Role.BUILD_SG))[
            "SecurityGroups"
        ]
    ]
    return {"instances": instances, "canvas_volumes": volumes, "security_groups": groups}
