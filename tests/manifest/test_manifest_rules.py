"""The package-list rules (operators/rules/manifest.py): the canonical list and its digest, the same on
the box (lib/verify.sh write_package_list, real bash) and the worker; the diff and its readable block;
the previous AMI of a line; the CycloneDX SBOM, checked with the library's own JSON-schema validator.
Pure: no Airflow, no AWS (images are what DescribeImages returns)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from operators.rules import manifest, naming, records
from operators.rules.contract import CONTRACT
from operators.rules.manifest import ManifestError, Package

SCRIPTS = Path(__file__).resolve().parents[2] / "include" / "scripts"
BASH = Package("bash", 0, "4.2.46", "35.el7_9", "x86_64")
KERNEL = Package("kernel", 0, "3.10.0", "1160.119.1.el7", "x86_64")
OPENSSL = Package("openssl", 1, "1.0.2k", "26.el7_9", "x86_64")
BASE_FILES = Package("base-files", 0, "12.4+deb12u11", "", "amd64")


def _tsv(*packages: Package) -> bytes:
    return "".join(p.line() for p in packages).encode()


# -- the list and its digest --------------------------------------------------------------------------
def test_a_canonical_list_parses_and_its_digest_is_the_files() -> None:
    data = _tsv(*sorted([OPENSSL, BASH, KERNEL], key=Package.line))
    packages = manifest.parse_list(data, sha256=hashlib.sha256(data).hexdigest(), count=3)
    assert packages == [BASH, KERNEL, OPENSSL]
    assert manifest.list_sha256(packages) == hashlib.sha256(data).hexdigest()
    assert manifest.list_sha256([OPENSSL, BASH, KERNEL, BASH]) == manifest.list_sha256(packages)
    assert manifest.from_records(manifest.to_records(packages)) == packages
    assert OPENSSL.evr == "1:1.0.2k-26.el7_9" and BASE_FILES.evr == "12.4+deb12u11"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "empty or its last line has no newline"),
        (b"bash\t0\t4.2.46\t35.el7_9\tx86_64", "no newline"),
        (b"bash\t0\t4.2.46\t35.el7_9\n", "4 tab-separated fields, not 5"),
        (b"bash\t0\t4.2.46\t35.el7_9\tx86_64\textra\n", "6 tab-separated fields"),
        (b"bash\tone\t4.2.46\t35\tx86_64\n", "epoch 'one'"),
        (b"-bash\t0\t4.2.46\t35\tx86_64\n", "name '-bash'"),
        (b"bash;reboot\t0\t4.2.46\t35\tx86_64\n", "name 'bash;reboot'"),
        (b"bash\t0\t4.2 46\t35\tx86_64\n", "version '4.2 46'"),
        (b"bash\t0\t\t35\tx86_64\n", "version ''"),
        (b"bash\t0\t4.2\t3-5\tx86_64\n", "release '3-5'"),
        (b"gpg-pubkey\t0\tf4a80eb5\t53a7ff4b\t(none)\n", r"arch '\(none\)'"),
        (b"bash\t0\t4.2\t35\tx86_64\r\n", "arch 'x86_64\\\\r'"),
        ("bäsh\t0\t4.2\t35\tx86_64\n".encode(), "not ASCII"),
        (_tsv(KERNEL, BASH), "not sorted bytewise and unique"),
        (_tsv(BASH, BASH), "not sorted bytewise and unique"),
    ],
)
def test_anything_but_the_canonical_form_is_refused(data: bytes, error: str) -> None:
    with pytest.raises(ManifestError, match=error):
        manifest.parse_list(data)


def test_the_announced_digest_and_count_must_match() -> None:
    data = _tsv(BASH, KERNEL)
    with pytest.raises(ManifestError, match="not the announced " + "0" * 64):
        manifest.parse_list(data, sha256="0" * 64)
    with pytest.raises(ManifestError, match="2 packages, not the announced 3"):
        manifest.parse_list(data, count=3)


def test_the_packages_event_names_a_list_in_the_box_work_dir() -> None:
    good = f"{CONTRACT.box_work_dir}/vol-0123456789abcdef0/run/{CONTRACT.packages_file}"
    assert manifest.packages_event({"path": good, "count": 3, "sha256": "a" * 64}) == (good, 3, "a" * 64)
    for path in (
        "/etc/shadow",
        f"{CONTRACT.box_work_dir}/../../etc/{CONTRACT.packages_file}",
        f"{CONTRACT.box_work_dir}/x/./{CONTRACT.packages_file}",
        f"{CONTRACT.box_work_dir}/x/run/other.tsv",
        f"{CONTRACT.box_work_dir}/x y/{CONTRACT.packages_file}",
        f"{CONTRACT.box_work_dir}-evil/{CONTRACT.packages_file}",
        None,
    ):
        with pytest.raises(ManifestError, match="packages event: path"):
            manifest.packages_event({"path": path, "count": 3, "sha256": "a" * 64})
    for count in (0, -1, True, "3", CONTRACT.packages_max + 1):
        with pytest.raises(ManifestError, match="packages event: count"):
            manifest.packages_event({"path": good, "count": count, "sha256": "a" * 64})
    with pytest.raises(ManifestError, match="packages event: sha256"):
        manifest.packages_event({"path": good, "count": 3, "sha256": "A" * 64})


def _write_package_list(tmp_path: Path, raw: str) -> subprocess.CompletedProcess[str]:
    """lib/verify.sh's write_package_list, its recipe_list_packages printing ``raw`` (unsorted, as rpm
    and dpkg-query print), in build-image's shell (contract.env, common.sh, LC_ALL=C, errexit)."""
    (tmp_path / "raw").write_text(raw)
    code = (
        f'set -euo pipefail; export LC_ALL=C; . "{SCRIPTS}/contract.env"; . "{SCRIPTS}/lib/common.sh"; '
        f'. "{SCRIPTS}/lib/verify.sh"; RUN_DIR="{tmp_path}"; exec 3>&1; '
        f'recipe_list_packages() {{ cat "{tmp_path}/raw"; }}; write_package_list'
    )
    return subprocess.run(["bash", "-c", code], capture_output=True, text=True)


