"""EC2 calls of amibake: find a build's resources by tag, create them idempotently, delete them.

``BuildEc2Hook`` is the provider's ``EC2Hook`` (client API) plus the operations amibake needs.
Every create is preceded by a lookup of what this build already made (by its ``amibake:build-id``
and ``amibake:role`` tags, see :mod:`operators.rules.naming`), so a retried task reuses it instead of
making a second one; where EC2 offers a ``ClientToken`` it is derived from the build id as well.
Only resources carrying the ``amibake:build-id`` tag are ever deleted here.
"""

from __future__ import annotations

import time
from typing import Any

from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

from operators import defaults
from operators.rules import naming
from operators.rules.naming import Role

LIVE_INSTANCE_STATES = ["pending", "running", "stopping", "stopped"]
LIVE_SNAPSHOT_STATES = ("pending", "completed")


def _error_code(exc: Exception) -> str:
    """The AWS error code of a botocore ``ClientError`` ('' for anything else)."""
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Code", "")


class BuildEc2Hook(EC2Hook):
    """``EC2Hook`` with the find / ensure / delete operations of one build."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["api_type"] = "client_type"
        super().__init__(*args, **kwargs)

    # -- waits -----------------------------------------------------------------------------------
    def wait(self, waiter_name: str, limits: tuple[int, int], **args: Any) -> None:
        """Block on a botocore waiter with explicit (delay, max attempts)."""
        delay, attempts = limits
        self.get_waiter(waiter_name).wait(**args, WaiterConfig={"Delay": delay, "MaxAttempts": attempts})

    # -- lookups ---------------------------------------------------------------------------------
    def find_instances(self, build: str, *, include_terminated: bool = False) -> list[dict]:
        """Build boxes of one build, newest first (terminated ones only if asked)."""
        filters = naming.build_filters(build, Role.BUILD_BOX)
        if not include_terminated:
            filters.append({"Name": "instance-state-name", "Values": LIVE_INSTANCE_STATES})
        found = [
            inst
            for page in self.conn.get_paginator("describe_instances").paginate(Filters=filters)
            for res in page["Reservations"]
            for inst in res["Instances"]
        ]
        return sorted(found, key=lambda i: str(i.get("LaunchTime", "")), reverse=True)

    def describe_instance(self, instance_id: str) -> dict:
        """One instance by id."""
        return self.conn.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]

    def find_security_groups(self, build: str) -> list[dict]:
        """The temporary security group(s) of one build."""
        return self.conn.describe_security_groups(Filters=naming.build_filters(build, Role.BUILD_SG))[
            "SecurityGroups"
        ]

    def find_volumes(self, build: str, role: Role = Role.CANVAS) -> list[dict]:
        """Volumes of one role of one build."""
        return [
            vol
            for page in self.conn.get_paginator("describe_volumes").paginate(
                Filters=naming.build_filters(build, role)
            )
            for vol in page["Volumes"]
        ]

    def find_snapshots(self, build: str) -> list[dict]:
        """Snapshots of one build (any state), newest first."""
        snaps = self.conn.describe_snapshots(
            OwnerIds=["self"], Filters=naming.build_filters(build, Role.SNAPSHOT)
        )["Snapshots"]
        return sorted(snaps, key=lambda s: str(s.get("StartTime", "")), reverse=True)

    def find_images(self, build: str, name: str | None = None) -> list[dict]:
        """AMIs of one build, found by tag or (tags may be missing after a partial failure) by name."""
        images = {
            img["ImageId"]: img
            for img in self.conn.describe_images(
                Owners=["self"], Filters=naming.build_filters(build, Role.AMI)
            )["Images"]
        }
        if name:
            for img in self.conn.describe_images(
                Owners=["self"], Filters=[{"Name": "name", "Values": [name]}]
            )["Images"]:
                images.setdefault(img["ImageId"], img)
        return [img for img in images.values() if img.get("State") not in ("deregistered", "failed")]

    def resolve_base_ami(self, image_id: str = "", owner: str = "", name: str = "") -> dict:
        """The base AMI: by id, or the newest available one of ``owner`` whose name matches ``name``."""
        if image_id:
            images = self.conn.describe_images(ImageIds=[image_id])["Images"]
            if not images:
                raise ValueError(f"base_ami {image_id!r} does not exist in this region")
            return images[0]
        images = self.conn.describe_images(
            Owners=[owner],
            Filters=[
                {"Name": "name", "Values": [name]},
                {"Name": "state", "Values": ["available"]},
            ],
        )["Images"]
        if not images:
            raise ValueError(f"no available AMI of owner {owner!r} matches base_ami_name {name!r}")
        # newest first; the name breaks ties (names of dated base images sort by date too)
        return max(images, key=lambda i: (i.get("CreationDate", ""), i.get("Name", "")))

    def subnet(self, subnet_id: str) -> dict:
        """One subnet (for its VPC and availability zone)."""
        subnets = self.conn.describe_subnets(SubnetIds=[subnet_id])["Subnets"]
        if not subnets:
            raise ValueError(f"subnet_id {subnet_id!r} does not exist")
        return subnets[0]

    # -- idempotent creates ----------------------------------------------------------------------
    def ensure_security_group(
        self, build: str, *, vpc_id: str, ssh_cidr: str, tags: list[dict[str, str]]
    ) -> str:
        """The build's security group, created if missing, admitting tcp/22 from ``ssh_cidr`` only."""
        groups = self.find_security_groups(build)
        if groups:
            group = groups[0]
        else:
            name = naming.resource_name(build, Role.BUILD_SG)
            try:
                group_id = self.conn.create_security_group(
                    GroupName=name,
                    Description=f"amibake build {build}: SSH to the temporary build box",
                    VpcId=vpc_id,
                    TagSpecifications=[naming.tag_specification("security-group", tags)],
                )["GroupId"]
            except Exception as exc:
                if _error_code(exc) != "InvalidGroup.Duplicate":
                    raise
                group_id = self.conn.describe_security_groups(
                    Filters=[
                        {"Name": "group-name", "Values": [name]},
                        {"Name": "vpc-id", "Values": [vpc_id]},
                    ]
                )["SecurityGroups"][0]["GroupId"]
            group = self.conn.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
        if ssh_cidr and not _admits_ssh_from(group, ssh_cidr):
            try:
                self.conn.authorize_security_group_ingress(
                    GroupId=group["GroupId"],
                    IpPermissions=[
                        {
                            "IpProtocol": "tcp",
                            "FromPort": 22,
                            "ToPort": 22,
                            "IpRanges": [{"CidrIp": ssh_cidr, "Description": "amibake build SSH"}],
                        }
                    ],
                )
            except Exception as exc:
                if _error_code(exc) != "InvalidPermission.Duplicate":
                    raise
        return group["GroupId"]

    def ensure_instance(self, build: str, *, run_args: dict[str, Any], attempt: int) -> tuple[dict, bool]:
        """The build's live box, or a new one from ``run_args``; returns (instance, created).

        ``attempt`` (the task's try number) goes into the ClientToken: EC2 answers a repeated token
        with the ORIGINAL instance even after it was terminated, so a later try (a cleared run)
        needs a new token; within one try botocore's own retries reuse it.
        """
        live = self.find_instances(build)
        if live:
            return live[0], False
        token = f"amibake-{build}-box-{attempt}"
        reservation = self.conn.run_instances(**run_args, MinCount=1, MaxCount=1, ClientToken=token)
        return reservation["Instances"][0], True

    def ensure_volume(self, build: str, *, create_args: dict[str, Any], attempt: int) -> tuple[dict, bool]:
        """The build's canvas volume, or a new one from ``create_args``; returns (volume, created).

        ``attempt`` goes into the ClientToken for the same reason as in :meth:`ensure_instance`.
        """
        live = [v for v in self.find_volumes(build) if v["State"] not in ("deleting", "deleted", "error")]
        if live:
            return live[0], False
        token = f"amibake-{build}-canvas-{attempt}"
        return self.conn.create_volume(**create_args, ClientToken=token), True

    def attach_volume(self, volume_id: str, instance_id: str, device_name: str) -> None:
        """Attach the volume unless it is already attached to that instance."""
        vol = self.conn.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
        for att in vol.get("Attachments", []):
            if att.get("State") in ("attaching", "attached"):
                if att.get("InstanceId") == instance_id:
                    return
                raise RuntimeError(f"volume {volume_id} is attached to another instance {att['InstanceId']}")
        self.conn.attach_volume(VolumeId=volume_id, InstanceId=instance_id, Device=device_name)

    # -- deletes (teardown) ----------------------------------------------------------------------
    def terminate_build_boxes(self, build: str, *, wait: bool = True) -> list[str]:
        """Terminate every live box of the build and wait until terminated; returns their ids."""
        ids = [i["InstanceId"] for i in self.find_instances(build)]
        if ids:
            self.conn.terminate_instances(InstanceIds=ids)
            if wait:
                self.wait("instance_terminated", defaults.WAIT_INSTANCE_TERMINATED, InstanceIds=ids)
        return ids

    def delete_security_groups(
        self, build: str, limits: tuple[int, int] = defaults.SG_DELETE_ATTEMPTS
    ) -> list[str]:
        """Delete the build's security groups, retrying while a terminated box still holds them."""
        delay, attempts = limits
        deleted = []
        for group in self.find_security_groups(build):
            for attempt in range(1, attempts + 1):
                try:
                    self.conn.delete_security_group(GroupId=group["GroupId"])
                    break
                except Exception as exc:
                    code = _error_code(exc)
                    if code == "InvalidGroup.NotFound":
                        break
                    if code != "DependencyViolation" or attempt == attempts:
                        raise
                    self.log.info("security group %s still in use, retrying in %s s", group["GroupId"], delay)
                    time.sleep(delay)
            deleted.append(group["GroupId"])
        return deleted

    def delete_volumes(self, build: str, role: Role = Role.CANVAS) -> list[str]:
        """Detach (naming the instance: moto needs it) and delete every volume of one role of a build."""
        deleted = []
        for vol in self.find_volumes(build, role):
            volume_id = vol["VolumeId"]
            if vol["State"] in ("deleting", "deleted"):
                continue
            for att in vol.get("Attachments", []):
                if att.get("State") in ("attaching", "attached"):
                    self.conn.detach_volume(VolumeId=volume_id, InstanceId=att["InstanceId"], Force=True)
            if vol.get("Attachments"):
                self.wait("volume_available", defaults.WAIT_VOLUME_AVAILABLE, VolumeIds=[volume_id])
            try:
                self.conn.delete_volume(VolumeId=volume_id)
            except Exception as exc:
                if _error_code(exc) != "InvalidVolume.NotFound":
                    raise
            deleted.append(volume_id)
        return deleted

    def snapshot_state(self, snapshot_id: str) -> str:
        """State of one snapshot as AWS reports it now ('' if it no longer exists)."""
        try:
            snaps = self.conn.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        except Exception as exc:
            if _error_code(exc) != "InvalidSnapshot.NotFound":
                raise
            return ""
        return snaps[0]["State"] if snaps else ""

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete one snapshot (a failed one, so a retry takes a new one)."""
        try:
            self.conn.delete_snapshot(SnapshotId=snapshot_id)
        except Exception as exc:
            if _error_code(exc) != "InvalidSnapshot.NotFound":
                raise


def _admits_ssh_from(group: dict, cidr: str) -> bool:
    """Whether a security group already admits tcp/22 from ``cidr``."""
    return any(
        perm.get("IpProtocol") == "tcp"
        and perm.get("FromPort") == 22
        and any(r.get("CidrIp") == cidr for r in perm.get("IpRanges", []))
        for perm in group.get("IpPermissions", [])
    )
