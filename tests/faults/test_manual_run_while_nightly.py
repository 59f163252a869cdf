"""A manual run triggered while another run of amibake_debian12 is running: with a real scheduler
(rehearsal.airflow_env.LocalAirflow: api-server, scheduler, dag-processor, triggerer, LocalExecutor)
the second run waits ``queued`` (``max_active_runs=1``), is not failed, and starts when the first ends.

The first run is held inside its launch_build_box task: every real RunInstances call (not preflight's
DryRun) is delayed by the recording proxy and then answered InternalError (never forwarded to moto), a
transient error that botocore and the task's retries keep retrying, so the first run stays ``running``
as long as the test needs and creates no instance. Both runs are triggered through the REST API (with
the rehearsal's dormant schedule no scheduled run fires; the limit counts every run alike).
"""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import wait_until

from operators.rules import naming
from rehearsal.__main__ import _q, trigger, wait_for_dag
from rehearsal.airflow_env import LocalAirflow, amibake_env, rehearsal_settings

pytestmark = pytest.mark.slow
DAG_ID = "amibake_debian12"


def _state(airflow: LocalAirflow, run_id: str) -> str:
    return airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{_q(run_id)}")["state"]


def _launch_tokens(ec2: Any) -> set[str]:
    return {c["ClientToken"] for c in ec2.calls("RunInstances")}


def test_a_manual_run_waits_queued_while_the_nightly_runs(
    ec2: Any, box_login: Any, subnet: dict, tmp_path: Path
) -> None:
    ec2.add_latency("RunInstances", 15, times=None, dry_run=False)
    ec2.add_fault("RunInstances", "InternalError", 500, times=None, dry_run=False)
    settings = {**rehearsal_settings(date.today()), "subnet_id": subnet["SubnetId"]}
    env = amibake_env(
        aws_extra=ec2.connection_extra(), ssh_connection=box_login.connection(), settings=settings
    )
    airflow = LocalAirflow(tmp_path / f"home-{uuid.uuid4().hex[:6]}", env)
    try:
        airflow.start()
        wait_for_dag(airflow, DAG_ID)
        conf = {"base_ami": ec2.register_base_image("amibake-test-base")}
        first = trigger(airflow, DAG_ID, conf)
        wait_until(
            lambda: ec2.calls("RunInstances"), "the first run's launch calling RunInstances", timeout=300
        )
        first_tokens = _launch_tokens(ec2)
        assert all(naming.build_id(DAG_ID, first) in t for t in first_tokens), first_tokens

        second = trigger(airflow, DAG_ID, conf)
        # while the first run holds the only slot, the second is seen queued at every look, never started
        wait_until(
            lambda: len(ec2.calls("RunInstances")) >= 2, "the first run's next launch attempt", timeout=300
        )
        assert _state(airflow, first) == "running"
        assert _state(airflow, second) == "queued"
        assert all(naming.build_id(DAG_ID, first) in t for t in _launch_tokens(ec2))

        airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}/dagRuns/{_q(first)}", {"state": "failed"})
        wait_until(lambda: _state(airflow, second) == "running", "the queued run to start", timeout=300)
        second_build = naming.build_id(DAG_ID, second)
        wait_until(
            lambda: any(second_build in t for t in _launch_tokens(ec2)),
            "the second run's launch",
            timeout=300,
        )
        airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}/dagRuns/{_q(second)}", {"state": "failed"})
    finally:
        airflow.stop()
    client = ec2.boto3_client()
    live = [
        i["InstanceId"]
        for r in client.describe_instances()["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    assert live == [], "no box was ever created"
