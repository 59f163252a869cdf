"""``RegisterHVMAmi``: register the snapshot as an HVM AMI and announce it as an Airflow Asset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, AssetAlias
from airflow.sdk.exceptions import AirflowException

from operators import defaults, metrics
from operators.base import AmibakeOperator
from operators.links.ec2 import AmiLink
from operators.rules import naming, records, validation
from operators.rules.lifecycle import snapshots_used_by
from operators.rules.naming import Role, tag_specification
from operators.triggers.ec2 import ImageAvailableTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context


def register_image_args(
    *, name: str, snapshot_id: str, size_gib: int, description: str, tags: list[dict[str, str]]
) -> dict[str, Any]:
    """The exact RegisterImage parameters of an amibake AMI."""
    return {
        "Name": name,
        "Description": description,
        "Architecture": defaults.ARCHITECTURE,
        "VirtualizationType": "hvm",
        "RootDeviceName": defaults.ROOT_DEVICE_NAME,
        "BlockDeviceMappings": [
            {
                "DeviceName": defaults.ROOT_DEVICE_NAME,
                "Ebs": {
                    "SnapshotId": snapshot_id,
                    "VolumeSize": size_gib,
                    "VolumeType": defaults.ROOT_VOLUME_TYPE,
                    "DeleteOnTermination": True,
                },
            }
        ],
        "EnaSupport": True,
        "SriovNetSupport": defaults.SRIOV_NET_SUPPORT,
        "BootMode": defaults.BOOT_MODE,
        "ImdsSupport": defaults.IMDS_SUPPORT,
        "TagSpecifications": [tag_specification("image", tags)],
    }


class RegisterHVMAmi(AmibakeOperator):
    """RegisterImage from the snapshot (HVM, gp3 root, ENA, SR-IOV, BIOS, IMDSv2); wait until available.

    The name is prefix + UTC date/time of the run + build id (:func:`operators.rules.naming.ami_name`).
    An AMI this build already registered (found by tag or by name) is reused. When available, an
    asset event for ``amibake://ami/<image>`` is emitted through the ``amibake-ami`` alias, with
    ``{"ami_id", "ami_name", "snapshot_id", "recipe", "image", "region"}`` in its extra.
    XCom: ``{"ami_id", "ami_name", "snapshot_id"}``.

    :param snapshot: ``FrozenSnapshot``'s XCom.
    :param size_gib: root volume size of the AMI (the canvas size).
    :param image: the image definition's name ('' = the recipe's name).
    :param ami_name_prefix: prefix of the AMI name ('' = ``amibake-<image>``).
    :param inputs: ``FingerprintInputs``' XCom: its fingerprint is tagged on the AMI, so the next night
        with the same inputs builds nothing (``amibake:fingerprint``, ``amibake:inputs``).
    """

    template_fields: Sequence[str] = (
        *AmibakeOperator.template_fields,
        "snapshot",
        "size_gib",
        "image",
        "ami_name_prefix",
        "inputs",
    )
    operator_extra_links = (AmiLink(),)
    ui_color = "#fbe7a1"

    def __init__(
        self,
        *,
        snapshot: Any,
        size_gib: Any,
        image: str = "",
        ami_name_prefix: str = "",
        inputs: Any = None,
        deferrable: bool = True,
        waiter_delay: int = defaults.WAIT_IMAGE_AVAILABLE[0],
        waiter_max_attempts: int = defaults.WAIT_IMAGE_AVAILABLE[1],
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("outlets", [AssetAlias(defaults.ASSET_ALIAS)])
        super().__init__(**kwargs)
        self.snapshot = snapshot
        self.size_gib = size_gib
        self.image = image
        self.ami_name_prefix = ami_name_prefix
        self.inputs = inputs
        self.deferrable = deferrable
        self.waiter_delay = waiter_delay
        self.waiter_max_attempts = waiter_max_attempts

    def execute(self, context: Context) -> dict[str, str]:
        """Validate, reuse or register the AMI, then wait until available."""
        snapshot_id = records.check("snapshot", self.snapshot)["snapshot_id"]
        size = validation.validate_size(self.size_gib, "size_gib")
        prefix = validation.validate_ami_prefix(self.ami_name_prefix or "", self.image or self.recipe)
        build = self.build_of(context)
        name = naming.ami_name(prefix, context["dag_run"].run_after, build)
        hook = self.hook
        existing = hook.find_images(build, name)
        tags = [
            *self.tags(context, Role.AMI),
            {"Key": naming.TAG_SNAPSHOT_ID, "Value": snapshot_id},
            {"Key": naming.TAG_IMAGE_LINE, "Value": prefix},
        ]
        if self.inputs is not None:
            inputs = records.check("inputs", self.inputs)
            tags += [
                {"Key": naming.TAG_FINGERPRINT, "Value": inputs["fingerprint"]},
                {"Key": naming.TAG_INPUTS, "Value": inputs["inputs"]},
            ]
        if existing:
            image_id = existing[0]["ImageId"]
            if snapshot_id not in snapshots_used_by(existing[0]):
                raise AirflowException(
                    f"AMI {image_id} named {name!r} was registered from another snapshot than {snapshot_id}; "
                    "deregister it (or let the sweeper) before registering this build again"
                )
            self.log.info("build %s: reusing AMI %s (%s) from an earlier try", build, image_id, name)
        else:
            args = register_image_args(
                name=name,
                snapshot_id=snapshot_id,
                size_gib=size,
                description=f"amibake {self.recipe} image, build {build}, run {context['run_id']}",
                tags=tags,
            )
            image_id = hook.register_image(args)
            metrics.count(self.image or self.recipe, "ami.created")
            self.log.info("build %s: registered AMI %s (%s)", build, image_id, name)
        self.persist_link(AmiLink, context, image_id=image_id)
        return self.defer_or_wait(
            context,
            done=lambda: hook.image_state(image_id) == "available",
            trigger=ImageAvailableTrigger(
                image_id=image_id,
                waiter_delay=self.waiter_delay,
                waiter_max_attempts=self.waiter_max_attempts,
                **self.trigger_kwargs(),
            ),
            method_name="execute_complete",
            event={"image_id": image_id},
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> records.Ami:
        """The AMI is available: emit the asset event and return its id (or fail with the reason)."""
        image_id = event.get("image_id", "")
        if event.get("status") != "success":
            raise AirflowException(f"AMI {image_id} did not become available: {event.get('message')}")
        image = self.hook.describe_image(image_id)
        result: records.Ami = {
            "ami_id": image_id,
            "ami_name": image["Name"],
            "snapshot_id": naming.tags_to_dict(image.get("Tags")).get(naming.TAG_SNAPSHOT_ID, ""),
        }
        region = self.hook.conn_region_name
        image = self.image or self.recipe
        context["outlet_events"][AssetAlias(defaults.ASSET_ALIAS)].add(
            Asset(uri=defaults.asset_uri(image), name=f"amibake-ami-{image}"),
            extra={**result, "recipe": self.recipe, "image": image, "region": region or ""},
        )
        self.log.info("AMI %s (%s) is available", result["ami_id"], result["ami_name"])
        return result
