"""AWS behaviours moto 5.2.5 lacks, as :class:`rehearsal.ec2_local.Extension` s of the local EC2 API.

Each class is one behaviour, named by it, and answers or rewrites calls the way EC2 does (error codes
from the EC2 API reference; see /work/shared/notes/moto.md for what moto does instead). They reach
into moto's in-process backend (``LocalEc2`` runs moto in its own process, also standalone) where moto
has no API for a state AWS has (a pending snapshot, a registered AMI's real mappings).
:func:`aws_rules` returns them in their order; every delay is a constructor argument with a small
default so the suite stays fast, and each rule forgets its state on ``reset()``.

Not modelled: per-resource rate limits (RunInstances' own bucket), AMIs in ``pending`` (but copies
are, :class:`CopyImageRules`), instances in
``pending`` / ``shutting-down`` (moto's states), KMS, cross-account snapshot permissions.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from xml.sax.saxutils import escape

from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends
from moto.ec2.models.amis import Ami
from moto.ec2.models.elastic_block_store import Snapshot

#: The account the local EC2 API plays (moto's default; the fake credentials map to it).
ACCOUNT_ID = DEFAULT_ACCOUNT_ID
EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
ET.register_namespace("", EC2_NS.rstrip("/"))

Answer = tuple[int, bytes]

#: Default delays, seconds: small, so the suite stays fast, yet longer than a client's next call.
CONSISTENCY_S = 0.3  # a new instance, volume or snapshot stays unknown
SNAPSHOT_S = 0.5  # a new snapshot stays pending
LINGER_S = 0.5  # a terminated instance's network interface keeps its security group
COPY_S = 0.5  # a copied AMI stays pending


# -- helpers ------------------------------------------------------------------------------------------
def aws_error(code: str, message: str, status: int = 400) -> Answer:
    """An EC2 error answer as botocore parses it."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"</Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
    )
    return status, body.encode()


def _ok(action: str, fields: dict[str, str]) -> Answer:
    """A successful EC2 answer with a few scalar fields (``return``, ``imageId`` ...)."""
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in fields.items())
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{action}Response xmlns="{EC2_NS}">'
        f"<requestId>{uuid.uuid4()}</requestId>{inner}</{action}Response>"
    )
    return 200, body.encode()


def numbered(params: dict[str, str], prefix: str) -> list[str]:
    """Values of a flattened list parameter: ``prefix.1``, ``prefix.2`` ... in order."""
    out, n = [], 1
    while f"{prefix}.{n}" in params:
        out.append(params[f"{prefix}.{n}"])
        n += 1
    return out


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(el: ET.Element, name: str) -> str:
    for child in el:
        if _local(child.tag) == name:
            return child.text or ""
    return ""


def _drop_items(body: bytes, set_name: str, drop: Callable[[ET.Element], bool]) -> bytes:
    """Remove the ``<item>`` s of every ``<set_name>`` for which ``drop`` is true (moto's XML answer)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return body
    changed = False
    for parent in root.iter():
        if _local(parent.tag) != set_name:
            continue
        for item in list(parent):
            if drop(item):
                parent.remove(item)
                changed = True
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) if changed else body


def backend(moto: Any) -> Any:
    """moto's EC2 backend (this process) of the region the ``moto`` client talks to."""
    return ec2_backends[ACCOUNT_ID][moto.meta.region_name]


def iso_time(at: datetime) -> str:
    """A time as EC2 writes it (``2026-11-30T12:00:00.000Z``)."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class Rule:
    """Base of the rules: no-op ``before`` / ``after`` / ``reset``."""

    def before(self, action: str, params: dict[str, str], moto: Any) -> Answer | None:
        """Answer the call here (an AWS error, or the whole answer) or let it go on (None)."""
        return None

    def after(self, action: str, params: dict[str, str], status: int, body: bytes, moto: Any) -> bytes:
        """Rewrite moto's answer (unchanged by default)."""
        return body

    def reset(self) -> None:
        """Forget every state (the local EC2 API was reset)."""


