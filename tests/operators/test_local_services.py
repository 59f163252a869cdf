"""The local stand-ins the operator tests rely on: LocalEc2 (recorder, faults), the package cache.

The boxes behind its instances are tested in tests/rehearsal/test_boxes.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from rehearsal.ec2_local import Ec2Control
from rehearsal.sshd import PACKAGE_CACHE_ENV, package_cache

REPO = Path(__file__).resolve().parents[2]


def test_recorder_sees_the_flattened_request(ec2: Any) -> None:
    client = ec2.boto3_client(recorded=True)
    client.create_volume(
        AvailabilityZone="us-east-1a",
        Size=3,
        VolumeType="gp3",
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "amibake:build-id", "Value": "b1"}]}],
    )
    (call,) = ec2.calls("CreateVolume")
    assert {k: call[k] for k in ("AvailabilityZone", "Size", "VolumeType")} == {
        "AvailabilityZone": "us-east-1a",
        "Size": "3",
        "VolumeType": "gp3",
    }
    assert call["TagSpecification.1.Tag.1.Key"] == "amibake:build-id"
    ec2.boto3_client().describe_volumes()  # straight to moto: not recorded
    assert [r["action"] for r in ec2.requests] == ["CreateVolume"]


def test_faults_are_answered_as_aws_errors_and_counted(ec2: Any) -> None:
    import boto3
    from botocore.config import Config

    no_retry = boto3.client(
        "ec2",
        region_name=ec2.region,
        endpoint_url=ec2.endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"total_max_attempts": 1}),
    )
    ec2.add_fault("DescribeVolumes", "UnauthorizedOperation", 403, times=2)
    for _ in range(2):
        with pytest.raises(ClientError) as err:
            no_retry.describe_volumes()
        assert err.value.response["Error"]["Code"] == "UnauthorizedOperation"
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    no_retry.describe_volumes()  # the fault was used up
    assert [r.get("fault") for r in ec2.requests] == ["UnauthorizedOperation", "UnauthorizedOperation", None]


def test_reset_wipes_state_requests_and_faults(ec2: Any) -> None:
    ec2.register_base_image("amibake-reset-check")
    ec2.add_fault("DescribeImages", times=None)
    ec2.boto3_client(recorded=True).describe_volumes()
    ec2.reset()
    assert ec2.requests == []
    assert ec2.boto3_client(recorded=True).describe_images(Owners=["self"])["Images"] == []


def test_standalone_process_exposes_requests_and_faults() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rehearsal.ec2_local", "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        info = json.loads(proc.stdout.readline())
        control = Ec2Control(info["endpoint_url"])
        assert control.info() == info
        image = control.register_base_image("standalone-base")
        control.add_fault("DescribeImages", "RequestLimitExceeded", 503, times=1)
        import boto3

        client = boto3.client(
            "ec2",
            region_name=info["region"],
            endpoint_url=info["endpoint_url"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        assert client.describe_images(ImageIds=[image])["Images"][0]["ImageId"] == image  # retried once
        assert [r.get("fault") for r in control.requests] == ["RequestLimitExceeded", None]
        control.clear_requests()
        assert control.requests == []
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_bad_port_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rehearsal.ec2_local", "--port", "70000"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--port" in result.stderr


def test_package_cache_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PACKAGE_CACHE_ENV, str(tmp_path / "from-env"))
    assert package_cache() == tmp_path / "from-env"
    monkeypatch.delenv(PACKAGE_CACHE_ENV)
    assert package_cache() == REPO / ".cache" / "packages"
