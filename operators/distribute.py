"""``DistributeAmi``: copy the verified AMI to other regions, and share it and its copies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from operators import defaults
from operators.base import AmibakeOperator
from operators.rules import definition, lifecycle, naming
from operators.rules.definition import Distribution, RegionCopy
from operators.rules.naming import Role
from operators.rules.validation import AMI_ID_RE, ParamError, require_id
from operators.triggers.ec2 import ImageAvailableTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

#: What an empty distribution returns (and the shape of every result).
NOTHING = {"copies": {}, "shared_with": []}
#: A copy in one of these states is not waited for any more (``failed``: CopyImage gave up).
SETTLED = ("available", "failed", "error", "invalid", "deregistered", "disabled")


def copy_tags(
    source: dict[str, Any], source_region: str, *, dag_id: str, run_id: str
) -> list[dict[str, str]]:
    """The tags of a copy: the source's ``Name`` and ``amibake:*`` tags (the ones amibake finds and
    rotates by; the IAM policy lets CopyImage set no others), not its ``amibake:snapshot-id`` (a
    snapshot of the source's region), plus the source AMI and its region.

    The DAG run and creation time are the copying run's, not the source's: the sweeper of the
    copy's region judges a copy by them, so a copy made tonight of a month-old AMI is tonight's and
    is left alone while the run that made it is still running."""
    tags = {
        key: value
        for key, value in naming.tags_to_dict(source.get("Tags")).items()
        if (key == "Name" or key.startswith("amibake:")) and key != naming.TAG_SNAPSHOT_ID
    }
    tags[naming.TAG_DAG_ID] = dag_id
    tags[naming.TAG_RUN_ID] = run_id
    tags[naming.TAG_CREATED_AT] = naming.utc_now_iso()
    tags[naming.TAG_SOURCE_AMI] = source["ImageId"]
    tags[naming.TAG_SOURCE_REGION] = source_region
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def copy_image_args(
    *, source: dict[str, Any], source_region: str, copy: RegionCopy, token: str, dag_id: str, run_id: str
) -> dict[str, Any]:
    """The exact CopyImage parameters of one copy (sent to the target region's endpoint).

    Tags go in ``TagSpecifications`` (the copy and its new snapshots get them at creation, so a
    rerun finds the copy even after a lost answer) rather than ``CopyImageTags``, which would carry
    every user tag and none to the snapshots. ``Encrypted`` + ``KmsKeyId`` only with a key: without
    one, an encrypted source stays encrypted with the region's default key, as AWS does.
    """
    tags = copy_tags(source, source_region, dag_id=dag_id, run_id=run_id)
    snapshot_tags = [
        {"Key": t["Key"], "Value": Role.SNAPSHOT.value} if t["Key"] == naming.TAG_ROLE else t for t in tags
    ]
    args: dict[str, Any] = {
        "SourceImageId": source["ImageId"],
        "SourceRegion": source_region,
        "Name": source["Name"],
        "Description": source.get("Description") or f"amibake copy of {source['ImageId']} ({source_region})",
        "ClientToken": token,
        "TagSpecifications": [
            naming.tag_specification("image", tags),
            naming.tag_specification("snapshot", snapshot_tags),
        ],
    }
    if copy.kms_key_id:
        args.update(Encrypted=True, KmsKeyId=copy.kms_key_id)
    return args


def missing_permissions(current: list[dict[str, str]], wanted: list[dict[str, str]]) -> list[dict[str, str]]:
    """The launch permissions of ``wanted`` an AMI does not have yet, in ``wanted``'s order."""
    have = {tuple(sorted(p.items())) for p in current}
    return [p for p in wanted if tuple(sorted(p.items())) not in have]


def snapshots_of(image: dict[str, Any]) -> list[str]:
    """The EBS snapshots an AMI's block device mappings name."""
    found = [m.get("Ebs", {}).get("SnapshotId", "") for m in image.get("BlockDeviceMappings") or []]
    return [s for s in found if s]


class DistributeAmi(AmibakeOperator):
    """Copy the verified AMI to the definition's regions and share it and its copies.

    Only an available AMI tagged ``amibake:verified=true`` (read from EC2) is distributed. For each
    region of ``distribution`` (never this connection's own): the copy made by an earlier
    try or run is found by its ``amibake:source-ami`` tag, else CopyImage makes it (same name, the
    source's amibake tags, encrypted with the region's ``kms_key_id`` if given). A failed copy found
    when the task starts is deregistered and copied again. Then every copy is waited for: deferred
    on the first one still pending (``ImageAvailableTrigger`` in its region); on resume every region
    is looked at again, so one trigger at a time covers them all (a region whose CopyImage failed is
    tried once more, and finds by tag a copy a lost answer was about). Once every copy is available
    or failed, the source and each available copy get the launch permissions they miss (accounts,
    organizations, OUs) and their snapshots ``createVolumePermission`` for the accounts.

    A region that fails does not stop or undo the others: the task fails at the end naming each
    failed region and why, and a retry or the next run finishes the job (all steps are idempotent).
    An empty ``distribution`` does nothing, with no EC2 call. XCom:
    ``{"copies": {region: ami_id}, "shared_with": [account or ARN, ...]}``.

    :param ami_id: the verified AMI (in this connection's region); '' = none yet: the task is skipped.
    :param distribution: the definition's ``distribution`` (``Distribution.as_dict()``), checked again.
    """

    template_fields: Sequence[str] = (*AmibakeOperator.template_fields, "ami_id", "distribution")
    ui_color = "#cfe2f3"

    def __init__(
        self,
        *,
        ami_id: str,
        distribution: Any = None,
        deferrable: bool = True,
        waiter_delay: int = defaults.WAIT_IMAGE_AVAILABLE[0],
        waiter_max_attempts: int = defaults.WAIT_IMAGE_AVAILABLE[1],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ami_id = ami_id
        self.distribution = distribution
        self.deferrable = deferrable
        self.waiter_delay = waiter_delay
        self.waiter_max_attempts = waiter_max_attempts

    def user_given_ids(self) -> dict[str, str]:
        """None: ``ami_id`` is this run's own AMI, so a ``NotFound`` of it is eventual consistency."""
        return {}

    # -- steps -----------------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        """Check the arguments, make the missing copies, wait for them, share, report."""
        try:
            wanted = definition.distribution_of(self.distribution)
        except definition.DefinitionError as exc:
            raise ParamError(exc.field, exc.problem) from None
        if not wanted:
            self.log.info("no distribution configured")
            return dict(NOTHING)
        if not self.ami_id:  # the DAG passes the newest verified AMI of the line: there is none yet
            raise AirflowSkipException("no verified AMI of this image line yet: nothing to distribute")
        return self._distribute(context, wanted, resumed=False, gave_up={})

    def execute_copied(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """A copy is available (or its wait failed): look at every region again."""
        gave_up = dict(event.get("gave_up") or {})
        if event.get("status") != "success":
            gave_up[event.get("image_id", "")] = f"did not become available: {event.get('message')}"
        wanted = definition.distribution_of(self.distribution)
        return self._distribute(context, wanted, resumed=True, gave_up=gave_up)

    def _distribute(
        self, context: Context, wanted: Distribution, *, resumed: bool, gave_up: dict[str, str]
    ) -> dict[str, Any]:
        """Make the missing copies (a failed region is noted, the others go on), wait for the first
        pending one, and once none is pending share and report."""
        ami_id = require_id("ami_id", self.ami_id, AMI_ID_RE, "an AMI id (ami-...)")
        home = self.hook.conn_region_name or ""
        for i, target in enumerate(wanted.regions):
            if target.region == home:
                raise ParamError(
                    f"distribution.regions[{i}].region",
                    f"{home} is the build's own region: the AMI is there already (list other regions)",
                )
        source = self.hook.describe_image(ami_id)
        if source.get("State") != "available":
            raise AirflowException(f"AMI {ami_id} is {source.get('State')!r}, not available: nothing to copy")
        if not lifecycle.is_verified(source):
            raise AirflowException(
                f"AMI {ami_id} is not verified (no {naming.TAG_VERIFIED}={naming.VERIFIED} tag: its smoke "
                "check failed or did not run): an unverified AMI is neither copied nor shared"
            )
        copies: dict[str, dict[str, Any]] = {}
        failures: dict[str, str] = {}
        for target in wanted.regions:
            try:
                copies[target.region] = self._ensure_copy(context, source, home, target, resumed=resumed)
            except Exception as exc:  # one region's failure must not stop the others
                failures[target.region] = _why(exc)
                self.log.error("copy of %s to %s failed: %s", ami_id, target.region, failures[target.region])
        for region, copy in copies.items():
            image_id, state = copy["ImageId"], copy.get("State", "")
            if state in SETTLED and state != "available":
                reason = (copy.get("StateReason") or {}).get("Message", "no reason given")
                failures[region] = f"copy {image_id} is {state}: {reason}"
            elif image_id in gave_up:
                failures[region] = f"copy {image_id} {gave_up[image_id]}"
            elif state != "available":
                return self._wait_for(context, region, image_id, gave_up)
        available = {r: c for r, c in copies.items() if r not in failures}
        shared = self._share(source, home, available, wanted, failures)
        result = {"copies": {r: c["ImageId"] for r, c in available.items()}, "shared_with": shared}
        if failures:
            raise AirflowException(
                f"distribution of {ami_id} failed in {len(failures)} region(s) (the others are done, a "
                "retry or the next run finishes the job): "
                + "; ".join(f"{region}: {why}" for region, why in sorted(failures.items()))
            )
        self.log.info("AMI %s: copies %s, shared with %s", ami_id, result["copies"], shared or "nobody")
        return result

    def _ensure_copy(
        self, context: Context, source: dict[str, Any], home: str, target: RegionCopy, *, resumed: bool
    ) -> dict[str, Any]:
        """The copy of ``source`` in ``target``'s region: the one found by tag, else a new one."""
        hook = self.hook_in(target.region)
        found = hook.find_copies(source["ImageId"])
        live = [img for img in found if img.get("State") not in SETTLED or img.get("State") == "available"]
        if live:
            copy = live[0]
            self.log.info("%s: copy %s exists (%s)", target.region, copy["ImageId"], copy.get("State"))
            return copy
        if found and resumed:  # failed within this try: reported, copied again by the next try
            return found[0]
        for failed in found:
            self.log.warning("%s: copy %s is %s; deregistering it to copy again", target.region,
                             failed["ImageId"], failed.get("State"))  # fmt: skip
            hook.deregister_image(failed["ImageId"])
        token = f"amibake-copy-{source['ImageId']}-{target.region}-{context['ti'].try_number}"
        args = copy_image_args(
            source=source,
            source_region=home,
            copy=target,
            token=token,
            dag_id=context["dag"].dag_id,
            run_id=context["run_id"],
        )
        image_id = hook.copy_image(args)
        self.log.info("%s: copying %s to %s%s", target.region, source["ImageId"], image_id,
                      f" (encrypted with {target.kms_key_id})" if target.kms_key_id else "")  # fmt: skip
        return {"ImageId": image_id, "State": "pending"}

    def _wait_for(self, context: Context, region: str, image_id: str, gave_up: dict[str, str]) -> Any:
        """Resume ``execute_copied`` once the copy ``image_id`` in ``region`` is available."""
        hook = self.hook_in(region)
        return self.defer_or_wait(
            context,
            done=lambda: hook.image_state(image_id) == "available",
            trigger=ImageAvailableTrigger(
                image_id=image_id,
                waiter_delay=self.waiter_delay,
                waiter_max_attempts=self.waiter_max_attempts,
                **self.trigger_kwargs(region),
            ),
            method_name="execute_copied",
            wait=lambda: hook.wait(
                "image_available", (self.waiter_delay, self.waiter_max_attempts), ImageIds=[image_id]
            ),
            event={"image_id": image_id, "region": region, "gave_up": gave_up},
        )

    def _share(
        self,
        source: dict[str, Any],
        home: str,
        copies: dict[str, dict[str, Any]],
        wanted: Distribution,
        failures: dict[str, str],
    ) -> list[str]:
        """Give the source and each copy the launch permissions it misses, and the accounts
        ``createVolumePermission`` on their snapshots; a region that fails is noted in ``failures``."""
        if not wanted.shared_with:
            return []
        for target in wanted.regions:
            if target.kms_key_id and target.region in copies:
                self.log.warning(
                    "%s: the copy is encrypted with %s: the accounts, organizations and OUs it is shared "
                    "with can launch it only if that key's policy lets them use the key (amibake changes "
                    "no key policy)",
                    target.region,
                    target.kms_key_id,
                )
        images = [(home, self.hook, source["ImageId"])]
        images += [(region, self.hook_in(region), copy["ImageId"]) for region, copy in copies.items()]
        for region, hook, image_id in images:
            try:
                missing = missing_permissions(hook.launch_permissions(image_id), wanted.launch_permissions())
                if missing:
                    self.log.info("%s: %s may now be launched by %s", region, image_id,
                                  ", ".join(next(iter(p.values())) for p in missing))  # fmt: skip
                    hook.add_launch_permissions(image_id, missing)
                if wanted.accounts:
                    for snapshot_id in snapshots_of(hook.describe_image(image_id)):
                        have = hook.volume_permissions(snapshot_id)
                        lacking = [a for a in wanted.accounts if a not in have]
                        if lacking:
                            hook.add_volume_permissions(snapshot_id, lacking)
            except Exception as exc:
                failures[region] = f"sharing {image_id}: {_why(exc)}"
                self.log.error("%s: sharing %s failed: %s", region, image_id, failures[region])
        return list(wanted.shared_with)


def _why(exc: Exception) -> str:
    """One line saying why a call failed."""
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")