# -- 9. RequestLimitExceeded ------------------------------------------------------------------------------
class TokenBucket:
    """AWS's request token bucket: ``capacity`` tokens, ``refill`` tokens per second."""

    def __init__(self, capacity: float, refill: float) -> None:
        self.capacity, self.refill = float(capacity), float(refill)
        self.tokens, self.stamp = float(capacity), time.monotonic()

    def take(self) -> bool:
        """Take one token if there is one."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.refill)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RequestThrottling(Rule):
    """``RequestLimitExceeded`` (HTTP 503) once an action category's token bucket is empty.

    Defaults are AWS's documented account buckets (EC2 API request throttling): non-mutating
    (Describe*/Get*) 100 tokens + 20/s, mutating 50 + 5/s. :meth:`configure` makes a burst testable.
    """

    DEFAULTS = {"non-mutating": (100.0, 20.0), "mutating": (50.0, 5.0)}

    def __init__(self, buckets: dict[str, tuple[float, float]] | None = None) -> None:
        self._initial = {**self.DEFAULTS, **(buckets or {})}
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Full buckets of the sizes given at construction (undoes :meth:`configure`)."""
        with self._lock:
            self._config = dict(self._initial)
            self._buckets = {name: TokenBucket(*size) for name, size in self._config.items()}

    def configure(self, category: str, capacity: float, refill: float) -> None:
        """Resize one bucket (``non-mutating`` / ``mutating``), full at once, until :meth:`reset`."""
        if category not in self.DEFAULTS:
            raise ValueError(f"unknown throttling category {category!r}")
        with self._lock:
            self._config[category] = (capacity, refill)
            self._buckets[category] = TokenBucket(capacity, refill)

    @staticmethod
    def category(action: str) -> str:
        """AWS's category of an action."""
        return "non-mutating" if action.startswith(("Describe", "Get")) else "mutating"

    def before(self, action: str, params: dict[str, str], moto: Any) -> Answer | None:
        with self._lock:
            if self._buckets[self.category(action)].take():
                return None
        return aws_error("RequestLimitExceeded", "Request limit exceeded.", 503)


# -- 4. DryRun ----------------------------------------------------------------------------------------
class DryRunAnswers(Rule):
    """``DryRun=true`` → ``DryRunOperation`` (HTTP 412) for every action, moto's or not.

    Runs after the IAM extension, which answers ``UnauthorizedOperation`` first when the policy denies.
    """

    def before(self, action: str, params: dict[str, str], moto: Any) -> Answer | None:
        if params.get("DryRun", "").lower() != "true":
            return None
        return aws_error("DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)


# -- 10. ClientToken idempotency ------------------------------------------------------------------------
class ClientTokenIdempotency(Rule):
    """A repeated ``ClientToken`` gets the ORIGINAL answer, and creates nothing (moto ignores tokens).

    The same token with other parameters is ``IdempotentParameterMismatch``, as on AWS.
    """

    ACTIONS = frozenset({"RunInstances", "CreateVolume", "CopyImage"})

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[str, bytes]] = {}

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()

    @staticmethod
    def _digest(params: dict[str, str]) -> str:
        return hashlib.sha256(json.dumps(sorted(params.items())).encode()).hexdigest()

    def before(self, action: str, params: dict[str, str], moto: Any) -> Answer | None:
        token = params.get("ClientToken")
        if action not in self.ACTIONS or not token:
            return None
        with self._lock:
            seen = self._seen.get((action, token))
        if seen is None:
            return None
        digest, body = seen
        if digest != self._digest(params):
            return aws_error(
                "IdempotentParameterMismatch",
                f"The client token {token} was already used with different parameters.",
            )
        return 200, body

    def after(self, action: str, params: dict[str, str], status: int, body: bytes, moto: Any) -> bytes:
        token = params.get("ClientToken")
        if action in self.ACTIONS and token and status == 200:
            with self._lock:
                self._seen.setdefault((action, token), (self._digest(params), body))
        return body


# -- 2. eventual consistency --------------------------------------------------------------------------------
_KINDS = {
    "i-": ("InvalidInstanceID.NotFound", "The instance ID '{}' does not exist"),
    "vol-": ("InvalidVolume.NotFound", "The volume '{}' does not exist."),
    "snap-": ("InvalidSnapshot.NotFound", "The snapshot '{}' does not exist."),
}
_CREATED = {"RunInstances": "instanceId", "CreateVolume": "volumeId", "CreateSnapshot": "snapshotId"}
_LISTED = {
    "DescribeInstances": "instancesSet",
    "DescribeVolumes": "volumeSet",
    "DescribeSnapshots": "snapshotSet",
}
#: Parameters that name a resource by id (``InstanceId.1``, ``VolumeId``, ``ResourceId.2``,
#: ``BlockDeviceMapping.1.Ebs.SnapshotId``), not filters, tags or descriptions that mention one.
_NAMES_ID = re.compile(r"(^|\.)(InstanceId|VolumeId|SnapshotId|ResourceId)(\.\d+)?$")
_ID_FIELD = {"instancesSet": "instanceId", "volumeSet": "volumeId", "snapshotSet": "snapshotId"}


