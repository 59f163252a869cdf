"""What the sweeper removes and what AMI rotation retires: pure decisions, no AWS calls.

Input is what EC2's Describe* calls return (dicts with ``Tags``, ``State``, times ...); output is
an ordered plan of actions, each with a reason a human can check. Keeping the rules here, free of
Airflow and boto, lets every rule be tested on its own and keeps the operators thin.

Sweeper rules (``plan_sweep``):
- only resources carrying ``naming.TAG_BUILD_ID``; nothing of a build that is still active;
  nothing younger than ``max_age`` (``amibake:created-at`` tag, else the EC2 timestamp);
- instances are terminated; volumes detached (only from one of our instances that is going away)
  and deleted; security groups deleted; AMIs only when left half-registered (``pending`` past
  the age, or ``failed``/``error``/``invalid``): an ``available`` AMI is rotation's business and
  never swept, so AMIs kept by retention are safe by construction;
- a snapshot only when no AMI that stays uses it (block device mapping or the
  ``amibake:snapshot-id`` tag of any AMI of the account, ours or not).

Rotation policy (``plan_rotation``), per image line (recipe + AMI name prefix: the
``amibake:image-line`` tag, else the prefix of the amibake AMI name), over ``available`` AMIs with
our tags, newest first by ``CreationDate``. Only VERIFIED AMIs (``amibake:verified=true``: a smoke
instance of it passed every first-boot check) count as good:
- nothing at all unless the newest available AMI of the line is the one this run produced, and it
  is verified (an unverified new AMI is refused: rotating on it could retire the last good one);
- the first ``keep`` (N >= 1) verified AMIs stay untouched, so the last verified AMI is never
  deregistered;
- the next ``grace`` (M >= 0) verified ones are deprecated (``deprecate_at`` = the next whole
  minute) but stay registered, so a rollback to them is still possible;
- the rest are deregistered and their snapshots (ours, not used by any remaining AMI) deleted;
- an UNVERIFIED AMI (its smoke check failed or was off, or it predates the check) never counts
  toward ``keep`` nor takes a verified one's place; every one is older than the new verified AMI
  (which is the newest), so it is deprecated now, and deregistered (with its snapshots) once
  ``keep + grace`` verified AMIs are newer than it: it goes when a verified AMI of its age would;
- AMIs of other lines (a test prefix, a manual build) are never counted nor touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from operators.rules import naming

#: Image states that mean "registration never completed".
HALF_REGISTERED_STATES = frozenset({"failed", "error", "invalid"})
#: Instance states that need no action (already gone or going).
INSTANCE_GONE_STATES = frozenset({"terminated", "shutting-down"})
#: Volume states that need no action.
VOLUME_GONE_STATES = frozenset({"deleting", "deleted"})
#: Snapshot states that need no action.
SNAPSHOT_GONE_STATES = frozenset({"recoverable", "recovering"})

#: Deletion order of the sweeper: what holds a resource goes before it.
KIND_ORDER = ("instance", "volume", "security-group", "image", "snapshot")


class RotationRefused(Exception):
    """Rotation must not run; ``superseded`` is True when a newer AMI exists (not an error)."""

    def __init__(self, message: str, *, superseded: bool = False) -> None:
        super().__init__(message)
        self.superseded = superseded


@dataclass(frozen=True)
class Action:
    """One thing to do to one resource, and why."""

    kind: str
    resource_id: str
    action: str
    reason: str
    build_id: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form, for XCom and logs."""
        return {
            "kind": self.kind,
            "id": self.resource_id,
            "action": self.action,
            "reason": self.reason,
            "build_id": self.build_id,
            **({"detail": dict(self.detail)} if self.detail else {}),
        }


@dataclass
class Inventory:
    """Described resources. ``images`` should hold every AMI of the account (ours or not),
    so a snapshot used by any of them is protected; the other lists may be pre-filtered by tag."""

    instances: list[dict] = field(default_factory=list)
    volumes: list[dict] = field(default_factory=list)
    security_groups: list[dict] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    snapshots: list[dict] = field(default_factory=list)


@dataclass
class SweepPlan:
    """What the sweeper removes (in deletion order) and which tagged resources it keeps, with reasons."""

    remove: list[Action]
    keep: list[Action]


