"""Names and tags of everything amibake creates.

This module is the one place for these rules: operators, teardowns, the sweeper and AMI
rotation all import them, so a resource made by one is always found by the others.
Pure Python, no Airflow import, so the rules can be tested (and used by tools) on their own.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from enum import StrEnum

TAG_BUILD_ID = "amibake:build-id"
TAG_DAG_ID = "amibake:dag-id"
TAG_RUN_ID = "amibake:run-id"
TAG_RECIPE = "amibake:recipe"
TAG_ROLE = "amibake:role"
TAG_CREATED_AT = "amibake:created-at"
TAG_SNAPSHOT_ID = "amibake:snapshot-id"
#: The AMI name prefix, set on every AMI at registration: rotation retires AMIs of one line only.
TAG_IMAGE_LINE = "amibake:image-line"
#: Set on an AMI once a smoke instance launched from it passed every first-boot check
#: (``operators.smoke``); rotation counts only AMIs carrying it with :data:`VERIFIED`.
TAG_VERIFIED = "amibake:verified"
VERIFIED = "true"
#: On a copy of an AMI in another region (``operators.distribute``): the AMI it was copied from and
#: that AMI's region. A rerun finds its copies by them, and rotation retires them with their source.
TAG_SOURCE_AMI = "amibake:source-ami"
TAG_SOURCE_REGION = "amibake:source-region"
#: The digest of the inputs an AMI was built from, and a short form of each input
#: (``operators.rules.fingerprint``): a night with the newest verified AMI's digest builds nothing.
TAG_FINGERPRINT = "amibake:fingerprint"
TAG_INPUTS = "amibake:inputs"

#: What is in an AMI and where it came from, tagged on it by ``operators.manifest`` (PublishManifest):
#: the sha256 of its package list (``operators.rules.manifest``), the amibake version and the git commit
#: of the shipped scripts that built it, the image definition's hash, the Airflow run's URL (when
#: ``[api] base_url`` is set) and, with ``[amibake] manifest_bucket``, the S3 folder of its
#: ``packages.json`` and ``sbom.cdx.json`` (``s3://bucket/<image line>/<ami id>/``).
TAG_PACKAGES_SHA256 = "amibake:packages-sha256"
TAG_VERSION = "amibake:version"
TAG_SCRIPTS_COMMIT = "amibake:scripts-commit"
TAG_DEFINITION_SHA256 = "amibake:definition-sha256"
TAG_RUN_URL = "amibake:run-url"
TAG_MANIFEST = "amibake:manifest"
#: The tags PublishManifest adds to an existing AMI of ours (the IAM policy allows these keys only).
MANIFEST_TAGS = (
    TAG_PACKAGES_SHA256,
    TAG_VERSION,
    TAG_SCRIPTS_COMMIT,
    TAG_DEFINITION_SHA256,
    TAG_RUN_URL,
    TAG_MANIFEST,
)

#: AWS allows these characters in an AMI name, 3 to 128 of them.
AMI_NAME_RE = re.compile(r"^[A-Za-z0-9()\[\] ./'@_-]{3,128}$")
#: Longest prefix we accept, so prefix + "-YYYYMMDD-HHMM-" + build id stays within 128.
AMI_PREFIX_MAX = 96
BUILD_ID_LEN = 12


class Role(StrEnum):
    """What a tagged resource is for; the value of the ``amibake:role`` tag."""

    BUILD_BOX = "build-box"
    BUILD_SG = "build-sg"
    CANVAS = "canvas"
    SNAPSHOT = "snapshot"
    AMI = "ami"
    SMOKE = "smoke-instance"


def build_id(dag_id: str, run_id: str) -> str:
    """Stable id of one build: every try of every task of a run computes the same one."""
    return hashlib.sha256(f"{dag_id}/{run_id}".encode()).hexdigest()[:BUILD_ID_LEN]


def utc_now_iso() -> str:
    """Creation time as written into the ``amibake:created-at`` tag."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def resource_tags(
    *, build: str, dag_id: str, run_id: str, recipe: str, role: Role, created_at: str | None = None
) -> list[dict[str, str]]:
    """The tags every resource of a build carries, in EC2's ``[{"Key", "Value"}]`` form."""
    return [
        {"Key": "Name", "Value": resource_name(build, role)},
        {"Key": TAG_BUILD_ID, "Value": build},
        {"Key": TAG_DAG_ID, "Value": dag_id},
        {"Key": TAG_RUN_ID, "Value": run_id},
        {"Key": TAG_RECIPE, "Value": recipe},
        {"Key": TAG_ROLE, "Value": str(role)},
        {"Key": TAG_CREATED_AT, "Value": created_at or utc_now_iso()},
    ]


def tag_specification(resource_type: str, tags: list[dict[str, str]]) -> dict:
    """One ``TagSpecifications`` entry, so tags are set atomically at creation."""
    return {"ResourceType": resource_type, "Tags": tags}


def build_filters(build: str, role: Role) -> list[dict]:
    """EC2 ``Filters`` that find the resources of one role of one build."""
    return [
        {"Name": f"tag:{TAG_BUILD_ID}", "Values": [build]},
        {"Name": f"tag:{TAG_ROLE}", "Values": [str(role)]},
    ]


def project_filters(role: Role | None = None) -> list[dict]:
    """EC2 ``Filters`` that find every resource made by amibake (any build), of one role if given."""
    ours = [{"Name": "tag-key", "Values": [TAG_BUILD_ID]}]
    return ours if role is None else [*ours, {"Name": f"tag:{TAG_ROLE}", "Values": [str(role)]}]


def tags_to_dict(tags: list[dict[str, str]] | None) -> dict[str, str]:
    """EC2's tag list as a plain dict."""
    return {t["Key"]: t["Value"] for t in tags or []}


def resource_name(build: str, role: Role) -> str:
    """The ``Name`` tag (and, for the security group, the group name) of a build's resource."""
    return f"amibake-{build}-{role}"


#: What :func:`ami_name` makes: ``<prefix>-YYYYMMDD-HHMM-<build id>``.
AMI_NAME_PARTS_RE = re.compile(rf"^(?P<prefix>.+)-\d{{8}}-\d{{4}}-[0-9a-f]{{{BUILD_ID_LEN}}}$")


def image_line(tags: dict[str, str], name: str) -> str:
    """The image line of an AMI: its ``amibake:image-line`` tag, else the prefix of its amibake name
    (AMIs registered before the tag existed); '' when it is neither."""
    if tags.get(TAG_IMAGE_LINE):
        return tags[TAG_IMAGE_LINE]
    match = AMI_NAME_PARTS_RE.fullmatch(name or "")
    return match.group("prefix") if match else ""


def ami_name(prefix: str, run_after: datetime, build: str) -> str:
    """AMI name: prefix + UTC date and time of the run + build id, unique per run."""
    when = run_after.astimezone(UTC).strftime("%Y%m%d-%H%M")
    name = f"{prefix}-{when}-{build}"
    if not AMI_NAME_RE.fullmatch(name):
        raise ValueError(f"ami name {name!r} is not a valid AMI name")
    return name
