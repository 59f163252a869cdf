"""The records tasks hand each other through XCom, and the one check each gets on arrival.

Pure Python, no Airflow import.
"""

from __future__ import annotations

from typing import Any

from operators.rules import validation


def check_box_and_canvas(box: Any, canvas: Any) -> tuple[str, str, str, int]:
    """(instance id, volume id, device name, size GiB) from the upstream XComs, or a ParamError."""
    if not isinstance(box, dict):
        raise validation.ParamError("box", f"must be LaunchBuildBox's XCom (a dict), got {box!r}")
    if not isinstance(canvas, dict):
        raise validation.ParamError("canvas", f"must be AttachCanvas's XCom (a dict), got {canvas!r}")
    instance_id = validation.require_id(
        "box.instance_id", box.get("instance_id"), validation.INSTANCE_ID_RE, "an instance id"
    )
    volume_id = validation.require_id(
        "canvas.volume_id", canvas.get("volume_id"), validation.VOLUME_ID_RE, "a volume id"
    )
    device = validation.match_field(
        "canvas.device_name", str(canvas.get("device_name")), validation.DEVICE_NAME_RE, "/dev/sdf../dev/sdp"
    )
    return instance_id, volume_id, device, validation.validate_size(canvas.get("size_gib"), "canvas.size_gib")