class EventualConsistency(Rule):
    """A just-created instance, volume or snapshot is unknown for ``delay`` seconds.

    Calls naming it (Describe by id, AttachVolume, CreateSnapshot, TerminateInstances ...) answer its
    ``*.NotFound``; filtered Describes leave it out. As on AWS, the resource exists all along: a
    retry must find it, not create a second one.
    """

    def __init__(self, delay: float = CONSISTENCY_S) -> None:
        self.delay = delay
        self._lock = threading.Lock()
        self._hidden: dict[str, float] = {}

    def reset(self) -> None:
        with self._lock:
            self._hidden.clear()

    def hidden(self) -> set[str]:
        """The ids still unknown to calls, whose ``delay`` has not passed yet."""
        now = time.monotonic()
        with self._lock:
            for rid in [r for r, until in self._hidden.items() if until <= now]:
                del self._hidden[rid]
            return set(self._hidden)

    def before(self, action: str, params: dict[str, str], moto: Any) -> Answer | None:
        invisible = self.hidden()
        if not invisible:
            return None
        for key, value in params.items():
            if value in invisible and _NAMES_ID.search(key):
                code, message = next(v for p, v in _KINDS.items() if value.startswith(p))
                return aws_error(code, message.format(value))
        return None

    def after(self, action: str, params: dict[str, str], status: int, body: bytes, moto: Any) -> bytes:
        if status != 200:
            return body
        if action in _CREATED:
            until = time.monotonic() + self.delay
            try:
                ids = [
                    el.text or "" for el in ET.fromstring(body).iter() if _local(el.tag) == _CREATED[action]
                ]
            except ET.ParseError:
                ids = []
            with self._lock:
                for rid in ids:
                    self._hidden.setdefault(rid, until)
            return body
        if action in _LISTED:
            invisible = self.hidden()
            if invisible:
                set_name = _LISTED[action]
                body = _drop_items(
                    body, set_name, lambda it: _child_text(it, _ID_FIELD[set_name]) in invisible
                )
                if action == "DescribeInstances":  # a reservation whose instances are all hidden goes too
                    body = _drop_items(
                        body,
                        "reservationSet",
                        lambda r: not any(_local(e.tag) == "instanceId" for e in r.iter()),
                    )
        return body


# -- 3. AttachVolume across availability zones ------------------------------------------------------------
class AttachVolumeSameZone(Rule):
    """``AttachVolume`` of a volume in another zone than the instance: ``InvalidVolume.ZoneMismatch``."""

    def before(self, action: str, params: dict[str, str], moto: Any) -> Answer | None:
        if action != "AttachVolume":
            return None
        ec2 = backend(moto)
        volume = ec2.volumes.get(params.get("VolumeId", ""))
        try:
            instance = ec2.get_instance(params.get("InstanceId", ""))
        except Exception:  # noqa: BLE001 - unknown instance: moto answers its own NotFound
            return None
        if volume is None or volume.zone.name == instance.placement.zone:
            return None
        return aws_error(
            "InvalidVolume.ZoneMismatch",
            f"The volume '{volume.id}' is not in the same availability zone as instance '{instance.id}'",
        )


# -- 8. snapshots take time ----------------------------------------------------------------------------
class _ProgressingSnapshot(Snapshot):
    """A moto snapshot whose Progress is set by :class:`SnapshotProgress` (moto's says 100%)."""

    __module__ = "rehearsal.aws_rules"  # moto's model registry keys classes by module path
    amibake_progress = 100

    @property
    def progress(self) -> str:
        return f"{self.amibake_progress}%"