def test_the_box_writes_the_canonical_list_and_announces_its_digest(tmp_path: Path) -> None:
    """The same bytes, the same digest on both sides: bash's LC_ALL=C sort -u is Python's order."""
    tricky = [
        Package("libstdc++", 0, "4.8.5", "44.el7", "x86_64"),
        Package("libstdc++", 0, "4.8.5", "44.el7", "i686"),
        Package("lib_x", 2, "1~rc1", "1", "x86_64"),
        Package("Lib-x", 0, "1.0", "1", "noarch"),
        Package("lib.x", 0, "1.0", "1", "noarch"),
        Package("kernel", 0, "3.10.0", "1160.2.1.el7", "x86_64"),
        KERNEL,
        BASE_FILES,
        OPENSSL,
    ]
    raw = "".join(p.line() for p in reversed(tricky)) + OPENSSL.line()
    result = _write_package_list(tmp_path, raw)
    assert result.returncode == 0, result.stderr
    written = (tmp_path / CONTRACT.packages_file).read_bytes()
    assert written.decode() == manifest.render_list(tricky)
    event = json.loads("{" + (tmp_path / "packages.event").read_text() + "}")
    path, count, digest = event["path"], event["count"], event["sha256"]
    assert (path, count) == (str(tmp_path / CONTRACT.packages_file), len(tricky))
    assert manifest.parse_list(written, sha256=digest, count=count) == manifest.canonical(tricky)
    assert digest == manifest.list_sha256(tricky)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("", "package list is empty"),
        ("bash\t0\t4.2 46\t35\tx86_64\n", "version '4.2 46' does not match PACKAGE_VERSION_RE"),
        ("bash\t0\t4.2\t35\n", "not 5 tab-separated fields"),
        ("bash\tx\t4.2\t35\tx86_64\n", "epoch 'x' does not match"),
    ],
)
def test_the_box_refuses_a_malformed_list(tmp_path: Path, raw: str, error: str) -> None:
    result = _write_package_list(tmp_path, raw)
    assert result.returncode != 0 and error in result.stderr, result.stderr
    assert not (tmp_path / CONTRACT.packages_file).exists()


