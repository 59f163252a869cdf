"""Unit tests of operators.remote: quoted command lines and progress-line parsing."""

from __future__ import annotations

import shlex

import pytest

from operators.rules.remote import (
    BuildProgress,
    build_image_argv,
    build_image_command,
    credentials_payload,
    parse_progress,
)
from operators.rules.validation import ParamError

BASE = {
    "build": "0123456789ab",
    "volume_id": "vol-0123456789abcdef0",
    "recipe": "debian12",
    "device_name": "/dev/sdf",
    "size_gib": 4,
}


def test_all_command_is_one_quoted_argv() -> None:
    cmd = build_image_command(action="all", mirror_url="http://127.0.0.1:1/debian", boot_check=True, **BASE)
    assert shlex.split(cmd) == [
        "bash",
        "/var/tmp/amibake/0123456789ab/scripts/build-image",
        "--recipe", "debian12",
        "--volume-id", "vol-0123456789abcdef0",
        "--device-name", "/dev/sdf",
        "--size-gib", "4",
        "--mirror", "http://127.0.0.1:1/debian",
        "--boot-check",
        "all",
    ]  # fmt: skip


def test_sudo_and_freeze_timeout() -> None:
    argv = build_image_argv(action="freeze", freeze_timeout=120, sudo=True, **BASE)
    assert argv[:3] == ["sudo", "-n", "bash"]
    assert argv[-3:] == ["--freeze-timeout", "120", "freeze"]
    assert "--no-boot-check" not in argv


@pytest.mark.parametrize(
    ("field", "override"),
    [
        ("volume_id", {"volume_id": "vol-1; reboot"}),
        ("recipe", {"recipe": "$(reboot)"}),
        ("device_name", {"device_name": "/dev/sda"}),
        ("device_name", {"device_name": "/dev/sdq"}),
        ("mirror_url", {"mirror_url": "https://u:p@x/centos"}),
        ("freeze_timeout", {"action": "freeze", "freeze_timeout": 0}),
        ("freeze_timeout", {"action": "freeze", "freeze_timeout": 3601}),
        ("freeze_timeout", {"action": "freeze", "freeze_timeout": "300; reboot"}),
        ("mirror_url", {"mirror_url": "http://x/`reboot`"}),
        ("action", {"action": "rm"}),
        ("size_gib", {"size_gib": "4; reboot"}),
        ("manifest_sha256", {"manifest_sha256": "0" * 63}),
        ("manifest_sha256", {"manifest_sha256": "$(reboot)" + "0" * 55}),
    ],
)
def test_nothing_unvalidated_reaches_the_shell(field: str, override: dict) -> None:
    kwargs = {"action": "all", **BASE, **override}
    with pytest.raises(ParamError) as err:
        build_image_command(**kwargs)
    assert err.value.field in (field, "canvas_size_gib")


def test_parse_progress() -> None:
    assert parse_progress('AMIBAKE {"event":"phase-start","phase":"mkfs"}') == {
        "event": "phase-start",
        "phase": "mkfs",
    }
    assert parse_progress("AMIBAKE {not json") is None
    assert parse_progress("mkfs.xfs: done") is None
    assert parse_progress('AMIBAKE ["event"]') is None


def test_progress_reports_failed_phase_and_rc() -> None:
    progress = BuildProgress()
    for line in [
        'AMIBAKE {"event":"phase-start","phase":"mkfs"}',
        'AMIBAKE {"event":"phase-end","phase":"mkfs","seconds":1.5}',
        'AMIBAKE {"event":"phase-start","phase":"bootstrap"}',
        "E: Failed getting release file",
        'AMIBAKE {"event":"phase-fail","phase":"bootstrap","rc":4,"log":"/w/logs/bootstrap.log"}',
        'AMIBAKE {"event":"result","status":"fail","phase":"bootstrap","rc":4}',
    ]:
        progress.feed(line)
    assert progress.finished == {"mkfs": 1.5}
    assert not progress.ok
    assert progress.failure(4) == (
        "build-image failed in phase 'bootstrap' with exit code 4; full log on the box: /w/logs/bootstrap.log"
    )


def test_progress_without_events_still_names_the_exit_code() -> None:
    progress = BuildProgress()
    progress.feed("bash: build-image: No such file or directory")
    assert (
        progress.failure(127)
        == "build-image failed in phase 'unknown (no phase reported)' with exit code 127"
    )


def test_frozen_and_ok() -> None:
    progress = BuildProgress()
    progress.feed('AMIBAKE {"event":"frozen","mountpoints":["/var/tmp/amibake/vol-1/root"]}')
    progress.feed('AMIBAKE {"event":"result","status":"ok"}')
    assert progress.frozen == ["/var/tmp/amibake/vol-1/root"]
    assert progress.ok


def test_an_image_build_names_its_bundle_build_and_manifest() -> None:
    digest = "ab" * 32
    argv = build_image_argv(action="all", manifest_sha256=digest, image_bundle=True, **BASE)
    assert argv[-8:] == [
        "--manifest-sha256", digest,
        "--image-dir", "/var/tmp/amibake/0123456789ab/image",
        "--build-id", "0123456789ab",
        "--no-boot-check",
        "all",
    ]  # fmt: skip
    assert build_image_argv(action="credentials", image_bundle=True, **BASE)[-1] == "credentials"


def test_credentials_go_one_line_per_repository_and_never_a_malformed_one() -> None:
    payload = credentials_payload({"zeta": ("u2", "p 2!'$"), "internal": ("user", "s3cret")})
    assert payload == b"internal\tuser\ts3cret\nzeta\tu2\tp 2!'$\n"
    bad = [
        ("", "Pw-9f2c"),
        ("user-7d", ""),
        ("user-7d", "Pw\tx9"),
        ("user-7d", "Pw\nx9"),
        ("us\r7d", "Pw-9f2c"),
    ]
    for login, password in [*bad, ("user-7d", "Pw\0x9")]:
        with pytest.raises(ParamError) as exc:
            credentials_payload({"internal": (login, password)})
        assert "internal" in str(exc.value)
        assert not any(len(part) > 2 and part in str(exc.value) for part in (login, password))
    with pytest.raises(ParamError, match="repository name"):
        credentials_payload({"../etc": ("u", "p")})
