"""What a build box (and the smoke instance) is launched with: the cloud-init user data, the
RunInstances request, and which of its addresses the worker uses.

One home for both, so the night (``LaunchBuildBox``, ``SmokeInstance``) and its preflight dry run
(``Preflight``) send the same request. Pure: no Airflow, boto or paramiko import.

The box gets the SSH connection's PUBLIC key through user data (``ssh_authorized_keys``): no EC2 key
pair resource exists to leak, and the private key stays in the Airflow connection. It also gets a
per-build ed25519 HOST key, whose public half goes to XCom, so every task verifies the box it talks
to. (User data is readable by whoever may call DescribeInstanceAttribute on the box; the host key
lives only as long as the box.) The smoke instance gets a fresh LOGIN key pair too, whose private
half never leaves ``SmokeInstance``'s memory.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from operators import defaults
from operators.rules.naming import tag_specification

#: IMDSv2 only, and not reachable from containers on the box
METADATA_OPTIONS = {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1}


def new_host_key() -> tuple[str, str]:
    """A fresh ed25519 key pair: (private key in OpenSSH PEM, ``ssh-ed25519 base64`` public key).

    A box's host key; the smoke instance also gets its LOGIN key this way (its private half stays in
    the task's memory)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode()


def user_data(authorized_key: str, host_key: tuple[str, str] | None) -> str:
    """cloud-init user data (JSON is valid YAML) giving the box our login key and host key."""
    config: dict[str, Any] = {"ssh_authorized_keys": [authorized_key]}
    if host_key is not None:
        config["ssh_deletekeys"] = True
        config["ssh_genkeytypes"] = []
        config["ssh_keys"] = {"ed25519_private": host_key[0], "ed25519_public": host_key[1]}
    return "#cloud-config\n" + json.dumps(config, indent=1) + "\n"


def host_key_from_user_data(encoded: str) -> str:
    """The public host key a box got through :func:`user_data` ('' if none)."""
    text = base64.b64decode(encoded).decode()
    body = text.split("\n", 1)[1] if text.startswith("#cloud-config") else text
    return json.loads(body).get("ssh_keys", {}).get("ed25519_public", "")


def run_instances_args(
    *,
    image_id: str,
    instance_type: str,
    subnet_id: str,
    user_data: str,
    tags: list[dict[str, str]],
    instance_profile: str = "",
    security_group_ids: list[str] | None = None,
    root_volume: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """The RunInstances parameters of a build box (or a smoke instance): IMDSv2, terminate on
    shutdown, tagged at creation (instance, root volume, network interface), in the build's security
    group when it exists; ``root_volume`` = (device name, GiB) resizes the AMI's root volume (deleted
    with the instance)."""
    args: dict[str, Any] = {
        "ImageId": image_id,
        "InstanceType": instance_type,
        "SubnetId": subnet_id,
        "UserData": user_data,
        "MetadataOptions": dict(METADATA_OPTIONS),
        "InstanceInitiatedShutdownBehavior": "terminate",
        "TagSpecifications": [
            tag_specification("instance", tags),
            tag_specification("volume", tags),
            tag_specification("network-interface", tags),
        ],
    }
    if security_group_ids:
        args["SecurityGroupIds"] = security_group_ids
    if root_volume is not None:
        device, size_gib = root_volume
        args["BlockDeviceMappings"] = [
            {"DeviceName": device, "Ebs": {"VolumeSize": size_gib, "DeleteOnTermination": True}}
        ]
    if instance_profile:
        key = "Arn" if instance_profile.startswith("arn:") else "Name"
        args["IamInstanceProfile"] = {key: instance_profile}
    return args


#: Which address of an instance the worker uses for each ``[amibake] ssh_address``. With
#: ``connection`` the build box is reached through the connection's own host (a tunnel to the box),
#: which does not lead to any other instance: the smoke instance is then reached at its private IP.
ADDRESS_FIELDS = {
    "public_ip": "PublicIpAddress",
    "private_ip": "PrivateIpAddress",
    "connection": "PrivateIpAddress",
}


def create_volume_args(
    *, zone: str, size_gib: int, encrypted: bool, kms_key_id: str, tags: list[dict[str, str]]
) -> dict[str, Any]:
    """The CreateVolume parameters of a build's canvas (gp3, tagged at creation)."""
    args: dict[str, Any] = {
        "AvailabilityZone": zone,
        "Size": size_gib,
        "VolumeType": defaults.CANVAS_VOLUME_TYPE,
        "Encrypted": encrypted,
        "TagSpecifications": [tag_specification("volume", tags)],
    }
    if kms_key_id:
        args["KmsKeyId"] = kms_key_id
    return args


def instance_address(instance: dict[str, Any], ssh_address: str) -> str:
    """The address of a described instance for ``ssh_address`` (ValueError when it has none)."""
    key = ADDRESS_FIELDS[ssh_address]
    address = instance.get(key)
    if not address:
        raise ValueError(f"instance {instance.get('InstanceId')} has no {key} (ssh_address={ssh_address})")
    return str(address)