@dataclass
class RotationPlan:
    """Rotation of one image line: kept AMI ids, deprecations, deregistrations, snapshot deletions."""

    kept: list[str]
    deprecate: list[Action]
    deregister: list[Action]
    delete_snapshots: list[Action]

    def actions(self) -> list[Action]:
        """All actions in the order they must run."""
        return [*self.deprecate, *self.deregister, *self.delete_snapshots]


def tags_of(resource: Mapping[str, Any]) -> dict[str, str]:
    """A resource's tags as a dict (EC2 omits ``Tags`` when there are none)."""
    return naming.tags_to_dict(resource.get("Tags"))


def is_ours(resource: Mapping[str, Any]) -> bool:
    """True only for resources amibake tagged with a build id."""
    return bool(tags_of(resource).get(naming.TAG_BUILD_ID))


def parse_time(value: Any) -> datetime | None:
    """A timestamp from a tag (ISO string) or from boto3 (datetime), as aware UTC; None if unusable."""
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str) and value:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def created_at(resource: Mapping[str, Any]) -> datetime | None:
    """When a resource was made: our tag first, then EC2's own timestamp for its kind."""
    for value in (
        tags_of(resource).get(naming.TAG_CREATED_AT),
        resource.get("LaunchTime"),
        resource.get("CreateTime"),
        resource.get("StartTime"),
        resource.get("CreationDate"),
    ):
        when = parse_time(value)
        if when is not None:
            return when
    return None


def snapshots_used_by(image: Mapping[str, Any]) -> set[str]:
    """Snapshot ids an AMI depends on: its block device mappings and our snapshot-id tag."""
    used = {
        m["Ebs"]["SnapshotId"]
        for m in image.get("BlockDeviceMappings") or []
        if m.get("Ebs", {}).get("SnapshotId")
    }
    tagged = tags_of(image).get(naming.TAG_SNAPSHOT_ID)
    if tagged:
        used.add(tagged)
    return used


def run_refs(inventory: Inventory) -> dict[str, set[tuple[str, str]]]:
    """Build id -> every (dag id, run id) its resources name, so the caller can ask Airflow which
    runs are active. A build's own resources name its run; a copy of its AMI in another region names
    the run that made the copy (``operators.distribute.copy_tags``): the build is active while any is."""
    refs: dict[str, set[tuple[str, str]]] = {}
    for resource in _all_resources(inventory):
        tags = tags_of(resource)
        build = tags.get(naming.TAG_BUILD_ID)
        dag_id, run_id = tags.get(naming.TAG_DAG_ID), tags.get(naming.TAG_RUN_ID)
        if build and dag_id and run_id:
            refs.setdefault(build, set()).add((dag_id, run_id))
    return refs