class SnapshotProgress(Rule):
    """A new snapshot is ``pending`` with Progress rising over ``duration`` seconds, then ``completed``."""

    def __init__(self, duration: float = SNAPSHOT_S) -> None:
        self.duration = duration
        self._lock = threading.Lock()
        self._started: dict[str, tuple[float, Any]] = {}

    def reset(self) -> None:
        with self._lock:
            self._started.clear()

    def advance(self) -> None:
        """Bring every tracked snapshot's state and progress to now."""
        now = time.monotonic()
        with self._lock:
            for sid, (start, snap) in list(self._started.items()):
                done = self.duration <= 0 or now - start >= self.duration
                snap.amibake_progress = 100 if done else int(99 * (now - start) / self.duration)
                if snap.status == "pending" and done:
                    snap.status = "completed"
                if snap.status != "pending":
                    del self._started[sid]

    def before(self, action: str, params: dict[str, str], moto: Any) -> Answer | None:
        self.advance()
        return None

    def after(self, action: str, params: dict[str, str], status: int, body: bytes, moto: Any) -> bytes:
        if action != "CreateSnapshot" or status != 200 or self.duration <= 0:
            return body
        sid = _child_text(ET.fromstring(body), "snapshotId")
        snap = backend(moto).snapshots.get(sid)
        if snap is not None:
            snap.__class__ = _ProgressingSnapshot
            snap.amibake_progress, snap.status = 0, "pending"
            with self._lock:
                self._started[sid] = (time.monotonic(), snap)
        # moto's answer says completed / 100%: AWS answers pending with an empty progress
        return body.replace(b"<status>completed</status>", b"<status>pending</status>")


# -- 5. RegisterImage validated, and described as registered -----------------------------------------
class _RegisteredImage(Ami):
    """A moto AMI that reports what RegisterImage was given (moto's reports made-up mappings)."""

    __module__ = "rehearsal.aws_rules"
    registered_mappings: list[dict[str, Any]] = []  # noqa: RUF012 - set per instance
    ena_support: bool | None = None
    imds_support: str | None = None
    deprecation_time: str | None = None

    @property
    def block_device_mappings(self) -> list[dict[str, Any]]:
        return self.registered_mappings

    @property
    def sriov_net_support(self) -> str | None:
        return self.sriov


#: Values AWS accepts (EC2 API reference, RegisterImage).
BOOT_MODES = ("legacy-bios", "uefi", "uefi-preferred")
IMDS_SUPPORT = ("v2.0",)
ARCHITECTURES = ("i386", "x86_64", "arm64", "x86_64_mac", "arm64_mac")
VIRTUALIZATION_TYPES = ("hvm", "paravirtual")
VOLUME_TYPES = ("standard", "io1", "io2", "gp2", "gp3", "sc1", "st1")
AMI_NAME_RE = re.compile(r"[A-Za-z0-9()\[\] ./\-'@_]{3,128}")
DEVICE_RE = re.compile(r"/dev/(sd[a-z][0-9]*|xvd[a-z]+[0-9]*)")


def new_image(
    ec2: Any,
    *,
    name: str,
    description: str = "",
    root_device: str,
    mappings: list[dict[str, Any]],
    owner_id: str = ACCOUNT_ID,
    public: bool = False,
    architecture: str = "x86_64",
    virtualization: str = "hvm",
    boot_mode: str | None = None,
    imds_support: str | None = None,
    ena: bool | None = None,
    sriov: str | None = None,
    creation_date: datetime | None = None,
) -> Any:
    """An AMI in moto's backend exactly as described (moto's own RegisterImage keeps only the name)."""
    image_id = f"ami-{uuid.uuid4().hex[:17]}"
    image = _RegisteredImage(
        ec2,
        image_id,
        name=name,
        description=description,
        owner_id=owner_id,
        public=public,
        architecture=architecture,
        virtualization_type=virtualization,
        root_device_type="ebs",
        root_device_name=root_device,
        sriov=sriov,  # type: ignore[arg-type]
        boot_mode=boot_mode,  # type: ignore[arg-type]
        creation_date=creation_date,
    )
    # moto's Ami makes a 15 GiB volume + snapshot of its own; the mappings name the real one(s)
    ec2.snapshots.pop(image.ebs_snapshot.id, None)
    image.registered_mappings = mappings
    image.ena_support, image.imds_support = ena, imds_support
    for mapping in mappings:
        snap = ec2.snapshots.get(mapping.get("Ebs", {}).get("SnapshotId", ""))
        if snap is not None:
            snap.from_ami = image_id  # DeleteSnapshot: InvalidSnapshot.InUse while registered
            image.ebs_snapshot = snap
    ec2.amis[image_id] = image
    return image


