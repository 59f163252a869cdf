"""The IAM policy's permission for PublishManifest (docs/iam-policy.json, Sid TagOurAmiWithItsManifest):
CreateTags of the manifest tags (naming.MANIFEST_TAGS) on an AMI carrying our build id, and nothing
more: not on someone else's AMI, not on another resource, not with a key that adopts or verifies.
Judged by the same evaluator that enforces the policy on every request of the suite (rehearsal.iam)."""

from __future__ import annotations

import pytest

from operators.rules import naming
from rehearsal.iam import Authorization, Policy, Resource, load_policy

REGION = "us-east-1"
OURS = {f"aws:ResourceTag/{naming.TAG_BUILD_ID}": ["0123456789ab"]}


def _allowed(kind: str, tags: dict[str, str], resource: dict[str, list[str]]) -> bool:
    request = {f"aws:RequestTag/{k}": [v] for k, v in tags.items()} | {"aws:TagKeys": list(tags)}
    arn = Resource(kind, "x-1").arn(REGION)
    return Policy(load_policy()).decide(Authorization("ec2:CreateTags", arn, request | resource))[0]


MANIFEST = dict.fromkeys(naming.MANIFEST_TAGS, "v")


def test_the_manifest_tags_on_our_ami() -> None:
    assert _allowed("image", MANIFEST, OURS)
    assert _allowed("image", {naming.TAG_PACKAGES_SHA256: "a" * 64}, OURS)


@pytest.mark.parametrize(
    ("kind", "tags", "resource"),
    [
        ("image", MANIFEST, {}),  # someone else's AMI
        ("image", {**MANIFEST, naming.TAG_BUILD_ID: "0123456789ab"}, OURS),  # adopting on the way
        ("image", {**MANIFEST, naming.TAG_VERIFIED: "true"}, OURS),  # verifying on the way
        ("image", {**MANIFEST, "Name": "x"}, OURS),
        ("snapshot", MANIFEST, OURS),
        ("instance", MANIFEST, OURS),
        ("volume", MANIFEST, OURS),
    ],
)
def test_nothing_else(kind: str, tags: dict[str, str], resource: dict[str, list[str]]) -> None:
    assert not _allowed(kind, tags, resource)
