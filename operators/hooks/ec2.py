"""EC2 calls of amibake: find a build's resources by tag, create them idempotently, delete them.

``BuildEc2Hook`` is the provider's ``EC2Hook`` (client API) plus the operations amibake needs.
Every create is preceded by a lookup of what this build already made (by its ``amibake:build-id``
and ``amibake:role`` tags, see :mod:`operators.rules.naming`), so a retried task reuses it instead of
making a second one; where EC2 offers a ``ClientToken`` it is derived from the build id as well.
Only resources carrying the ``amibake:build-id`` tag are ever deleted here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

from operators import defaults
from operators.rules import naming
from operators.rules.errors import error_code, http_status
from operators.rules.lifecycle import Inventory
from operators.rules.naming import Role

LIVE_INSTANCE_STATES = ["pending", "running", "stopping", "stopped"]
LIVE_SNAPSHOT_STATES = ("pending", "completed")
#: EC2 is eventually consistent: a volume, snapshot or AMI just created may be unknown for a few
#: seconds. botocore's waiters of the ones amibake waits for right after creating them fail at once on
#: that ``*.NotFound`` (its instance waiters already retry it); these acceptors make them retry.
NOT_FOUND_RETRY = {
    "volume_available": "InvalidVolume.NotFound",
    "volume_in_use": "InvalidVolume.NotFound",
    "snapshot_completed": "InvalidSnapshot.NotFound",
    "image_available": "InvalidAMIID.NotFound",
}
#: Answers that mean EC2 refused the call before acting (safe to send again at once).
THROTTLING_CODES = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException"})


def backoff(attempt: int, cap: float) -> float:
    """Seconds before retry number ``attempt`` (1, 2 ...): 0.5, 1, 2, 4 ... but at most ``cap``."""
    return min(cap, 0.5 * 2 ** (attempt - 1))


def maybe_acted(exc: Exception) -> bool:
    """Whether EC2 may have carried out a call that raised ``exc``: its answer was lost on the way
    back (connection closed, read timeout) or was a server error, not a refusal."""
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

    if isinstance(exc, (ConnectionClosedError, ReadTimeoutError)):
        return True
    return http_status(exc) >= 500 and error_code(exc) not in THROTTLING_CODES


@contextlib.contextmanager
def ignoring(*codes: str) -> Iterator[None]:
    """Swallow a ``ClientError`` whose AWS error code is one of ``codes`` (e.g. "already gone")."""
    try:
        yield
    except Exception as exc:
        if error_code(exc) not in codes:
            raise


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

    def get_waiter(
        self,
        waiter_name: str,
        parameters: dict[str, str] | None = None,
        config_overrides: dict[str, Any] | None = None,
        deferrable: bool = False,
        client: Any = None,
    ) -> Any:
        """botocore's EC2 waiter, with ``config_overrides`` applied and :data:`NOT_FOUND_RETRY` added.

        The provider applies overrides to its own JSON waiters only (EC2 has none), and the triggers
        use this method too (``deferrable=True`` with an async client).
        """
        if waiter_name not in NOT_FOUND_RETRY and not config_overrides:
            return super().get_waiter(waiter_name, parameters, config_overrides, deferrable, client)
        from airflow.providers.amazon.aws.waiters.base_waiter import BaseBotoWaiter
        from botocore.loaders import create_loader
        from botocore.waiter import xform_name

        models = create_loader().load_service_model("ec2", "waiters-2")["waiters"]
        pascal = next(name for name in models if xform_name(name) == waiter_name)
        config = {**models[pascal], **(config_overrides or {})}
        if waiter_name in NOT_FOUND_RETRY:
            retry = {"matcher": "error", "expected": NOT_FOUND_RETRY[waiter_name], "state": "retry"}
            config["acceptors"] = [*config["acceptors"], retry]
        model = {"version": 2, "waiters": {waiter_name: config}}
        return BaseBotoWaiter(client=client or self.conn, model_config=model, deferrable=deferrable).waiter(
            waiter_name
        )

    # -- lookups ---------------------------------------------------------------------------------
    def find_instances(self, build: str, role: Role = Role.BUILD_BOX) -> list[dict]:
        """Live instances of one role (the build box, or the smoke instance) of one build, newest first."""
        filters = [
            *naming.build_filters(build, role),
            {"Name": "instance-state-name", "Values": LIVE_INSTANCE_STATES},
        ]
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

    def user_data(self, instance_id: str) -> str:
        """An instance's user data, base64 as EC2 returns it ('' if none)."""
        attr = self.conn.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        return attr.get("UserData", {}).get("Value", "")

    def describe_image(self, image_id: str) -> dict:
        """One AMI by id."""
        return self.conn.describe_images(ImageIds=[image_id])["Images"][0]

    def find_security_groups(self, build: str) -> list[dict]:
        """The temporary security group(s) of one build."""
        return self.conn.describe_security_groups(Filters=naming.build_filters(build, Role.BUILD_SG))[
            "SecurityGroups"
        ]

    def find_volumes(self, build: str) -> list[dict]:
        """Canvas volumes of one build."""
        return [
            vol
            for page in self.conn.get_paginator("describe_volumes").paginate(
                Filters=naming.build_filters(build, Role.CANVAS)
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
        for img in self.images_named(name) if name else []:
            images.setdefault(img["ImageId"], img)
        return [img for img in images.values() if img.get("State") not in ("deregistered", "failed")]

    def images_named(self, name: str) -> list[dict]:
        """This account's AMIs called ``name`` (AMI names are unique per account and region)."""
        return self.conn.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])[
            "Images"
        ]

    def resolve_base_ami(self, image_id: str = "", owner: str = "", name: str = "") -> dict:
        """The base AMI: by id, or the newest available one of ``owner`` whose name matches ``name``."""
        if image_id:
            images = self.conn.describe_images(ImageIds=[image_id])["Images"]
            if not images:
                raise ValueError(f"base_ami {image_id!r} does not exist in this region")
            return images[0]
        # IncludeDeprecated: AWS hides deprecated AMIs otherwise, and public AMIs are deprecated two
        # years after creation by default (every CentOS 7 image is older than that)
        images = self.conn.describe_images(
            Owners=[owner],
            Filters=[
                {"Name": "name", "Values": [name]},
                {"Name": "state", "Values": ["available"]},
            ],
            IncludeDeprecated=True,
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

    # -- preflight (read-only or DryRun: nothing is created) --------------------------------------
    def dry_run(self, method: str, **args: Any) -> tuple[str, str]:
        """Call ``method`` with ``DryRun=True``; AWS's answer as (error code, message).

        ``("DryRunOperation", ...)`` means the call would have succeeded. ``("", "")`` means the
        endpoint IGNORED DryRun and carried the call out: the caller must treat that as a failure.
        """
        try:
            getattr(self.conn, method)(DryRun=True, **args)
        except Exception as exc:
            code = error_code(exc)
            if not code:
                raise
            return code, str(exc)
        return "", ""

    def instance_type_offered(self, instance_type: str, zone: str) -> bool:
        """Whether ``instance_type`` can be launched in availability zone ``zone``."""
        offers = self.conn.describe_instance_type_offerings(
            LocationType="availability-zone",
            Filters=[
                {"Name": "location", "Values": [zone]},
                {"Name": "instance-type", "Values": [instance_type]},
            ],
        )["InstanceTypeOfferings"]
        return bool(offers)

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
                if error_code(exc) != "InvalidGroup.Duplicate":
                    raise
                group_id = self.conn.describe_security_groups(
                    Filters=[
                        {"Name": "group-name", "Values": [name]},
                        {"Name": "vpc-id", "Values": [vpc_id]},
                    ]
                )["SecurityGroups"][0]["GroupId"]
            group = self.conn.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
        if ssh_cidr and not _admits_ssh_from(group, ssh_cidr):
            with ignoring("InvalidPermission.Duplicate"):
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
        return self.run_instance(run_args, token=f"amibake-{build}-box-{attempt}"), True

    def run_instance(self, run_args: dict[str, Any], *, token: str) -> dict:
        """Launch ONE instance (RunInstances with ``token`` as ClientToken, so botocore's retries of a
        lost answer never launch a second); returns it."""
        return self.conn.run_instances(**run_args, MinCount=1, MaxCount=1, ClientToken=token)["Instances"][0]

    def ensure_volume(self, build: str, *, create_args: dict[str, Any], attempt: int) -> tuple[dict, bool]:
        """The build's canvas volume, or a new one from ``create_args``; returns (volume, created).

        ``attempt`` goes into the ClientToken for the same reason as in :meth:`ensure_instance`.
        """
        live = [v for v in self.find_volumes(build) if v["State"] not in ("deleting", "deleted", "error")]
        if live:
            return live[0], False
        token = f"amibake-{build}-canvas-{attempt}"
        return self.conn.create_volume(**create_args, ClientToken=token), True

    def retry_not_found(
        self, call: Any, not_found: str, limits: tuple[float, int] = defaults.NEW_RESOURCE_RETRIES
    ) -> Any:
        """``call()``, retried with :func:`backoff` while it answers ``not_found``: for a resource this
        build has just created, which EC2 may not know everywhere yet (eventual consistency)."""
        cap, attempts = limits
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except Exception as exc:
                if error_code(exc) != not_found or attempt >= attempts:
                    raise
                self.log.info("%s (just created: EC2 is eventually consistent); retrying", not_found)
                time.sleep(backoff(attempt, cap))

    def create_snapshot(
        self, build: str, *, volume_id: str, description: str, tags: list[dict[str, str]]
    ) -> str:
        """CreateSnapshot exactly once; returns the snapshot id.

        CreateSnapshot has no ClientToken: after a lost answer botocore would send it again and EC2
        would take a second snapshot. So it is sent with botocore's retries off; when EC2 may have
        acted (:func:`maybe_acted`), this build's snapshot of the volume is looked up (EC2 may list it
        only after a few seconds) before it is sent again.
        """
        from botocore.config import Config

        once = self.get_client_type(config=self.config.merge(Config(retries={"total_max_attempts": 1})))
        cap, attempts = defaults.NEW_RESOURCE_RETRIES
        attempt = 0
        while True:
            attempt += 1
            try:
                return once.create_snapshot(
                    VolumeId=volume_id,
                    Description=description,
                    TagSpecifications=[naming.tag_specification("snapshot", tags)],
                )["SnapshotId"]
            except Exception as exc:
                acted = maybe_acted(exc)
                if attempt >= attempts or not (acted or error_code(exc) in THROTTLING_CODES):
                    raise
                self.log.warning(
                    "CreateSnapshot of %s failed (%s); EC2 may have acted: %s", volume_id, exc, acted
                )
                if acted:
                    for poll in range(1, 6):
                        taken = [
                            s["SnapshotId"]
                            for s in self.find_snapshots(build)
                            if s.get("VolumeId") == volume_id and s["State"] in LIVE_SNAPSHOT_STATES
                        ]
                        if taken:
                            return taken[0]
                        time.sleep(backoff(poll, cap))
                else:
                    time.sleep(backoff(attempt, cap))

    def register_image(self, args: dict[str, Any]) -> str:
        """RegisterImage; returns the AMI id. It has no ClientToken, but AMI names are unique per
        account: when botocore's retry after a lost answer meets ``InvalidAMIName.Duplicate``, the AMI
        of that name is the one the lost answer was about (the caller looked the name up before)."""
        try:
            return self.conn.register_image(**args)["ImageId"]
        except Exception as exc:
            if error_code(exc) != "InvalidAMIName.Duplicate":
                raise
            images = self.images_named(args["Name"])
            if not images:
                raise
            self.log.info("AMI %s was registered by a call whose answer was lost", images[0]["ImageId"])
            return images[0]["ImageId"]

    def attach_volume(self, volume_id: str, instance_id: str, device_name: str) -> None:
        """Attach the volume (once EC2 knows it: it may be just created) unless already attached there."""
        vol = self.retry_not_found(
            lambda: self.conn.describe_volumes(VolumeIds=[volume_id])["Volumes"][0], "InvalidVolume.NotFound"
        )
        for att in vol.get("Attachments", []):
            if att.get("State") in ("attaching", "attached"):
                if att.get("InstanceId") == instance_id:
                    return
                raise RuntimeError(f"volume {volume_id} is attached to another instance {att['InstanceId']}")
        self.conn.attach_volume(VolumeId=volume_id, InstanceId=instance_id, Device=device_name)

    # -- current state of one resource ('' when AWS does not know it (yet, or any more)) ---------
    def instance_state(self, instance_id: str) -> str:
        """State name of one instance."""
        return self._state(
            lambda: self.conn.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][
                0
            ]["State"]["Name"],
            "InvalidInstanceID.NotFound",
        )

    def snapshot_state(self, snapshot_id: str) -> str:
        """State of one snapshot."""
        return self._state(
            lambda: self.conn.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["State"],
            "InvalidSnapshot.NotFound",
        )

    def image_state(self, image_id: str) -> str:
        """State of one AMI."""
        return self._state(
            lambda: self.conn.describe_images(ImageIds=[image_id])["Images"][0]["State"],
            "InvalidAMIID.NotFound",
        )

    @staticmethod
    def _state(read: Any, not_found: str) -> str:
        try:
            return str(read())
        except IndexError:
            return ""
        except Exception as exc:
            if error_code(exc) != not_found:
                raise
            return ""

    # -- everything amibake made, for the sweeper and rotation ------------------------------------
    def _all(self, method: str, key: str, **kwargs: Any) -> list[dict]:
        return [item for page in self.conn.get_paginator(method).paginate(**kwargs) for item in page[key]]

    def inventory(self) -> Inventory:
        """Every resource carrying the build-id tag, and every AMI of the account (ours or not, so a
        snapshot another AMI uses is protected), deprecated and disabled ones included."""
        ours = naming.project_filters()
        return Inventory(
            instances=[
                i
                for r in self._all("describe_instances", "Reservations", Filters=ours)
                for i in r["Instances"]
            ],
            volumes=self._all("describe_volumes", "Volumes", Filters=ours),
            security_groups=self._all("describe_security_groups", "SecurityGroups", Filters=ours),
            images=self.account_images(),
            snapshots=self.our_snapshots(),
        )

    def our_snapshots(self) -> list[dict]:
        """Every snapshot of this account that carries the build-id tag."""
        return self._all(
            "describe_snapshots", "Snapshots", OwnerIds=["self"], Filters=naming.project_filters()
        )

    def account_images(self) -> list[dict]:
        """Every AMI of this account, including deprecated and disabled ones (their snapshots are in use)."""
        return self._all(
            "describe_images", "Images", Owners=["self"], IncludeDisabled=True, IncludeDeprecated=True
        )

    # -- deletes: each tolerates "already gone" ---------------------------------------------------
    def terminate_instances(self, instance_ids: list[str]) -> None:
        """Terminate instances and wait until they are terminated; one already gone is no error."""
        terminating = []
        for batch in [instance_ids] if len(instance_ids) == 1 else [[i] for i in instance_ids]:
            try:
                self.conn.terminate_instances(InstanceIds=batch)
                terminating += batch
            except Exception as exc:
                if error_code(exc) != "InvalidInstanceID.NotFound":
                    raise
                self.log.info("instance %s is already gone", batch[0])
        if terminating:
            self.wait("instance_terminated", defaults.WAIT_INSTANCE_TERMINATED, InstanceIds=terminating)

    def delete_security_group(
        self, group_id: str, limits: tuple[int, int] = defaults.SG_DELETE_ATTEMPTS
    ) -> None:
        """Delete a security group, retrying while a terminated box's network interface still holds it."""
        delay, attempts = limits
        for attempt in range(1, attempts + 1):
            try:
                self.conn.delete_security_group(GroupId=group_id)
                return
            except Exception as exc:
                code = error_code(exc)
                if code == "InvalidGroup.NotFound":
                    return
                if code != "DependencyViolation" or attempt == attempts:
                    raise
                self.log.info("security group %s still in use (try %d/%d)", group_id, attempt, attempts)
                time.sleep(backoff(attempt, delay))

    def delete_volume(self, volume_id: str) -> None:
        """Detach a volume from whatever holds it now (naming the instance, as the API documents),
        wait until it is available, delete it. Gone already (a box's root volume goes with its box)
        is no error, and neither is an attachment that ended meanwhile."""
        with ignoring("InvalidVolume.NotFound"):
            (volume,) = self.conn.describe_volumes(VolumeIds=[volume_id])["Volumes"]
            for att in volume.get("Attachments") or []:
                if att.get("State") in ("attaching", "attached"):
                    with ignoring("InvalidAttachment.NotFound", "IncorrectState"):
                        self.conn.detach_volume(VolumeId=volume_id, InstanceId=att["InstanceId"], Force=True)
            if volume["State"] != "available":
                self.wait("volume_available", defaults.WAIT_VOLUME_AVAILABLE, VolumeIds=[volume_id])
            self.conn.delete_volume(VolumeId=volume_id)

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete one snapshot."""
        with ignoring("InvalidSnapshot.NotFound"):
            self.conn.delete_snapshot(SnapshotId=snapshot_id)

    def deregister_image(self, image_id: str) -> None:
        """Deregister one AMI (its snapshots stay: the caller decides about them)."""
        with ignoring("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"):
            self.conn.deregister_image(ImageId=image_id)

    def deprecate_image(self, image_id: str, at: datetime) -> None:
        """Set an AMI's deprecation time."""
        self.conn.enable_image_deprecation(ImageId=image_id, DeprecateAt=at)

    # -- the smoke instance ------------------------------------------------------------------------
    def status_checks(self, instance_id: str) -> tuple[str, str]:
        """(instance status, system status) of a running instance: "ok" twice is EC2's 2/2 ('' while
        EC2 reports none, e.g. before the instance runs)."""
        statuses = self.conn.describe_instance_status(InstanceIds=[instance_id])["InstanceStatuses"]
        if not statuses:
            return "", ""
        return statuses[0]["InstanceStatus"]["Status"], statuses[0]["SystemStatus"]["Status"]

    def console_output(self, instance_id: str) -> str:
        """The instance's console output as EC2 last captured it (GetConsoleOutput), '' if none.
        EC2 sends it base64-encoded; botocore decodes it (``decode_console_output``)."""
        return self.conn.get_console_output(InstanceId=instance_id).get("Output") or ""

    def tag_manifest(self, image_id: str, tags: dict[str, str]) -> None:
        """Tag an AMI of ours with what is in it and where it came from (``naming.MANIFEST_TAGS`` only:
        the IAM policy allows no other key on an existing AMI)."""
        unknown = set(tags) - set(naming.MANIFEST_TAGS)
        if unknown:
            raise ValueError(f"not manifest tags: {sorted(unknown)}")
        self.conn.create_tags(Resources=[image_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])

    def mark_verified(self, image_id: str) -> None:
        """Tag an AMI of ours ``amibake:verified=true`` (its smoke check passed)."""
        self.conn.create_tags(
            Resources=[image_id], Tags=[{"Key": naming.TAG_VERIFIED, "Value": naming.VERIFIED}]
        )

    # -- teardown of one build, found by its tags ---------------------------------------------------
    def terminate_build_instances(self, build: str, role: Role = Role.BUILD_BOX) -> list[str]:
        """Terminate every live instance of one role (the build box, or the smoke instance) of the
        build and wait until terminated; returns their ids."""
        ids = [i["InstanceId"] for i in self.find_instances(build, role)]
        self.terminate_instances(ids)
        return ids

    def delete_security_groups(self, build: str) -> list[str]:
        """Delete the build's security groups; returns their ids."""
        ids = [g["GroupId"] for g in self.find_security_groups(build)]
        for group_id in ids:
            self.delete_security_group(group_id)
        return ids

    def delete_volumes(self, build: str) -> list[str]:
        """Detach and delete the build's canvas volumes; returns their ids."""
        ids = [v["VolumeId"] for v in self.find_volumes(build) if v["State"] not in ("deleting", "deleted")]
        for volume_id in ids:
            self.delete_volume(volume_id)
        return ids

    # -- distribution: copies of a verified AMI in other regions, and who may launch them -----------
    # (operators.distribute; each call goes to this hook's region: one hook per region)
    def find_copies(self, source_image_id: str) -> list[dict]:
        """This region's copies of ``source_image_id`` (by :data:`naming.TAG_SOURCE_AMI`), any state
        but deregistered, newest first."""
        images = self.conn.describe_images(
            Owners=["self"],
            Filters=[{"Name": f"tag:{naming.TAG_SOURCE_AMI}", "Values": [source_image_id]}],
            IncludeDeprecated=True,
            IncludeDisabled=True,
        )["Images"]
        live = [img for img in images if img.get("State") != "deregistered"]
        return sorted(live, key=lambda i: str(i.get("CreationDate", "")), reverse=True)

    def copy_image(self, args: dict[str, Any]) -> str:
        """CopyImage into this region; returns the copy's id.

        ``args`` carries a ClientToken, so botocore's retry after a lost answer gets the original
        copy. AMI names are unique per region: ``InvalidAMIName.Duplicate`` names the copy a lost
        answer was about when that AMI carries the source tag (else it is another AMI: raised).
        """
        try:
            return self.conn.copy_image(**args)["ImageId"]
        except Exception as exc:
            if error_code(exc) != "InvalidAMIName.Duplicate":
                raise
            ours = [
                img
                for img in self.images_named(args["Name"])
                if naming.tags_to_dict(img.get("Tags")).get(naming.TAG_SOURCE_AMI) == args["SourceImageId"]
            ]
            if not ours:
                raise
            self.log.info("AMI %s is the copy a lost CopyImage answer was about", ours[0]["ImageId"])
            return ours[0]["ImageId"]

    def launch_permissions(self, image_id: str) -> list[dict[str, str]]:
        """Who may launch an AMI now (DescribeImageAttribute ``launchPermission``)."""
        answer = self.conn.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
        return list(answer.get("LaunchPermissions") or [])

    def add_launch_permissions(self, image_id: str, permissions: list[dict[str, str]]) -> None:
        """Let these accounts / organizations / OUs launch an AMI (adding is idempotent on EC2)."""
        self.conn.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": permissions})

    def volume_permissions(self, snapshot_id: str) -> set[str]:
        """Accounts that may create volumes from a snapshot now (``createVolumePermission``)."""
        answer = self.conn.describe_snapshot_attribute(
            SnapshotId=snapshot_id, Attribute="createVolumePermission"
        )
        return {p["UserId"] for p in answer.get("CreateVolumePermissions") or [] if "UserId" in p}

    def add_volume_permissions(self, snapshot_id: str, accounts: list[str]) -> None:
        """Let these accounts create volumes from (and so copy) a snapshot. EC2 has no organization
        or OU form of it: launching a shared AMI needs none, copying it needs the account's."""
        self.conn.modify_snapshot_attribute(
            SnapshotId=snapshot_id,
            Attribute="createVolumePermission",
            OperationType="add",
            UserIds=accounts,
        )


def _admits_ssh_from(group: dict, cidr: str) -> bool:
    """Whether a security group already admits tcp/22 from ``cidr``."""
    return any(
        perm.get("IpProtocol") == "tcp"
        and perm.get("FromPort") == 22
        and any(r.get("CidrIp") == cidr for r in perm.get("IpRanges", []))
        for perm in group.get("IpPermissions", [])
    )
