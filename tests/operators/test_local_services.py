"""The local stand-ins the operator tests rely on: LocalEc2 (recorder, faults) and LocalSshd."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import paramiko
import pytest
from botocore.exceptions import ClientError

from rehearsal.ec2_local import Ec2Control
from rehearsal.sshd import PACKAGE_CACHE_ENV, LocalSshd, package_cache

REPO = Path(__file__).resolve().parents[2]


def test_recorder_sees_the_flattened_request(ec2: Any) -> None:
    client = ec2.boto3_client(recorded=True)
    client.create_volume(
        AvailabilityZone="us-east-1a",
        Size=3,
        VolumeType="gp3",
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "k", "Value": "v"}]}],
    )
    (call,) = ec2.calls("CreateVolume")
    assert {k: call[k] for k in ("AvailabilityZone", "Size", "VolumeType")} == {
        "AvailabilityZone": "us-east-1a",
        "Size": "3",
        "VolumeType": "gp3",
    }
    assert call["TagSpecification.1.Tag.1.Key"] == "k"
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
    ec2.boto3_client(recorded=True).describe_regions()
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


def _client(sshd: LocalSshd, *, key: paramiko.PKey | None = None) -> paramiko.SSHClient:
    """A client that trusts only the host key LocalSshd advertises for its connection."""
    client = paramiko.SSHClient()
    key_type, key_b64 = sshd.host_key.split()
    pinned = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64))
    client.get_host_keys().add(f"[{sshd.host}]:{sshd.port}", key_type, pinned)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        sshd.host,
        port=sshd.port,
        username=sshd.login,
        pkey=key or paramiko.Ed25519Key.from_private_key(io.StringIO(sshd.private_key_pem)),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    return client


def test_sshd_admits_only_its_key_and_shows_its_pinned_host_key() -> None:
    with LocalSshd() as sshd:
        workdir = sshd._dir
        client = _client(sshd)
        _, out, _ = client.exec_command("echo ok")
        assert out.read() == b"ok\n"
        client.close()

        stranger = paramiko.RSAKey.generate(2048)
        with pytest.raises(paramiko.AuthenticationException):
            _client(sshd, key=stranger)
        transport = paramiko.Transport((sshd.host, sshd.port))
        try:
            transport.start_client(timeout=10)
            with pytest.raises(paramiko.BadAuthenticationType):
                transport.auth_password(sshd.login, "password")
        finally:
            transport.close()
        pid = sshd._proc.pid
    assert not workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_sshd_sessions_get_the_session_env_and_unsafe_values_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PACKAGE_CACHE_ENV, str(tmp_path / "from-env"))
    assert package_cache() == tmp_path / "from-env"
    cache = tmp_path / "packages"
    with LocalSshd(session_env={PACKAGE_CACHE_ENV: str(cache), "AMIBAKE_DEVICE_WAIT": "15"}) as sshd:
        client = _client(sshd)
        _, out, _ = client.exec_command(f"printenv {PACKAGE_CACHE_ENV} AMIBAKE_DEVICE_WAIT")
        assert out.read().decode().split() == [str(cache), "15"]
        client.close()
    with LocalSshd() as plain:
        client = _client(plain)
        _, out, _ = client.exec_command(f"printenv {PACKAGE_CACHE_ENV} || echo unset")
        assert out.read() == b"unset\n"  # sshd's SetEnv, not the environment of this test process
        client.close()
    for bad in ({PACKAGE_CACHE_ENV: str(tmp_path / "two words")}, {"lower": "1"}, {"X": "a\nb"}):
        with pytest.raises(ValueError, match="session variable"):
            LocalSshd(session_env=bad)
