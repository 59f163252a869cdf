"""The records tasks hand each other through XCom, typed, and the one check each gets on arrival.

A record comes back from XCom as plain JSON; :func:`check` is the only place that trusts it, with
one error per contract naming the producing task and the field. Pure Python, no Airflow import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypedDict

from operators.rules import manifest, validation
from operators.rules.contract import CONTRACT


class Box(TypedDict):
    """``LaunchBuildBox``'s XCom: the build box and how to reach it."""

    build_id: str
    instance_id: str
    security_group_id: str
    availability_zone: str
    ssh_address: str
    address: str
    port: int
    host_key: str


class Canvas(TypedDict):
    """``AttachCanvas``'s XCom: the blank volume attached to the box."""

    volume_id: str
    device_name: str
    size_gib: int


class Snapshot(TypedDict):
    """``FrozenSnapshot``'s XCom."""

    snapshot_id: str
    volume_id: str


class SmokeCheck(TypedDict):
    """One of the image definition's ``smoke_checks``: a command that must succeed on the booted image."""

    name: str
    command: str


class Expectations(TypedDict):
    """What a first boot of the image must show, as ``build-image`` reported it after its verify phase
    (the ``expectations`` progress event): ``instance-check``'s arguments and who logs in."""

    login_user: str
    cmdline: str
    baked_host_keys: list[str]
    require_selinux: bool
    checks: list[SmokeCheck]


class PackageEntry(TypedDict):
    """One installed package of the image (:mod:`operators.rules.manifest`)."""

    name: str
    epoch: int
    version: str
    release: str
    arch: str


class Build(TypedDict):
    """``RemoteChrootBuild``'s XCom: ``packages`` is the image's package list, canonical order, as the
    box listed it after verify (``packages`` event, file fetched and checked against its sha256)."""

    volume_id: str
    expectations: Expectations
    packages: list[PackageEntry]


class ChangeCounts(TypedDict):
    """How many packages were added, removed and updated since the previous AMI."""

    added: int
    removed: int
    updated: int


class Manifest(TypedDict):
    """``PublishManifest``'s XCom: a small summary (the list itself is in the build's XCom and S3)."""

    ami_id: str
    packages: int
    sha256: str
    s3_key: str
    changed: ChangeCounts
    previous_ami: str


class Ami(TypedDict):
    """``RegisterHVMAmi``'s XCom."""

    ami_id: str
    ami_name: str
    snapshot_id: str


class Inputs(TypedDict):
    """``FingerprintInputs``' XCom (:mod:`operators.rules.fingerprint`)."""

    build: bool
    reason: str
    fingerprint: str
    complete: bool
    inputs: str
    newest_verified_ami: str
    changed: list[str]


#: sha256 hex digest (the inputs' fingerprint).
SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _pattern(pattern: re.Pattern[str], what: str) -> Callable[[Any], str | None]:
    return lambda v: None if isinstance(v, str) and pattern.fullmatch(v) else what


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v and v == v.strip() else "a non-empty string"


def _size(v: Any) -> str | None:
    try:
        validation.validate_size(v)
    except validation.ParamError as exc:
        return str(exc).split(": ", 1)[1]
    return None


#: A security group id (the build's temporary group, in ``Box``).
SECURITY_GROUP_ID_RE = re.compile(r"sg-[0-9a-f]{8,17}")
#: A Linux user name as cloud-init's default_user may have it (useradd's rule, no leading dash).
USER_NAME_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
#: A SHA256 host-key fingerprint as ``ssh-keygen -l`` prints it.
FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def _expectations(v: Any) -> str | None:
    """None when ``v`` is a well-formed :class:`Expectations`, else what was expected."""
    expected = (
        "build-image's expectations {login_user: a user name, cmdline: 'root=...', "
        "baked_host_keys: [SHA256 fingerprints], require_selinux: true|false, "
        "checks: [{name, command}]}"
    )
    if not isinstance(v, dict):
        return expected
    ok = (
        isinstance(v.get("login_user"), str)
        and USER_NAME_RE.fullmatch(v["login_user"]) is not None
        and isinstance(v.get("cmdline"), str)
        and v["cmdline"].startswith("root=")
        and isinstance(v.get("baked_host_keys"), list)
        and all(isinstance(f, str) and FINGERPRINT_RE.fullmatch(f) for f in v["baked_host_keys"])
        and isinstance(v.get("require_selinux"), bool)
        and isinstance(v.get("checks"), list)
        and all(
            isinstance(c, dict)
            and set(c) == {"name", "command"}
            and isinstance(c["name"], str)
            and CONTRACT.image_name_re.fullmatch(c["name"]) is not None
            and isinstance(c["command"], str)
            and c["command"].strip() != ""
            for c in v["checks"]
        )
    )
    return None if ok else expected