def plan_sweep(
    inventory: Inventory, *, active_builds: Iterable[str], now: datetime, max_age: timedelta
) -> SweepPlan:
    """Decide what the sweeper removes; see the module docstring for the rules."""
    if max_age < timedelta(0):
        raise ValueError(f"max_age must not be negative, got {max_age}")
    now = _aware(now)
    active = set(active_builds)
    remove: list[Action] = []
    keep: list[Action] = []

    def eligible(kind: str, rid: str, resource: Mapping[str, Any]) -> str | None:
        """The build id if the resource may be swept, else None (and the reason goes to ``keep``)."""
        build = tags_of(resource).get(naming.TAG_BUILD_ID, "")
        if build in active:
            keep.append(Action(kind, rid, "keep", "its build is still running", build))
            return None
        when = created_at(resource)
        if when is None:
            keep.append(Action(kind, rid, "keep", "no creation time: age unknown", build))
            return None
        age = now - when
        if age < max_age:
            keep.append(Action(kind, rid, "keep", f"younger than {_hours(max_age)} ({_hours(age)})", build))
            return None
        return build

    def old(resource: Mapping[str, Any]) -> str:
        return f"build not running, {_hours(now - created_at(resource))} old"  # type: ignore[operator]

    terminating: set[str] = set()
    ours_instances: dict[str, dict] = {}
    for inst in inventory.instances:
        if not is_ours(inst):
            continue
        iid = inst["InstanceId"]
        ours_instances[iid] = inst
        if inst.get("State", {}).get("Name") in INSTANCE_GONE_STATES:
            continue
        build = eligible("instance", iid, inst)
        if build is not None:
            terminating.add(iid)
            remove.append(Action("instance", iid, "terminate", old(inst), build))

    for vol in inventory.volumes:
        if not is_ours(vol) or vol.get("State") in VOLUME_GONE_STATES:
            continue
        vid = vol["VolumeId"]
        build = eligible("volume", vid, vol)
        if build is None:
            continue
        attached = [a["InstanceId"] for a in vol.get("Attachments") or [] if a.get("State") != "detached"]
        foreign = [
            i
            for i in attached
            if i not in terminating
            and ours_instances.get(i, {}).get("State", {}).get("Name") not in INSTANCE_GONE_STATES
        ]
        if foreign:
            keep.append(
                Action("volume", vid, "keep", f"attached to {foreign[0]}, which is not being removed", build)
            )
            continue
        detail = {"detach_from": attached[0]} if attached else {}
        remove.append(Action("volume", vid, "delete", old(vol), build, detail))

    for sg in inventory.security_groups:
        if not is_ours(sg):
            continue
        build = eligible("security-group", sg["GroupId"], sg)
        if build is not None:
            remove.append(Action("security-group", sg["GroupId"], "delete", old(sg), build))

    deregistering: set[str] = set()
    for img in inventory.images:
        if not is_ours(img):
            continue
        iid, state = img["ImageId"], img.get("State", "")
        if state != "pending" and state not in HALF_REGISTERED_STATES:
            continue
        build = eligible("image", iid, img)
        if build is not None:
            deregistering.add(iid)
            why = "registration failed" if state != "pending" else "still pending"
            remove.append(Action("image", iid, "deregister", f"{why}; {old(img)}", build))

    in_use: dict[str, str] = {}
    for img in inventory.images:
        if img["ImageId"] not in deregistering and img.get("State") != "deregistered":
            for sid in snapshots_used_by(img):
                in_use.setdefault(sid, img["ImageId"])
    for snap in inventory.snapshots:
        if not is_ours(snap) or snap.get("State") in SNAPSHOT_GONE_STATES:
            continue
        sid = snap["SnapshotId"]
        if sid in in_use:
            build = tags_of(snap).get(naming.TAG_BUILD_ID, "")
            keep.append(Action("snapshot", sid, "keep", f"used by {in_use[sid]}", build))
            continue
        build = eligible("snapshot", sid, snap)
        if build is not None:
            remove.append(Action("snapshot", sid, "delete", f"used by no AMI; {old(snap)}", build))

    remove.sort(key=lambda a: KIND_ORDER.index(a.kind))
    return SweepPlan(remove=remove, keep=keep)


