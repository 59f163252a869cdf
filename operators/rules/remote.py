"""Command lines run on the build box, and parsing of its ``AMIBAKE {json}`` progress lines.

Pure Python, no Airflow import. Every value that reaches the remote shell goes through
``shlex.join`` as its own argument: nothing is interpolated into a shell string.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from operators import defaults
from operators.rules.contract import CONTRACT
from operators.rules.validation import (
    DEVICE_NAME_RE,
    VOLUME_ID_RE,
    ParamError,
    validate_mirror_url,
    validate_size,
    validate_whole,
)

PROGRESS_PREFIX = CONTRACT.progress_prefix
# The events and statuses read below; CONTRACT.event() fails at import on a name the box never emits.
PHASE_START, PHASE_END, PHASE_FAIL = (CONTRACT.event(e) for e in ("phase-start", "phase-end", "phase-fail"))
FROZEN, RESULT = CONTRACT.event("frozen"), CONTRACT.event("result")
# From inside the bootcheck phase: one per boot stage (with its seconds), one per instance-check item.
BOOT_STAGE, CHECK = CONTRACT.event("boot-stage"), CONTRACT.event("check")
CHECK_FAIL = "FAIL"
#: Once per successful build, after the verify phase: what instance-check must be told about the image.
EXPECTATIONS = CONTRACT.event("expectations")
#: Right after it: where the image's package list is on the box, its count and sha256.
PACKAGES = CONTRACT.event("packages")
STATUS_OK, STATUS_FAIL = CONTRACT.status("ok"), CONTRACT.status("fail")
#: The digest of the shipped SHA256SUMS (``--manifest-sha256``).
SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: ``credentials`` reads the image's repository credentials from stdin (never argv) for ``all``.
ACTIONS = ("all", "freeze", "thaw", "umount", "abort", "credentials")


def remote_dir(build: str) -> str:
    """Per-build directory on the box."""
    return f"{CONTRACT.box_work_dir}/{build}"


def remote_scripts_dir(build: str) -> str:
    """Where ``include/scripts`` is shipped on the box."""
    return f"{remote_dir(build)}/scripts"


def remote_image_dir(build: str) -> str:
    """Where the image definition's bundle (image.env, files, scripts, keys, checks) is shipped."""
    return f"{remote_dir(build)}/image"


def build_image_argv(
    *,
    build: str,
    action: str,
    volume_id: str,
    recipe: str,
    device_name: str,
    size_gib: int,
    mirror_url: str = "",
    boot_check: bool = False,
    freeze_timeout: int | None = None,
    manifest_sha256: str = "",
    image_bundle: bool = False,
    sudo: bool = False,
) -> list[str]:
    """argv of one ``build-image`` call (validated again here: this is the last stop before a shell)."""
    if action not in ACTIONS:
        raise ParamError("action", f"must be one of {', '.join(ACTIONS)}, got {action!r}")
    if not VOLUME_ID_RE.fullmatch(volume_id):
        raise ParamError("volume_id", f"must be a volume id like vol-0123456789abcdef0, got {volume_id!r}")
    if recipe not in CONTRACT.recipes:
        raise ParamError("recipe", f"must be one of {', '.join(CONTRACT.recipes)}, got {recipe!r}")
    if not DEVICE_NAME_RE.fullmatch(device_name):
        raise ParamError(
            "device_name", f"must match {DEVICE_NAME_RE.pattern} (AWS's EBS names), got {device_name!r}"
        )
    argv = ["sudo", "-n"] if sudo else []
    argv += [
        "bash",
        f"{remote_scripts_dir(build)}/{defaults.BUILD_ENTRY_POINT}",
        "--recipe",
        recipe,
        "--volume-id",
        volume_id,
        "--device-name",
        device_name,
        "--size-gib",
        str(validate_size(size_gib)),
    ]
    if mirror_url:
        argv += ["--mirror", validate_mirror_url(mirror_url)]
    if manifest_sha256:
        if not SHA256_RE.fullmatch(manifest_sha256):
            raise ParamError("manifest_sha256", f"must be 64 lower-case hex digits, got {manifest_sha256!r}")
        argv += ["--manifest-sha256", manifest_sha256]
    if image_bundle:
        argv += ["--image-dir", remote_image_dir(build), "--build-id", build]
    if action == "all":
        argv.append("--boot-check" if boot_check else "--no-boot-check")
    if freeze_timeout is not None:
        low, high = CONTRACT.freeze_timeout_min_s, CONTRACT.freeze_timeout_max_s
        argv += ["--freeze-timeout", str(validate_whole("freeze_timeout", freeze_timeout, low, high, " s"))]
    argv.append(action)
    return argv


def build_image_command(**kwargs: Any) -> str:
    """The same as :func:`build_image_argv`, quoted into one shell command line."""
    return shlex.join(build_image_argv(**kwargs))


def parse_progress(line: str) -> dict[str, Any] | None:
    """The event of an ``AMIBAKE {json}`` line, or None for any other line (or malformed JSON)."""
    text = line.strip()
    if not text.startswith(PROGRESS_PREFIX):
        return None
    try:
        event = json.loads(text[len(PROGRESS_PREFIX) :])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