def _mappings(params: dict[str, str]) -> list[dict[str, Any]]:
    """``BlockDeviceMapping.N.*`` as DescribeImages reports them."""
    out, n = [], 1
    while f"BlockDeviceMapping.{n}.DeviceName" in params:
        pre = f"BlockDeviceMapping.{n}."
        mapping: dict[str, Any] = {"DeviceName": params[pre + "DeviceName"]}
        ebs = {k[len(pre) + 4 :]: v for k, v in params.items() if k.startswith(pre + "Ebs.")}
        if ebs:
            for key in ("VolumeSize", "Iops", "Throughput"):
                if key in ebs:
                    ebs[key] = int(ebs[key])
            for key in ("DeleteOnTermination", "Encrypted"):
                if key in ebs:
                    ebs[key] = ebs[key].lower() == "true"
            mapping["Ebs"] = ebs
        if pre + "VirtualName" in params:
            mapping["VirtualName"] = params[pre + "VirtualName"]
        out.append(mapping)
        n += 1
    return out


def _tag_specs(params: dict[str, str]) -> dict[str, dict[str, str]]:
    from rehearsal.ec2_local import tag_specs

    return tag_specs(params)


class RegisterImageRules(Rule):
    """RegisterImage refused where AWS refuses it, else registered as given (mappings, boot mode,
    IMDS, ENA, SR-IOV, tags on the image and its snapshots), so DescribeImages reports the truth."""

    def before(self, action: str, params: dict[str, str], moto: Any) -> Answer | None:
        if action != "RegisterImage":
            return None
        ec2 = backend(moto)
        checked = self._check(params, ec2)
        if isinstance(checked, tuple):
            return checked
        image = new_image(
            ec2,
            name=params["Name"],
            description=params.get("Description", ""),
            root_device=params["RootDeviceName"],
            mappings=checked,
            architecture=params.get("Architecture", "x86_64"),
            virtualization=params.get("VirtualizationType", "paravirtual"),
            boot_mode=params.get("BootMode"),
            imds_support=params.get("ImdsSupport"),
            ena=params["EnaSupport"].lower() == "true" if "EnaSupport" in params else None,
            sriov=params.get("SriovNetSupport"),
        )
        specs = _tag_specs(params)
        if specs.get("image"):
            ec2.create_tags([image.id], specs["image"])
        snapshot_ids = [m["Ebs"]["SnapshotId"] for m in checked if m.get("Ebs", {}).get("SnapshotId")]
        if specs.get("snapshot") and snapshot_ids:
            ec2.create_tags(snapshot_ids, specs["snapshot"])
        return _ok("RegisterImage", {"imageId": image.id})

    @staticmethod
    def _check(params: dict[str, str], ec2: Any) -> Answer | list[dict[str, Any]]:
        """The block device mappings, or AWS's error for the first thing it would refuse."""
        bad = "InvalidParameterValue"
        name = params.get("Name", "")
        if not AMI_NAME_RE.fullmatch(name):
            return aws_error(
                "InvalidAMIName.Malformed",
                f"AMI names must be between 3 and 128 characters long, and may contain letters, numbers, "
                f"'(', ')', '.', '-', '/', '_', ' ', ''', '@', '[' and ']' (got {name!r})",
            )
        for image in ec2.amis.values():
            if image.name == name and image.owner_id == ACCOUNT_ID:
                return aws_error(
                    "InvalidAMIName.Duplicate", f"AMI name {name} is already in use by AMI {image.id}"
                )
        for key, allowed in (
            ("BootMode", BOOT_MODES),
            ("ImdsSupport", IMDS_SUPPORT),
            ("Architecture", ARCHITECTURES),
            ("VirtualizationType", VIRTUALIZATION_TYPES),
            ("SriovNetSupport", ("simple",)),
        ):
            if key in params and params[key] not in allowed:
                return aws_error(
                    bad,
                    f"Value ({params[key]}) for parameter {key} is invalid. Valid: {', '.join(allowed)}",
                )
        if "ImageLocation" in params:
            return aws_error(bad, "instance-store (S3 manifest) AMIs are not modelled by the local EC2 API")
        mappings = _mappings(params)
        root = params.get("RootDeviceName", "")
        if not root:
            return aws_error("MissingParameter", "The request must contain the parameter rootDeviceName")
        if root not in {m["DeviceName"] for m in mappings}:
            return aws_error(
                "InvalidBlockDeviceMapping",
                f"The root device name {root} is not in the block device mappings",
            )
        for mapping in mappings:
            device, ebs = mapping["DeviceName"], mapping.get("Ebs")
            if not DEVICE_RE.fullmatch(device):
                return aws_error(bad, f"Invalid device name {device}")
            if ebs is None:
                continue
            if ebs.get("VolumeType", "standard") not in VOLUME_TYPES:
                return aws_error(bad, f"Value ({ebs['VolumeType']}) for parameter volumeType is invalid")
            snap_id = ebs.get("SnapshotId", "")
            if not snap_id:
                if device == root:
                    return aws_error(
                        "InvalidBlockDeviceMapping", f"The root device {root} needs a snapshot id"
                    )
                continue
            snap = ec2.snapshots.get(snap_id)
            if snap is None or snap.owner_id != ACCOUNT_ID:
                return aws_error("InvalidSnapshot.NotFound", f"The snapshot '{snap_id}' does not exist.")
            if snap.status != "completed":
                return aws_error(
                    "IncorrectState", f"Snapshot '{snap_id}' is not 'completed' (it is '{snap.status}')"
                )
            if int(ebs.get("VolumeSize", snap.volume.size)) < int(snap.volume.size):
                return aws_error(
                    "InvalidBlockDeviceMapping",
                    f"Volume of size {ebs['VolumeSize']}GB is smaller than snapshot '{snap_id}', "
                    f"expect size >= {snap.volume.size}GB",
                )
        for kind in _tag_specs(params):
            if kind not in ("image", "snapshot"):
                return aws_error(bad, f"'{kind}' is not a valid taggable resource type for this operation.")
        return mappings


