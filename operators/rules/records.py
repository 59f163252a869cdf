"""The records tasks hand each other through XCom, typed, and the one check each gets on arrival.

A record comes back from XCom as plain JSON; :func:`check` is the only place that trusts it, with
one error per contract naming the producing task and the field. Pure Python, no Airflow import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypedDict

from operators.rules import validation


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


class Ami(TypedDict):
    """``RegisterHVMAmi``'s XCom."""

    ami_id: str
    ami_name: str
    snapshot_id: str


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
    "ami": ("RegisterHVMAmi", {"ami_id": _pattern(validation.AMI_ID_RE, "an AMI id")}),
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