@dataclass
class BuildProgress:
    """What the progress lines of one ``build-image`` run said so far."""

    current_phase: str | None = None
    finished: dict[str, float] = field(default_factory=dict)
    failed_phase: str | None = None
    failed_rc: int | None = None
    failed_log: str | None = None
    result: dict[str, Any] | None = None
    frozen: list[str] = field(default_factory=list)
    boot_stages: dict[str, float] = field(default_factory=dict)
    checks: dict[str, tuple[str, str]] = field(default_factory=dict)
    expectations: dict[str, Any] | None = None
    packages: dict[str, Any] | None = None

    def feed(self, line: str) -> dict[str, Any] | None:
        """Take one output line; return its event if it was a progress line."""
        event = parse_progress(line)
        if event is None:
            return None
        kind = event.get("event")
        phase = event.get("phase")
        if kind == PHASE_START:
            self.current_phase = phase
        elif kind == PHASE_END:
            self.finished[str(phase)] = float(event.get("seconds", 0.0))
            self.current_phase = None
        elif kind == PHASE_FAIL:
            self.failed_phase, self.failed_rc, self.failed_log = phase, event.get("rc"), event.get("log")
            self.current_phase = None
        elif kind == FROZEN:
            self.frozen = list(event.get("mountpoints", []))
        elif kind == BOOT_STAGE:
            self.boot_stages[str(event.get("stage"))] = float(event.get("seconds", 0.0))
        elif kind == CHECK:
            self.checks[str(event.get("item"))] = (str(event.get("status")), str(event.get("detail", "")))
        elif kind == EXPECTATIONS:
            self.expectations = {k: v for k, v in event.items() if k != "event"}
        elif kind == PACKAGES:
            self.packages = {k: v for k, v in event.items() if k != "event"}
        elif kind == RESULT:
            self.result = event
            if event.get("status") == STATUS_FAIL:
                self.failed_phase = event.get("phase", self.failed_phase)
                self.failed_rc = event.get("rc", self.failed_rc)
        return event

    @property
    def ok(self) -> bool:
        """True once the run reported ``result: ok``."""
        return bool(self.result and self.result.get("status") == STATUS_OK)

    @property
    def failed_checks(self) -> list[str]:
        """Boot-check items that failed, in the order they were reported."""
        return [item for item, (status, _) in self.checks.items() if status == CHECK_FAIL]

    def failure(self, exit_code: int) -> str:
        """A one-line explanation of a failed run, naming the phase and the exit code."""
        phase = self.failed_phase or self.current_phase or "unknown (no phase reported)"
        rc = self.failed_rc if self.failed_rc is not None else exit_code
        where = f"; full log on the box: {self.failed_log}" if self.failed_log else ""
        checks = f"; failed checks: {', '.join(self.failed_checks)}" if self.failed_checks else ""
        return f"build-image failed in phase {phase!r} with exit code {rc}{checks}{where}"


def read_file_argv(path: str, *, sudo: bool) -> list[str]:
    """argv that prints one file of the box (as root through ``sudo -n`` when the login is not root:
    the build's files are root's)."""
    return [*(["sudo", "-n"] if sudo else []), "cat", "--", path]


def instance_check_argv(expectations: dict[str, Any]) -> list[str]:
    """argv of ``instance-check`` run as root from its text on stdin (``sudo -n bash -s -- ...``),
    with the build's expectations (``records.Expectations``): the same arguments the boot check gives."""
    argv = ["sudo", "-n", "bash", "-s", "--", "--expect-cmdline", str(expectations["cmdline"])]
    for fingerprint in expectations["baked_host_keys"]:
        argv += ["--baked-host-key", str(fingerprint)]
    if expectations["require_selinux"]:
        argv.append("--require-selinux")
    for check in expectations["checks"]:
        argv += ["--check", str(check["name"]), str(check["command"])]
    return argv


#: What ``instance-check`` prints per item: ``amibake-check: <item>: <status>: <detail>``.
CHECK_LINE_PREFIX = "amibake-check: "
#: Its last line's item.
CHECK_DONE = "done"


def parse_check_lines(lines: list[str]) -> tuple[dict[str, tuple[str, str]], bool]:
    """instance-check's output as {item: (status, detail)} in order, and whether it reached ``done``."""
    items: dict[str, tuple[str, str]] = {}
    done = False
    for line in lines:
        text = line.rstrip("\r")
        if not text.startswith(CHECK_LINE_PREFIX):
            continue
        item, _, rest = text[len(CHECK_LINE_PREFIX) :].partition(": ")
        if item == CHECK_DONE:
            done = True
            continue
        status, _, detail = rest.partition(": ")
        items[item] = (status, detail)
    return items, done


def credentials_payload(credentials: dict[str, tuple[str, str]]) -> bytes:
    """stdin of ``build-image credentials``: one ``REPO<TAB>LOGIN<TAB>PASSWORD`` line per repository.

    Refuses (naming the repository, never the secret) a login or password that is empty or holds a
    tab, a line break or a NUL: the line format could not carry it, and the box would refuse it too.
    """
    lines = []
    for repo, (login, password) in sorted(credentials.items()):
        if not CONTRACT.repo_name_re.fullmatch(repo):
            raise ParamError("repositories", f"{repo!r} is not a repository name")
        for what, value in (("login", login), ("password", password)):
            if not value or any(c in value for c in "\t\r\n\0"):
                raise ParamError(
                    "repositories",
                    f"the {what} of repository {repo!r} is empty or holds a tab, line break or NUL",
                )
        lines.append(f"{repo}\t{login}\t{password}\n")
    return "".join(lines).encode()