def plan_rotation(
    images: Iterable[Mapping[str, Any]],
    snapshots: Iterable[Mapping[str, Any]],
    *,
    recipe: str,
    new_image_id: str,
    keep: int,
    grace: int,
    now: datetime,
) -> RotationPlan:
    """Decide the rotation of ``new_image_id``'s image line after it was registered.

    Only AMIs of the same recipe AND image line (the AMI name prefix, :func:`line_of`) are
    counted, kept, deprecated or deregistered: a test or manual line never pushes production AMIs
    out, nor the reverse.

    ``images`` should be every AMI of the account (so snapshots another AMI uses stay);
    ``snapshots`` the snapshots that may be deleted (only those with our tags are ever chosen).
    Raises ``RotationRefused`` when rotating now could lose the last good AMI.
    """
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise RotationRefused(f"keep must be an integer >= 1 (never remove the last good AMI), got {keep!r}")
    if not isinstance(grace, int) or isinstance(grace, bool) or grace < 0:
        raise RotationRefused(f"grace must be an integer >= 0, got {grace!r}")
    images = list(images)
    now = _aware(now)
    new = next((i for i in images if i.get("ImageId") == new_image_id), None)
    if new is None:
        raise RotationRefused(f"new_image_id {new_image_id!r} does not exist: nothing is rotated")
    if new.get("State") != "available":
        raise RotationRefused(f"new_image_id {new_image_id} is {new.get('State')!r}, not available")
    if not is_ours(new) or tags_of(new).get(naming.TAG_RECIPE) != recipe:
        raise RotationRefused(f"new_image_id {new_image_id} is not an amibake AMI of recipe {recipe!r}")
    line = line_of(new)
    if not line:
        raise RotationRefused(f"new_image_id {new_image_id} belongs to no image line: nothing is rotated")

    candidates = sorted(
        (
            i
            for i in images
            if i.get("State") == "available"
            and is_ours(i)
            and tags_of(i).get(naming.TAG_RECIPE) == recipe
            and line_of(i) == line
        ),
        key=_newest_first,
    )
    if candidates[0]["ImageId"] != new_image_id:
        raise RotationRefused(
            f"{candidates[0]['ImageId']} is newer than new_image_id {new_image_id}: "
            "its own run rotates, this one leaves every AMI as it is",
            superseded=True,
        )
    if not is_verified(new):
        raise RotationRefused(
            f"new_image_id {new_image_id} is not verified (no {naming.TAG_VERIFIED}={naming.VERIFIED} "
            "tag: its smoke check failed or did not run): only a verified AMI may push older ones out; "
            "every AMI stays as it is"
        )

    verified = [i for i in candidates if is_verified(i)]
    kept = [i["ImageId"] for i in verified[:keep]]
    deprecate_at = _next_minute(now)
    deprecate: list[Action] = []
    leaving: list[Mapping[str, Any]] = []
    deregister: list[Action] = []

    def retire(img: Mapping[str, Any], deregistered: bool, reason: str) -> None:
        build = tags_of(img)[naming.TAG_BUILD_ID]
        if deregistered:
            leaving.append(img)
            deregister.append(Action("image", img["ImageId"], "deregister", reason, build))
            return
        current = parse_time(img.get("DeprecationTime"))
        if current is None or current > deprecate_at:
            detail = {"deprecate_at": deprecate_at.isoformat()}
            deprecate.append(Action("image", img["ImageId"], "deprecate", reason, build, detail))

    for rank, img in enumerate(verified[keep:], start=keep + 1):
        within = rank <= keep + grace
        where = f"within grace={grace}" if within else f"beyond keep={keep} + grace={grace}"
        retire(img, not within, f"number {rank} of the verified AMIs of image line {line}: {where}")
    for img in candidates:
        if is_verified(img):
            continue
        newer = sum(1 for v in verified if _newest_first(v) < _newest_first(img))
        gone = newer >= keep + grace
        retire(
            img,
            gone,
            f"unverified AMI of image line {line}, older than the new verified {new_image_id}, with {newer} "
            f"verified AMI(s) newer than it ({'>=' if gone else '<'} keep={keep} + grace={grace})",
        )
    order = {i["ImageId"]: n for n, i in enumerate(candidates)}  # every list newest first
    deprecate.sort(key=lambda a: order[a.resource_id])
    leaving.sort(key=lambda i: order[i["ImageId"]])
    deregister.sort(key=lambda a: order[a.resource_id])
    delete_snapshots = _snapshots_left(images, snapshots, leaving, "deregistered")
    return RotationPlan(
        kept=kept, deprecate=deprecate, deregister=deregister, delete_snapshots=delete_snapshots
    )


def _snapshots_left(
    images: list[Mapping[str, Any]],
    snapshots: Iterable[Mapping[str, Any]],
    leaving: list[Mapping[str, Any]],
    what: str,
) -> list[Action]:
    """Deletions of our snapshots of the ``leaving`` AMIs that no other AMI of ``images`` uses."""
    leaving_ids = {i["ImageId"] for i in leaving}
    still_used = {
        sid
        for i in images
        if i.get("ImageId") not in leaving_ids and i.get("State") != "deregistered"
        for sid in snapshots_used_by(i)
    }
    ours = {s["SnapshotId"]: s for s in snapshots if is_ours(s)}
    delete_snapshots: list[Action] = []
    for img in leaving:
        for sid in sorted(snapshots_used_by(img)):
            if sid in ours and sid not in still_used:
                build = tags_of(ours[sid])[naming.TAG_BUILD_ID]
                delete_snapshots.append(
                    Action("snapshot", sid, "delete", f"snapshot of {what} {img['ImageId']}", build)
                )
                still_used.add(sid)
    return delete_snapshots


