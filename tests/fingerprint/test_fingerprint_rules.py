"""The skip-unchanged rules (operators/rules/fingerprint.py): which metadata a night reads, the
fingerprint of its inputs, and whether it builds. Pure: images are what DescribeImages returns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from operators.rules import fingerprint, naming
from operators.rules.naming import Role

NOW = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)
LINE = "amibake-web"


def _parts(**metadata: bytes | str) -> fingerprint.Fingerprint:
    return fingerprint.parts_of(
        definition_hash="d" * 64,
        scripts_digest="s" * 64,
        recipe_script=b"# recipe\n",
        metadata={f"repo:{k}": v for k, v in (metadata or {"base": b"repomd v1"}).items()},
    )


def _ami(
    ami_id: str,
    built: datetime,
    inputs: fingerprint.Fingerprint | None,
    *,
    verified: bool = True,
    line: str = LINE,
    state: str = "available",
) -> dict[str, Any]:
    tags = naming.resource_tags(
        build="b" * naming.BUILD_ID_LEN,
        dag_id="amibake_web",
        run_id="r",
        recipe="centos7",
        role=Role.AMI,
        created_at=built.isoformat(),
    )
    tags.append({"Key": naming.TAG_IMAGE_LINE, "Value": line})
    if verified:
        tags.append({"Key": naming.TAG_VERIFIED, "Value": naming.VERIFIED})
    if inputs is not None:
        tags += [
            {"Key": naming.TAG_FINGERPRINT, "Value": inputs.digest},
            {"Key": naming.TAG_INPUTS, "Value": inputs.inputs_tag()},
        ]
    return {
        "ImageId": ami_id,
        "Name": f"{line}-x",
        "State": state,
        "CreationDate": built.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "Tags": tags,
    }


def _decide(found: fingerprint.Fingerprint, images: list[dict], **kw: Any) -> fingerprint.Decision:
    return fingerprint.decide(
        found,
        images,
        line=LINE,
        now=NOW,
        rebuild_after_days=kw.get("rebuild_after_days"),
        force=kw.get("force", False),
    )


def test_the_recipes_repositories_on_their_mirror() -> None:
    urls = [s.url for s in fingerprint.recipe_metadata("centos7", "https://vault.centos.org/7.9.2009/")]
    assert urls == [
        "https://vault.centos.org/7.9.2009/os/x86_64/repodata/repomd.xml",
        "https://vault.centos.org/7.9.2009/updates/x86_64/repodata/repomd.xml",
        "https://vault.centos.org/7.9.2009/extras/x86_64/repodata/repomd.xml",
    ]
    debian = {s.name: s.url for s in fingerprint.recipe_metadata("debian12", "http://deb.debian.org/debian")}
    assert debian == {
        "repo:bookworm": "http://deb.debian.org/debian/dists/bookworm/InRelease",
        "repo:bookworm-updates": "http://deb.debian.org/debian/dists/bookworm-updates/InRelease",
        "repo:bookworm-security": "http://deb.debian.org/debian-security/dists/bookworm-security/InRelease",
    }
    assert set(fingerprint.RECIPE_METADATA) == set(naming_recipes())


def naming_recipes() -> tuple[str, ...]:
    from operators.rules.contract import CONTRACT

    return CONTRACT.recipes


def test_a_definitions_repositories_by_family() -> None:
    apt = fingerprint.repository_metadata("tools", "http://repo.example/apt/", "stable", "amibake_repo")
    yum = fingerprint.repository_metadata("epel", "https://mirror.example/epel/7/x86_64", "")
    assert (apt.name, apt.url, apt.connection_id) == (
        "repo:tools",
        "http://repo.example/apt/dists/stable/InRelease",
        "amibake_repo",
    )
    assert yum.url == "https://mirror.example/epel/7/x86_64/repodata/repomd.xml"


def test_every_input_moves_the_digest() -> None:
    base = _parts(base=b"v1")
    assert _parts(base=b"v1").digest == base.digest
    assert _parts(base=b"v2").digest != base.digest
    other = fingerprint.parts_of(
        definition_hash="e" * 64,
        scripts_digest="s" * 64,
        recipe_script=b"# recipe\n",
        metadata={"repo:base": b"v1"},
    )
    assert other.digest != base.digest
    assert len(base.digest) == 64 and base.complete


def test_the_inputs_tag_fits_a_tag_value() -> None:
    many = _parts(**{f"r{i:03d}": b"x" for i in range(40)})
    tag = many.inputs_tag()
    assert len(tag) <= fingerprint.TAG_VALUE_MAX
    assert tag.startswith("definition=dddddddddddd recipe=")


def test_nothing_changed_skips_naming_the_ami_and_when() -> None:
    found = _parts()
    images = [_ami("ami-0000000000000aaaa", NOW - timedelta(days=1), found)]
    decision = _decide(found, images)
    assert not decision.build
    assert decision.ami_id == "ami-0000000000000aaaa"
    assert decision.reason.startswith("unchanged since ami-0000000000000aaaa built 2026-11-29 02:00 UTC: ")
    assert "repo:base=" in decision.reason


def test_a_changed_repository_builds_and_is_named() -> None:
    before = _parts(base=b"v1", updates=b"u1")
    images = [_ami("ami-0000000000000aaaa", NOW - timedelta(days=1), before)]
    decision = _decide(_parts(base=b"v1", updates=b"u2"), images)
    assert decision.build and decision.changed == ("repo:updates",)
    assert "changed since ami-0000000000000aaaa built 2026-11-29 02:00 UTC: repo:updates" in decision.reason


def test_only_the_newest_verified_ami_of_the_line_counts() -> None:
    found = _parts()
    stale = _parts(base=b"old")
    images = [
        _ami("ami-0000000000000aaaa", NOW - timedelta(days=3), found),
        # newer, but its smoke check failed: not the last good one
        _ami("ami-0000000000000bbbb", NOW - timedelta(days=2), stale, verified=False),
        # newer and verified, but another line (another prefix)
        _ami("ami-0000000000000cccc", NOW - timedelta(days=1), stale, line="amibake-other"),
        # newest and verified, but deregistering
        _ami("ami-0000000000000dddd", NOW - timedelta(hours=1), stale, state="deregistered"),
    ]
    decision = _decide(found, images)
    assert (decision.build, decision.ami_id) == (False, "ami-0000000000000aaaa")
    newer = _ami("ami-0000000000000eeee", NOW - timedelta(hours=2), stale)
    assert _decide(found, [*images, newer]).build


def test_no_verified_ami_force_unreadable_and_untagged_all_build() -> None:
    found = _parts()
    assert "no verified AMI of image line amibake-web yet" in _decide(found, []).reason
    images = [_ami("ami-0000000000000aaaa", NOW - timedelta(days=1), found)]
    forced = _decide(found, images, force=True)
    assert forced.build and forced.reason.startswith("force is on")
    blind = _parts(base="https://mirror.example/... answered HTTP 503")
    decision = _decide(blind, images)
    assert decision.build
    assert "cannot tell whether anything changed (repo:base: https://mirror" in decision.reason
    untagged = [_ami("ami-0000000000000aaaa", NOW - timedelta(days=1), None)]
    decision = _decide(found, untagged)
    assert decision.build and "its inputs were not recorded" in decision.reason


@pytest.mark.parametrize(("age_days", "builds"), [(29, False), (30, True), (45, True)])
def test_rebuild_after_builds_an_unchanged_image_once_old_enough(age_days: int, builds: bool) -> None:
    found = _parts()
    images = [_ami("ami-0000000000000aaaa", NOW - timedelta(days=age_days), found)]
    decision = _decide(found, images, rebuild_after_days=30)
    assert decision.build is builds
    if builds:
        assert f"it is {age_days} days old (rebuild_after: 30d)" in decision.reason


def test_rebuild_after_is_read_in_days_from_the_definition() -> None:
    from operators import defaults
    from operators.rules import definition

    example = definition.load(defaults.PACKAGE_IMAGES_DIR / "examples" / "centos7-web.yaml")
    assert example.rebuild_after_days == 30  # rebuild_after: 30d
    assert definition.load(defaults.PACKAGE_IMAGES_DIR / "centos7.yaml").rebuild_after_days is None