# -- 6. Enable / DisableImageDeprecation, 1. deprecated AMIs hidden ---------------------------------
class ImageDeprecation(Rule):
    """Enable/DisableImageDeprecation (moto answers HTTP 500): DescribeImages then shows DeprecationTime.

    As on AWS: only the owner may, the time is rounded to the minute, not in the past, at most 10 years
    ahead.
    """

    def before(self, action: str, params: dict[str, str], moto: Any) -> Answer | None:
        if action not in ("EnableImageDeprecation", "DisableImageDeprecation"):
            return None
        image_id = params.get("ImageId", "")
        image = backend(moto).amis.get(image_id)
        if image is None:
            return aws_error("InvalidAMIID.NotFound", f"The image id '[{image_id}]' does not exist")
        if image.owner_id != ACCOUNT_ID:
            return aws_error("AuthFailure", f"Not authorized for image:{image_id}")
        if action == "DisableImageDeprecation":
            image.deprecation_time = None
            return _ok(action, {"return": "true"})
        try:
            at = datetime.fromisoformat(params.get("DeprecateAt", "").replace("Z", "+00:00"))
        except ValueError:
            return aws_error("InvalidParameterValue", f"Invalid DeprecateAt {params.get('DeprecateAt')!r}")
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        at = (at + timedelta(seconds=30)).replace(second=0, microsecond=0)  # rounded to the minute
        now = datetime.now(UTC)
        if at < now.replace(second=0, microsecond=0):
            return aws_error("InvalidParameterValue", "The deprecation time can't be in the past.")
        if at > now + timedelta(days=3653):
            return aws_error(
                "InvalidParameterValue", "The deprecation time can't be more than 10 years from now."
            )
        image.deprecation_time = iso_time(at)
        return _ok(action, {"return": "true"})


def deprecated(image: Any, now: datetime | None = None) -> bool:
    """Whether a moto AMI is deprecated now."""
    when = getattr(image, "deprecation_time", None)
    if not when:
        return False
    return datetime.fromisoformat(str(when).replace("Z", "+00:00")) <= (now or datetime.now(UTC))


class HideDeprecatedImages(Rule):
    """DescribeImages leaves out other accounts' deprecated AMIs unless ``IncludeDeprecated=true``
    or the AMI is asked for by id (the owner always sees its own)."""

    def after(self, action: str, params: dict[str, str], status: int, body: bytes, moto: Any) -> bytes:
        if action != "DescribeImages" or status != 200:
            return body
        if params.get("IncludeDeprecated", "").lower() == "true" or numbered(params, "ImageId"):
            return body
        amis = backend(moto).amis

        def hidden(item: ET.Element) -> bool:
            image = amis.get(_child_text(item, "imageId"))
            return image is not None and image.owner_id != ACCOUNT_ID and deprecated(image)

        return _drop_items(body, "imagesSet", hidden)


