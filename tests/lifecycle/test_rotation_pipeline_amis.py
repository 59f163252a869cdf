"""Rotation of AMIs as the nightly really registers them (RegisterHVMAmi: tags, snapshot-id tag),
so the contract between the two (recipe, build-id and snapshot-id tags) is tested, not assumed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG
from lifecycle_helpers import ids, make_snapshot, mutating
from operator_harness import make_context, run_operator

from operators.ami import RegisterHVMAmi
from operators.rotate import RotateAmis
from operators.rules import naming


def test_rotating_amis_registered_by_the_pipeline(ec2: Any, tmp_path: Path) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    dag_id = f"amibake_t_rotate_{tmp_path.name[-12:]}"
    nights = []
    for n in (3, 2, 1, 0):  # oldest first, like the nightly runs
        run_after = datetime(2026, 11, 25, 2, 0, tzinfo=UTC) - timedelta(days=n)
        run_id = f"scheduled__{run_after.isoformat()}"
        snapshot = make_snapshot(ec2, naming.build_id(dag_id, run_id), run_after)
        with DAG(dag_id, schedule=None) as dag:
            register = RegisterHVMAmi(
                task_id=f"register_{n}",
                recipe="debian12",
                snapshot={"snapshot_id": snapshot, "volume_id": "vol-0123456789abcdef0"},
                size_gib=2,
                deferrable=False,
            )
        ami = run_operator(register, make_context(dag, run_id, run_after=run_after)).result["ami_id"]
        # moto stamps every AMI with "now" (same second here); give each its night's CreationDate
        ec2_backends[DEFAULT_ACCOUNT_ID][ec2.region].amis[ami].creation_date = run_after
        nights.append({"ami": ami, "snapshot": snapshot})
        image_tags = naming.tags_to_dict(
            ec2.boto3_client().describe_images(ImageIds=[ami])["Images"][0]["Tags"]
        )
        assert image_tags[naming.TAG_IMAGE_LINE] == "amibake-debian12", "registration names the image line"
        assert naming.TAG_VERIFIED not in image_tags, "registration alone never verifies an AMI"
        # what SmokeInstance does once every first-boot check passed (tests/operators/test_smoke.py)
        ec2.boto3_client().create_tags(
            Resources=[ami], Tags=[{"Key": naming.TAG_VERIFIED, "Value": naming.VERIFIED}]
        )
    ec2.clear_requests()

    result = RotateAmis(
        task_id="rotate", recipe="debian12", new_ami_id=nights[-1]["ami"], keep=1, grace=1
    ).execute({})

    calls = mutating(ec2)
    assert ids(calls, "EnableImageDeprecation") == [nights[2]["ami"]]
    assert ids(calls, "DeregisterImage") == [nights[1]["ami"], nights[0]["ami"]]
    assert ids(calls, "DeleteSnapshot") == [nights[1]["snapshot"], nights[0]["snapshot"]]
    assert result["kept"] == [nights[3]["ami"]]
