"""One whole green run of amibake_nightly (dag.test: moto + recorder, a real box, real Debian 12 build on
a loop-backed canvas), then: no secret anywhere the run wrote, and the box's boundaries as requested.

Secrets: the AWS secret key of the ``amibake_aws`` connection (a unique value for this test) and
the SSH private key of ``amibake_ssh`` (whole, and each line of its base64 body) must appear in no
XCom, no task log line, no rendered template field, no box-side log, and no request sent to EC2.
Boundaries: the security group admits tcp/22 only from ``[amibake] ssh_cidr``; IMDSv2 is required
on the box and on the AMI; the canvas is created encrypted, so its snapshot is too.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from operators import defaults
from operators.rules import naming
from operators.rules.remote import remote_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and mounts"),
]
REPO = Path(__file__).resolve().parents[2]
DAG_ID = "amibake_nightly"
SSH_CIDR = "198.51.100.0/24"


@pytest.fixture
def aws_secret(ec2: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """A unique AWS secret key in the ``amibake_aws`` connection (moto accepts any)."""
    from rehearsal.ec2_local import FAKE_ACCESS_KEY

    secret = f"amibakeTestSecret{secrets.token_hex(16)}"
    conn = {"conn_type": "aws", "login": FAKE_ACCESS_KEY, "password": secret, "extra": ec2.connection_extra()}
    monkeypatch.setenv("AIRFLOW_CONN_AMIBAKE_AWS", json.dumps(conn))
    return secret


@pytest.fixture
def green_run(
    nightly: Any,
    ec2: Any,
    boxes: Any,
    box_login: Any,
    subnet: dict,
    aws_secret: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> Iterator[dict[str, Any]]:
    """The run, its captured task log and the box-side logs (the terminated box's files stay until
    the next reset, as a disk kept for inspection)."""
    from rehearsal.ebs import LoopEbs

    monkeypatch.setenv("AIRFLOW__AMIBAKE__SSH_CIDR", SSH_CIDR)
    dag = nightly
    with LoopEbs(ec2.moto_url, ec2.region, tmp_path / "ebs") as ebs:
        ami = ec2.register_base_image("amibake-secrets-base")
        conf = {"recipe": "debian12", "base_ami": ami, "canvas_size_gib": 3}
        dag_run = dag.test(run_conf=conf)
        build = naming.build_id(DAG_ID, dag_run.run_id)
        dirs = [box.path(remote_dir(build)) for box in boxes.boxes]
        for volume_id in [c["VolumeId"] for c in ec2.calls("AttachVolume")]:
            dirs += [box.path(f"{defaults.REMOTE_BASE_DIR}/{volume_id}") for box in boxes.boxes]
        captured = capfd.readouterr()
        box_logs = "".join(p.read_text(errors="replace") for d in dirs for p in d.glob("logs/*.log"))
        for volume_id in [c["VolumeId"] for c in ec2.calls("AttachVolume")]:
            ebs.wait_for(volume_id, attached=False)
        yield {"run": dag_run, "log": captured.out + captured.err, "box_logs": box_logs, "build": build}


def _run_rows(dag_run: Any) -> dict[str, list[str]]:
    """Every XCom value and rendered template field of the run, as JSON text."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        xcoms = session.scalars(
            select(XComModel).where(XComModel.dag_id == DAG_ID, XComModel.run_id == dag_run.run_id)
        ).all()
        rendered = session.scalars(
            select(RenderedTaskInstanceFields).where(
                RenderedTaskInstanceFields.dag_id == DAG_ID,
                RenderedTaskInstanceFields.run_id == dag_run.run_id,
            )
        ).all()
        return {
            "xcom": [
                f"{x.task_id}/{x.key}: {json.dumps(XComModel.deserialize_value(x), default=str)}"
                for x in xcoms
            ],
            "rendered": [f"{r.task_id}: {json.dumps(r.rendered_fields, default=str)}" for r in rendered],
        }


def _secret_needles(aws_secret: str, private_key_pem: str) -> list[str]:
    body = [
        line.strip() for line in private_key_pem.splitlines() if line.strip() and "PRIVATE KEY" not in line
    ]
    assert body and all(len(line) >= 20 for line in body[:-1])
    return [aws_secret, private_key_pem.strip(), *[line for line in body if len(line) >= 20]]


def test_no_secret_in_xcom_logs_templates_or_requests_and_the_box_is_fenced(
    green_run: dict[str, Any], ec2: Any, box_login: Any, aws_secret: str
) -> None:
    dag_run = green_run["run"]
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "success", states
    rows = _run_rows(dag_run)
    assert len(rows["xcom"]) >= 7 and len(rows["rendered"]) >= 7, rows  # what was scanned is really there
    assert "launch_build_box" in green_run["log"] and "phase mkfs" in green_run["log"]
    assert green_run["box_logs"], "the box-side phase logs were found and scanned"
    places = {
        "xcom": "\n".join(rows["xcom"]),
        "rendered templates": "\n".join(rows["rendered"]),
        "task logs": green_run["log"],
        "box-side logs": green_run["box_logs"],
        "EC2 requests": json.dumps(ec2.requests),
    }
    for needle in _secret_needles(aws_secret, box_login.private_key_pem):
        for place, text in places.items():
            assert needle not in text, f"a secret ({needle[:6]}…) is in the {place}"
    assert "PRIVATE KEY" not in places["xcom"] + places["rendered templates"] + places["EC2 requests"]

    (ingress,) = ec2.calls("AuthorizeSecurityGroupIngress")
    assert {k: v for k, v in ingress.items() if k.startswith("IpPermissions")} == {
        "IpPermissions.1.IpProtocol": "tcp",
        "IpPermissions.1.FromPort": "22",
        "IpPermissions.1.ToPort": "22",
        "IpPermissions.1.IpRanges.1.CidrIp": SSH_CIDR,
        **{k: v for k, v in ingress.items() if k.startswith("IpPermissions.1.IpRanges.1.Description")},
    }
    (run,) = ec2.calls("RunInstances")
    assert run["MetadataOptions.HttpTokens"] == "required"
    (volume,) = ec2.calls("CreateVolume")
    assert volume["Encrypted"] == "true"
    (register,) = ec2.calls("RegisterImage")
    assert register["ImdsSupport"] == "v2.0"
    (snapshot,) = ec2.boto3_client().describe_snapshots(
        SnapshotIds=[register["BlockDeviceMapping.1.Ebs.SnapshotId"]]
    )["Snapshots"]
    assert snapshot["Encrypted"] is True  # a snapshot of an encrypted volume is encrypted