# -- 7. a terminated box's network interface lingers ---------------------------------------------------------
class LingeringInterfaces(Rule):
    """DeleteSecurityGroup answers ``DependencyViolation`` while a pending, running, stopping or stopped
    instance is in the group, and for ``linger`` seconds after TerminateInstances (its network
    interface is still being deleted). moto's ``shutting-down`` is not modelled as holding it."""

    def __init__(self, linger: float = LINGER_S) -> None:
        self.linger = linger
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}  # group id -> when its last terminated box's ENI is gone

    def reset(self) -> None:
        with self._lock:
            self._until.clear()

    def before(self, action: str, params: dict[str, str], moto: Any) -> Answer | None:
        if action != "DeleteSecurityGroup":
            return None
        group_id = params.get("GroupId", "")
        with self._lock:
            lingering = self._until.get(group_id, 0.0) > time.monotonic()
        live = any(
            group_id in {g.id for g in inst.security_groups}
            for inst in _instances(backend(moto))
            if inst.state in ("pending", "running", "stopping", "stopped")
        )
        if lingering or live:
            return aws_error("DependencyViolation", f"resource {group_id} has a dependent object")
        return None

    def after(self, action: str, params: dict[str, str], status: int, body: bytes, moto: Any) -> bytes:
        if action == "TerminateInstances" and status == 200:
            until = time.monotonic() + self.linger
            ec2 = backend(moto)
            for instance_id in numbered(params, "InstanceId"):
                try:
                    groups = [g.id for g in ec2.get_instance(instance_id).security_groups]
                except Exception:  # noqa: BLE001 - gone already
                    continue
                with self._lock:
                    for group_id in groups:
                        self._until[group_id] = max(self._until.get(group_id, 0.0), until)
        return body


def _instances(ec2: Any) -> Iterable[Any]:
    return (inst for reservation in ec2.reservations.values() for inst in reservation.instances)


# -- 11. CopyImage into another region ---------------------------------------------------------------------
def kms_key_exists(key_id: str, region: str) -> bool:
    """Whether moto's KMS (same server, same account) knows ``key_id`` (id, alias or ARN) in ``region``."""
    from moto.kms.models import kms_backends

    kms = kms_backends[ACCOUNT_ID][region]
    try:
        return kms.any_id_to_key_id(key_id) in kms.keys
    except Exception:  # noqa: BLE001 - an unknown alias: moto raises its own NotFound
        return False