# -- what changed -------------------------------------------------------------------------------------
def test_diff_names_updated_added_and_removed_by_name_and_arch() -> None:
    old = [BASH, KERNEL, OPENSSL, Package("gone", 0, "1", "1", "noarch")]
    new = [
        BASH._replace(release="36.el7_9"),
        KERNEL,
        OPENSSL._replace(arch="i686"),  # another architecture is another package
        Package("fresh", 0, "2", "1", "noarch"),
    ]
    changes = manifest.diff(old, new)
    assert changes.updated == (manifest.Update("bash", "x86_64", "4.2.46-35.el7_9", "4.2.46-36.el7_9"),)
    assert changes.added == (Package("fresh", 0, "2", "1", "noarch"), OPENSSL._replace(arch="i686"))
    assert changes.removed == (Package("gone", 0, "1", "1", "noarch"), OPENSSL)
    assert changes.counts() == {"added": 2, "removed": 2, "updated": 1}
    assert manifest.diff(old, list(reversed(old))).none


def test_a_second_kernel_is_added_not_an_update() -> None:
    """installonly packages: one more version side by side is an addition; one replaced by one an update."""
    newer = KERNEL._replace(release="1160.120.1.el7")
    assert manifest.diff([KERNEL], [KERNEL, newer]).added == (newer,)
    assert manifest.diff([KERNEL, newer], [newer]).removed == (KERNEL,)
    assert manifest.diff([KERNEL], [newer]).updated == (
        manifest.Update("kernel", "x86_64", KERNEL.evr, newer.evr),
    )


def test_the_readable_block() -> None:
    changes = manifest.diff([BASH, OPENSSL], [BASH._replace(release="36.el7_9"), KERNEL])
    text = manifest.render_changes(changes, previous_ami="ami-0123456789abcdef0", current_ami="ami-1")
    assert text.splitlines() == [
        "what changed in ami-1 since ami-0123456789abcdef0: 1 updated, 1 added, 1 removed",
        "  updated  bash.x86_64     4.2.46-35.el7_9 -> 4.2.46-36.el7_9",
        "  added    kernel.x86_64   3.10.0-1160.119.1.el7",
        "  removed  openssl.x86_64  1:1.0.2k-26.el7_9",
    ]
    same = manifest.render_changes(manifest.diff([BASH], [BASH]), previous_ami="ami-0")
    assert same.splitlines() == [
        "what changed since ami-0: 0 updated, 0 added, 0 removed",
        "  (the same packages, the same versions)",
    ]


# -- the previous AMI of a line ------------------------------------------------------------------------
T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


def _image(ami_id: str, line: str, days: int, *, state: str = "available", ours: bool = True) -> dict:
    tags = {naming.TAG_IMAGE_LINE: line}
    if ours:
        tags[naming.TAG_BUILD_ID] = ami_id[-12:]
    return {
        "ImageId": ami_id,
        "Name": f"{line}-x",
        "State": state,
        "CreationDate": (T0 + timedelta(days=days)).isoformat().replace("+00:00", ".000Z"),
        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
    }


def test_the_previous_ami_is_the_newest_other_one_of_the_line_not_newer_than_this() -> None:
    images: list[dict[str, Any]] = [
        _image("ami-00000000000000001", "line-a", 0),
        _image("ami-00000000000000002", "line-a", 1),  # the one
        _image("ami-00000000000000003", "line-a", 2),  # this run's
        _image("ami-00000000000000004", "line-a", 3),  # a later night's (this is a re-run)
        _image("ami-00000000000000005", "line-b", 1),  # another line
        _image("ami-00000000000000006", "line-a", 1, state="pending"),
        _image("ami-00000000000000007", "line-a", 1, ours=False),
    ]
    found = manifest.previous_image(images, line="line-a", current_ami="ami-00000000000000003")
    assert found is not None and found["ImageId"] == "ami-00000000000000002"
    assert manifest.previous_image(images[:1], line="line-a", current_ami="ami-00000000000000001") is None


