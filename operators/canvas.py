"""``AttachCanvas`` creates and attaches the blank canvas volume; ``DeleteCanvas`` is its teardown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from operators import defaults
from operators.base import AmibakeOperator
from operators.links.ec2 import VolumeLink
from operators.rules import launch, records, validation
from operators.rules.naming import Role

if TYPE_CHECKING:
    from airflow.sdk import Context


class AttachCanvas(AmibakeOperator):
    """Create a blank gp3 volume in the box's AZ, tagged, and attach it to the box until ``in-use``.

    Looks up this build's canvas first, so a retry attaches the same volume instead of a second
    one. If the task fails for good, it deletes the volume it made.
    XCom: ``{"volume_id", "device_name", "size_gib"}``.

    :param box: ``LaunchBuildBox``'s XCom (instance id and availability zone are used).
    :param size_gib: size of the canvas in GiB.
    :param device_name: device name to attach at (``/dev/sdf``; NVMe boxes show it by volume id).
    :param encrypted: encrypt the volume (default True).
    :param kms_key_id: KMS key for the encryption (default: ``[amibake] kms_key_id`` or the
        account's default EBS key).
    """

    template_fields: Sequence[str] = (
        *AmibakeOperator.template_fields,
        "box",
        "size_gib",
        "device_name",
        "encrypted",
        "kms_key_id",
    )
    operator_extra_links = (VolumeLink(),)
    ui_color = "#c9e4f6"

    def __init__(
        self,
        *,
        box: Any,
        size_gib: Any = defaults.DEFAULT_CANVAS_SIZE_GIB,
        device_name: str = defaults.DEFAULT_CANVAS_DEVICE,
        encrypted: Any = True,
        kms_key_id: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.box = box
        self.size_gib = size_gib
        self.device_name = device_name
        self.encrypted = encrypted
        self.kms_key_id = kms_key_id

    def execute(self, context: Context) -> dict[str, Any]:
        """Validate, create or find the volume, attach it, wait until in use."""
        size = validation.validate_size(self.size_gib, "size_gib")
        device = validation.DEVICE_NAME_RE.fullmatch(str(self.device_name))
        if not device:
            raise validation.ParamError(
                "device_name", f"must be /dev/sdf../dev/sdp, got {self.device_name!r}"
            )
        encrypted = validation.as_bool({"encrypted": self.encrypted}, "encrypted", True)
        kms_key_id = validation.kms_key(self.kms_key_id or defaults.setting("kms_key_id"), encrypted)
        box: records.Box = records.check("box", self.box)
        instance_id, zone = box["instance_id"], box["availability_zone"]

        hook = self.hook
        build = self.build_of(context)
        create_args = launch.create_volume_args(
            zone=zone,
            size_gib=size,
            encrypted=encrypted,
            kms_key_id=kms_key_id,
            tags=self.tags(context, Role.CANVAS),
        )
        with self.cleanup_on_final_failure(
            context, "attaching the canvas", lambda: hook.delete_volumes(build)
        ):
            volume, created = hook.ensure_volume(
                build, create_args=create_args, attempt=context["ti"].try_number
            )
            volume_id = volume["VolumeId"]
            self.log.info("build %s: %s canvas %s", build, "created" if created else "reusing", volume_id)
            self.persist_link(VolumeLink, context, volume_id=volume_id)
            if volume.get("State") == "creating":
                hook.wait("volume_available", defaults.WAIT_VOLUME_AVAILABLE, VolumeIds=[volume_id])
            hook.attach_volume(volume_id, instance_id, device.group(0))
            hook.wait("volume_in_use", defaults.WAIT_VOLUME_IN_USE, VolumeIds=[volume_id])
        self.log.info(
            "build %s: canvas %s attached to %s at %s", build, volume_id, instance_id, device.group(0)
        )
        return {"volume_id": volume_id, "device_name": device.group(0), "size_gib": size}


class DeleteCanvas(AmibakeOperator):
    """Teardown: detach (if still attached) and delete this build's canvas volume(s), found by tags.

    XCom: ``{"deleted": [...]}``.
    """

    ui_color = "#e8b3b3"

    def execute(self, context: Context) -> dict[str, list[str]]:
        """Detach, wait until available, delete."""
        build = self.build_of(context)
        deleted = self.hook.delete_volumes(build)
        self.log.info("build %s: deleted canvas volumes %s", build, deleted)
        return {"deleted": deleted}