def _packages(v: Any) -> str | None:
    """None when ``v`` is a well-formed, canonical package list in JSON form."""
    try:
        ok = manifest.to_records(manifest.from_records(v)) == v
    except manifest.ManifestError as exc:
        return f"the image's package list ({exc})"
    return None if ok else "the image's package list in canonical order (sorted, unique)"


def _changes(v: Any) -> str | None:
    counts = ("added", "removed", "updated")
    ok = isinstance(v, dict) and set(v) == set(counts) and all(_count(v[c]) is None for c in counts)
    return None if ok else "{added, removed, updated} counts"


def _count(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "a count"


_ami = _pattern(validation.AMI_ID_RE, "an AMI id")


def _port(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536 else "a TCP port"


#: record kind -> (producing task, {field: check returning None or what was expected})
CONTRACTS: dict[str, tuple[str, dict[str, Callable[[Any], str | None]]]] = {
    "box": (
        "LaunchBuildBox",
        {
            "instance_id": _pattern(validation.INSTANCE_ID_RE, "an instance id"),
            "availability_zone": _text,
            "ssh_address": _text,
            "address": _text,
            "port": _port,
            "host_key": _text,
        },
    ),
    "canvas": (
        "AttachCanvas",
        {
            "volume_id": _pattern(validation.VOLUME_ID_RE, "a volume id"),
            "device_name": _pattern(validation.DEVICE_NAME_RE, "an EBS device name"),
            "size_gib": _size,
        },
    ),
    "snapshot": ("FrozenSnapshot", {"snapshot_id": _pattern(validation.SNAPSHOT_ID_RE, "a snapshot id")}),
    "build": (
        "RemoteChrootBuild",
        {
            "volume_id": _pattern(validation.VOLUME_ID_RE, "a volume id"),
            "expectations": _expectations,
            "packages": _packages,
        },
    ),
    "ami": ("RegisterHVMAmi", {"ami_id": _ami}),
    "manifest": (
        "PublishManifest",
        {
            "ami_id": _ami,
            "packages": lambda v: None if _count(v) is None and v > 0 else "a package count",
            "sha256": _pattern(SHA256_RE, "a sha256 hex digest"),
            "s3_key": lambda v: None if isinstance(v, str) else "an S3 key or ''",
            "changed": _changes,
            "previous_ami": lambda v: None if v == "" or _ami(v) is None else "an AMI id or ''",
        },
    ),
    "inputs": (
        "FingerprintInputs",
        {
            "fingerprint": _pattern(SHA256_RE, "a sha256 hex digest"),
            "inputs": lambda v: None if isinstance(v, str) and len(v) <= 256 else "a tag value",
        },
    ),
}


def check(kind: str, value: Any) -> Any:
    """``value`` as the record ``kind``, or a ParamError naming the producing task and the field."""
    producer, fields = CONTRACTS[kind]
    if not isinstance(value, dict):
        raise validation.ParamError(kind, f"must be {producer}'s XCom (a dict), got {value!r}")
    for field, expected in fields.items():
        problem = expected(value.get(field))
        if problem:
            raise validation.ParamError(
                f"{kind}.{field}", f"must be {problem} in {producer}'s XCom, got {value.get(field)!r}"
            )
    return value


def box_and_canvas(box: Any, canvas: Any) -> tuple[Box, Canvas]:
    """The two records every task on the box needs."""
    return check("box", box), check("canvas", canvas)