def plan_copy_rotation(
    plan: RotationPlan,
    *,
    home_region: str,
    home_images: Iterable[Mapping[str, Any]],
    images: Iterable[Mapping[str, Any]],
    snapshots: Iterable[Mapping[str, Any]],
    recipe: str,
    line: str,
) -> RotationPlan:
    """The rotation of one other region's copies (``operators.distribute``) that follows ``plan``.

    A copy is an AMI of ours carrying :data:`naming.TAG_SOURCE_AMI` and, as its source region,
    ``home_region``, of the same recipe and image line. It is deprecated when its source is (at the
    same time), and deregistered with its snapshots when its source is deregistered now or is gone
    from ``home_images`` already (every AMI of the home region: a copy a failed rotation left behind
    is caught up). ``images`` should be every AMI of the copy's region, so snapshots another AMI
    uses stay; ``snapshots`` the ones that may be deleted (ours only are ever chosen).
    """
    images = list(images)
    live_sources = {i.get("ImageId") for i in home_images if i.get("State") != "deregistered"}
    deprecating = {a.resource_id: a for a in plan.deprecate}
    deregistering = {a.resource_id for a in plan.deregister}
    copies = sorted(
        (
            i
            for i in images
            if i.get("State") != "deregistered"
            and is_ours(i)
            and tags_of(i).get(naming.TAG_SOURCE_REGION) == home_region
            and tags_of(i).get(naming.TAG_SOURCE_AMI)
            and tags_of(i).get(naming.TAG_RECIPE) == recipe
            and line_of(i) == line
        ),
        key=_newest_first,
    )
    deprecate: list[Action] = []
    deregister: list[Action] = []
    leaving: list[Mapping[str, Any]] = []
    for copy in copies:
        source, build = tags_of(copy)[naming.TAG_SOURCE_AMI], tags_of(copy)[naming.TAG_BUILD_ID]
        if source in deregistering or source not in live_sources:
            why = "is deregistered now" if source in deregistering else "is gone"
            leaving.append(copy)
            reason = f"copy of {source} ({home_region}), which {why}"
            deregister.append(Action("image", copy["ImageId"], "deregister", reason, build))
        elif source in deprecating:
            at = deprecating[source].detail["deprecate_at"]
            current = parse_time(copy.get("DeprecationTime"))
            if current is None or current > parse_time(at):
                reason = f"copy of {source} ({home_region}), which is deprecated now"
                detail = {"deprecate_at": at}
                deprecate.append(Action("image", copy["ImageId"], "deprecate", reason, build, detail))
    delete_snapshots = _snapshots_left(images, snapshots, leaving, "deregistered copy")
    return RotationPlan(
        kept=[], deprecate=deprecate, deregister=deregister, delete_snapshots=delete_snapshots
    )


def is_verified(image: Mapping[str, Any]) -> bool:
    """Whether a smoke instance of this AMI passed every first-boot check (``amibake:verified=true``)."""
    return tags_of(image).get(naming.TAG_VERIFIED) == naming.VERIFIED


def newest_verified(images: Iterable[Mapping[str, Any]], line: str) -> Mapping[str, Any] | None:
    """The newest available, verified amibake AMI of image ``line``: the last good one, if any."""
    good = [
        i
        for i in images
        if i.get("State") == "available" and is_ours(i) and is_verified(i) and line_of(i) == line
    ]
    return min(good, key=_newest_first) if good else None


def deprecate_now(now: datetime) -> datetime:
    """The earliest deprecation time EC2 accepts from ``now``: the next whole minute."""
    return _next_minute(_aware(now))


def line_of(image: Mapping[str, Any]) -> str:
    """The image line of an AMI (:func:`operators.rules.naming.image_line`): rotation's scope."""
    return naming.image_line(tags_of(image), image.get("Name", ""))


def _newest_first(image: Mapping[str, Any]) -> tuple:
    """Sort key: newest ``CreationDate`` first, then newest created-at tag, then id (stable)."""
    when = parse_time(image.get("CreationDate")) or datetime.min.replace(tzinfo=UTC)
    tagged = parse_time(tags_of(image).get(naming.TAG_CREATED_AT)) or when
    return (-when.timestamp(), -tagged.timestamp(), image["ImageId"])


def _all_resources(inventory: Inventory) -> Iterable[Mapping[str, Any]]:
    yield from inventory.instances
    yield from inventory.volumes
    yield from inventory.security_groups
    yield from inventory.images
    yield from inventory.snapshots


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


def _next_minute(now: datetime) -> datetime:
    """The next whole minute: EC2 rounds ``DeprecateAt`` to minutes and refuses the past."""
    return now.replace(second=0, microsecond=0) + timedelta(minutes=1)


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:.1f} h"