# -- the SBOM ----------------------------------------------------------------------------------------
def test_purls_follow_the_package_url_spec() -> None:
    assert manifest.purl(OPENSSL, "centos7") == "pkg:rpm/centos/openssl@1.0.2k-26.el7_9?arch=x86_64&epoch=1"
    assert manifest.purl(BASH, "centos7") == "pkg:rpm/centos/bash@4.2.46-35.el7_9?arch=x86_64"
    assert manifest.purl(BASE_FILES, "debian12") == "pkg:deb/debian/base-files@12.4%2Bdeb12u11?arch=amd64"
    libc = Package("libc6", 0, "2.36", "9+deb12u14", "amd64")
    assert manifest.purl(libc, "debian12") == "pkg:deb/debian/libc6@2.36-9%2Bdeb12u14?arch=amd64"


@pytest.mark.parametrize(
    ("recipe", "packages"), [("centos7", [BASH, KERNEL, OPENSSL]), ("debian12", [BASE_FILES])]
)
def test_the_sbom_is_valid_cyclonedx_1_6(recipe: str, packages: list[Package]) -> None:
    when = datetime(2026, 11, 30, 2, 14, tzinfo=UTC)
    text = manifest.sbom(
        packages,
        recipe=recipe,
        ami_id="ami-0123456789abcdef0",
        ami_name="amibake-x-20261130-0200-0123456789ab",
        line="amibake-x",
        created=when,
        tool_version="0.1.0",
    )
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text, all_errors=True) is None
    doc = json.loads(text)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6"
    assert doc["metadata"]["component"]["version"] == "ami-0123456789abcdef0"
    assert doc["metadata"]["component"]["type"] == "operating-system"
    assert sorted(c["purl"] for c in doc["components"]) == sorted(manifest.purl(p, recipe) for p in packages)
    assert {c["name"]: c["version"] for c in doc["components"]} == {p.name: p.evr for p in packages}
    again = manifest.sbom(packages, recipe=recipe, ami_id="ami-0123456789abcdef0",
                          ami_name="amibake-x-20261130-0200-0123456789ab", line="amibake-x", created=when,
                          tool_version="0.1.0")  # fmt: skip
    assert again == text  # a retry writes the same document


def test_the_packages_document_round_trips_and_is_checked() -> None:
    text = manifest.packages_document(
        [OPENSSL, BASH], ami_id="ami-0123456789abcdef0", line="l", recipe="centos7"
    )
    assert manifest.read_packages_document(text) == [BASH, OPENSSL]
    body = json.loads(text)
    body["packages"][0]["release"] = "99.el7"
    with pytest.raises(ManifestError, match="do not have the sha256 it states"):
        manifest.read_packages_document(json.dumps(body))


# -- the records -----------------------------------------------------------------------------------
def test_the_build_record_carries_a_canonical_list() -> None:
    build = {
        "volume_id": "vol-0123456789abcdef0",
        "expectations": {"login_user": "admin", "cmdline": "root=UUID=0", "baked_host_keys": [],
                         "require_selinux": False, "checks": []},
        "packages": manifest.to_records([BASH, KERNEL]),
    }  # fmt: skip
    assert records.check("build", build) == build
    for bad in (None, [], list(reversed(build["packages"])), [{**build["packages"][0], "epoch": "0"}]):
        with pytest.raises(records.validation.ParamError, match="^build.packages: "):
            records.check("build", {**build, "packages": bad})


def test_the_manifest_summary_record() -> None:
    summary = {
        "ami_id": "ami-0123456789abcdef0",
        "packages": 412,
        "sha256": "a" * 64,
        "s3_key": "amibake-x/ami-0123456789abcdef0/packages.json",
        "changed": {"added": 1, "removed": 0, "updated": 2},
        "previous_ami": "",
    }
    assert records.check("manifest", summary) == summary
    for field, bad in (
        ("packages", 0),
        ("changed", {"added": 1}),
        ("previous_ami", "ami-x"),
        ("sha256", "x"),
    ):
        with pytest.raises(records.validation.ParamError, match=f"^manifest.{field}: "):
            records.check("manifest", {**summary, field: bad})