class CopyImageRules(Rule):
    """CopyImage as EC2 does it, where moto copies little (a 15 GiB snapshot of its own, no tags, no
    encryption, ``available`` at once, any name, ClientToken ignored: :class:`ClientTokenIdempotency`).

    Refused as AWS refuses: no ``SourceRegion`` (MissingParameter), an unknown source AMI
    (InvalidAMIID.NotFound), a name taken in the target region (InvalidAMIName.Duplicate),
    ``KmsKeyId`` without ``Encrypted`` (InvalidParameterDependency, moto's own CreateVolume answer), a
    tag specification for anything but image or snapshot. Then the copy gets one new snapshot per
    mapping of the source (same size, encrypted with the KMS key if asked), the source's mappings
    and attributes, the ``TagSpecifications`` tags (the snapshot ones on every new snapshot), and is
    ``pending`` for ``duration`` seconds before ``available``. A KMS key unknown in the target region
    fails the copy only then (``failed``, as AWS fails a copy asynchronously: the StateReason text is
    ours). The copy is made by moto's CopyImage in the region the request was signed for, so the
    ClientToken rule sees its answer.
    """

    def __init__(self, duration: float = COPY_S) -> None:
        self.duration = duration
        self._lock = threading.Lock()
        self._copying: dict[str, tuple[float, Any, str]] = {}  # id -> (start, image, failure reason)

    def reset(self) -> None:
        with self._lock:
            self._copying.clear()

    def advance(self) -> None:
        """Bring every copy in progress to its state now."""
        now = time.monotonic()
        with self._lock:
            for image_id, (start, image, failure) in list(self._copying.items()):
                if self.duration <= 0 or now - start >= self.duration:
                    image.state = "failed" if failure else "available"
                    if failure:
                        image.state_reason = {"Code": "Client.CopyImageFailed", "Message": failure}
                    del self._copying[image_id]

    def before(self, action: str, params: dict[str, str], moto: Any) -> Answer | None:
        self.advance()
        if action != "CopyImage" or params.get("DryRun", "").lower() == "true":
            return None
        source_region = params.get("SourceRegion", "")
        if not source_region:
            return aws_error("MissingParameter", "The request must contain the parameter SourceRegion")
        source_id = params.get("SourceImageId", "")
        source = ec2_backends[ACCOUNT_ID][source_region].amis.get(source_id)
        if source is None:
            return aws_error("InvalidAMIID.NotFound", f"The image id '[{source_id}]' does not exist")
        name = params.get("Name", "")
        for image in backend(moto).amis.values():
            if image.name == name and image.owner_id == ACCOUNT_ID:
                return aws_error(
                    "InvalidAMIName.Duplicate", f"AMI name {name} is already in use by AMI {image.id}"
                )
        if params.get("KmsKeyId") and params.get("Encrypted", "").lower() != "true":
            return aws_error(
                "InvalidParameterDependency",
                "The parameter KmsKeyId requires the parameter Encrypted to be set.",
            )
        for kind in _tag_specs(params):
            if kind not in ("image", "snapshot"):
                return aws_error(
                    "InvalidParameterValue",
                    f"'{kind}' is not a valid taggable resource type for this operation.",
                )
        return None

    def after(self, action: str, params: dict[str, str], status: int, body: bytes, moto: Any) -> bytes:
        if action != "CopyImage" or status != 200:
            return body
        ec2 = backend(moto)
        image = ec2.amis.get(_child_text(ET.fromstring(body), "imageId"))
        if image is None:
            return body
        source = ec2_backends[ACCOUNT_ID][params["SourceRegion"]].amis[params["SourceImageId"]]
        region = moto.meta.region_name
        encrypted = params.get("Encrypted", "").lower() == "true"
        key = params.get("KmsKeyId") or None
        ec2.snapshots.pop(image.ebs_snapshot.id, None)  # moto's own 15 GiB snapshot
        specs = _tag_specs(params)
        mappings, new_snapshots = [], []
        for mapping in getattr(source, "block_device_mappings", []):
            copied = json.loads(json.dumps(mapping))
            ebs = copied.get("Ebs")
            if ebs and ebs.get("SnapshotId") in ec2_backends[ACCOUNT_ID][params["SourceRegion"]].snapshots:
                size = int(ebs.get("VolumeSize") or 8)
                was_encrypted = bool(ebs.get("Encrypted"))
                volume = ec2.create_volume(
                    size=size,
                    zone_name=f"{region}a",
                    encrypted=encrypted or was_encrypted,
                    kms_key_id=key if key and kms_key_exists(key, region) else None,
                )
                snap = ec2.create_snapshot(volume.id, f"Copied for DestinationAmi {image.id}", ACCOUNT_ID)
                ec2.delete_volume(volume.id)
                snap.from_ami = image.id
                ebs["SnapshotId"], ebs["Encrypted"] = snap.id, encrypted or was_encrypted
                if key:
                    ebs["KmsKeyId"] = key
                new_snapshots.append(snap)
            mappings.append(copied)
        image.__class__ = _RegisteredImage
        image.registered_mappings = mappings
        image.ena_support = getattr(source, "ena_support", None)
        image.imds_support = getattr(source, "imds_support", None)
        image.root_device_name, image.boot_mode = source.root_device_name, source.boot_mode
        image.sriov = getattr(source, "sriov", None)
        if new_snapshots:
            image.ebs_snapshot = new_snapshots[0]
        if specs.get("image"):
            ec2.create_tags([image.id], specs["image"])
        if specs.get("snapshot") and new_snapshots:
            ec2.create_tags([s.id for s in new_snapshots], specs["snapshot"])
        failure = (
            f"KMS key {key} does not exist in {region}" if key and not kms_key_exists(key, region) else ""
        )
        image.state = "pending"
        with self._lock:
            self._copying[image.id] = (time.monotonic(), image, failure)
        return body


def aws_rules(
    *,
    consistency_s: float = CONSISTENCY_S,
    snapshot_s: float = SNAPSHOT_S,
    linger_s: float = LINGER_S,
    copy_s: float = COPY_S,
) -> list[Rule]:
    """Every rule, in the order they must run: throttling first (AWS throttles before anything), then
    DryRun, idempotency, eventual consistency, and the per-action rules."""
    return [
        RequestThrottling(),
        DryRunAnswers(),
        ClientTokenIdempotency(),
        EventualConsistency(consistency_s),
        AttachVolumeSameZone(),
        SnapshotProgress(snapshot_s),
        RegisterImageRules(),
        ImageDeprecation(),
        HideDeprecatedImages(),
        LingeringInterfaces(linger_s),
        CopyImageRules(copy_s),
    ]
