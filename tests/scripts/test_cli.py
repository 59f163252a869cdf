"""build-image's argument validation and its pure helpers (no root, no disks needed)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from loopdisk import BUILD_IMAGE

from operators.rules import fingerprint
from operators.rules.contract import CONTRACT

SCRIPTS = BUILD_IMAGE.parent
GOOD = ["--recipe", "debian12", "--volume-id", "vol-0123456789abcdef0", "--size-gib", "3"]


def bash_lib(
    code: str, *, env: dict | None = None, libs: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run bash code with contract.env, lib/common.sh (and the given lib or recipe files) sourced."""
    sources = " ".join(f'. "{SCRIPTS / lib}";' for lib in ("contract.env", "lib/common.sh", *libs))
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; {sources} {code}"],
        capture_output=True, text=True, env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--recipe", "fedora", "--volume-id", "vol-0123456789abcdef0", "resolve"], "--recipe"),
        (["--volume-id", "vol-XYZ", "resolve"], "--volume-id"),
        (["--volume-id", "vol-0123456789abcdef0;rm -rf /", "resolve"], "--volume-id"),
        ([*GOOD, "--device-name", "/dev/sda", "resolve"], "--device-name"),
        ([*GOOD, "--device-name", "/dev/sdb", "resolve"], "--device-name"),
        ([*GOOD, "--device-name", "/dev/xvdq", "resolve"], "--device-name"),
        (["--volume-id", "vol-0123456789abcdef0", "--size-gib", "16385", "resolve"], "--size-gib"),
        (["--volume-id", "vol-0123456789", "resolve"], "--volume-id"),
        ([*GOOD, "--mirror", "file:///srv/mirror", "bootstrap"], "--mirror"),
        ([*GOOD, "--mirror", "https://user:secret@host/debian", "bootstrap"], "--mirror"),
        ([*GOOD, "--mirror", "https://host/debian?token=x", "bootstrap"], "--mirror"),
        ([*GOOD, "--mirror", "https://host/debian#frag", "bootstrap"], "--mirror"),
        ([*GOOD, "--device-name", "../../etc/passwd", "resolve"], "--device-name"),
        (["--volume-id", "vol-0123456789abcdef0", "--size-gib", "0", "resolve"], "--size-gib"),
        (["--volume-id", "vol-0123456789abcdef0", "--size-gib", "8x", "resolve"], "--size-gib"),
        ([*GOOD, "--mirror", "ftp://example.org/debian", "bootstrap"], "--mirror"),
        ([*GOOD, "--mirror", "http://host/debian with space", "bootstrap"], "--mirror"),
        ([*GOOD, "--mirror", "http://host/$(reboot)", "bootstrap"], "--mirror"),
        ([*GOOD, "--freeze-timeout", "0", "freeze"], "--freeze-timeout"),
        ([*GOOD, "--boot-timeout", "abc", "bootcheck"], "--boot-timeout"),
        ([*GOOD, "--work-dir", "relative/dir", "resolve"], "--work-dir"),
        ([*GOOD, "--work-dir", "/var/tmp/../etc", "resolve"], "--work-dir"),
        ([*GOOD, "--bogus", "resolve"], "--bogus"),
        ([*GOOD, "partition", "format"], "unknown phase 'format'"),
        ([*GOOD, "mount", "freeze"], "'freeze' must be the only command"),
        (["--volume-id", "vol-0123456789abcdef0", "partition"], "--size-gib is required"),
        (GOOD, "no phase given"),
        ([*GOOD, "--mirror"], "--mirror: missing value"),
    ],
)
def test_bad_input_is_refused_before_anything_is_made(tmp_path: Path, args: list[str], field: str) -> None:
    """Each bad value fails with a one-line error naming it; no work dir, no progress line."""
    work = tmp_path / "work"
    cmd = ["bash", str(BUILD_IMAGE), "--work-dir", str(work), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0
    assert field in proc.stderr, proc.stderr
    assert proc.stderr.startswith("build-image: ")
    assert proc.stdout == ""
    assert not work.exists()


def test_help_lists_every_phase() -> None:
    """--help prints the CLI of docs/architecture.md."""
    cmd = ["bash", str(BUILD_IMAGE), "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for word in ("resolve", "partition", "mkfs", "bootcheck", "freeze", "thaw", "abort", "--volume-id"):
        assert word in out


def test_partition_node_names() -> None:
    """p infix after a trailing digit (nvme, loop), none otherwise (xvd, sd)."""
    proc = bash_lib(
        "for d in /dev/nvme1n1 /dev/loop3 /dev/xvdf /dev/sdf; do partition_node $d 2; done",
        libs=("lib/device.sh",),
    )
    assert proc.stdout.split() == ["/dev/nvme1n1p2", "/dev/loop3p2", "/dev/xvdf2", "/dev/sdf2"]


def test_json_strings_are_escaped() -> None:
    """Progress lines stay valid JSON whatever a path holds."""
    proc = bash_lib("""json_list 'a"b' 'c\\d' $'e\\nf'""")
    assert json.loads(proc.stdout) == ['a"b', "c\\d", "e\nf"]


def test_debian_mirror_from_apt_sources(tmp_path: Path) -> None:
    """The first enabled deb source of the suite wins, in both apt formats; security is found too."""
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian/ bookworm main contrib\n"
    )
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nComponents: main\n"
        "Enabled: no\n\n"
        "Types: deb deb-src\nURIs: http://two.example/debian http://three.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    recipe = ("recipes/debian12.sh",)
    both = bash_lib(f"apt_uri_for_suite bookworm {one_line} {deb822}", libs=recipe).stdout.strip()
    assert both == "http://one.example/debian/"
    only822 = bash_lib(f"apt_uri_for_suite bookworm {deb822}", libs=recipe).stdout.strip()
    assert only822 == "http://two.example/debian"
    sec = bash_lib(f"apt_uri_for_suite bookworm-security {one_line} {deb822}", libs=recipe).stdout.strip()
    assert sec == "http://sec.example/debian-security"
    none = bash_lib(f"MIRROR=; APT_SOURCES=({one_line}); DEBIAN_SUITE=trixie; debian_mirror", libs=recipe)
    assert none.returncode != 0 and "no --mirror" in none.stderr


def test_the_image_takes_security_fixes_from_the_archive_the_fingerprint_reads(tmp_path: Path) -> None:
    """The image's apt sources name the build mirror and its security archive by contract.env's
    DEBIAN_SECURITY_SUFFIX, the archive operators/rules/fingerprint.py reads: a security push there is
    a change (before, the image took the box's own security source, which the fingerprint never saw)."""
    (tmp_path / "etc/apt/sources.list.d").mkdir(parents=True)
    mirror = "http://mirror.example/debian"
    code = f"ROOT={tmp_path}; DEBIAN_SUITE=bookworm; DEBIAN_KEYRING=/k.gpg; write_apt_sources {mirror}/"
    assert bash_lib(code, libs=("recipes/debian12.sh",)).returncode == 0
    stanzas = [dict(line.split(": ", 1) for line in s.splitlines()) for s in
               (tmp_path / "etc/apt/sources.list.d/debian.sources").read_text().split("\n\n")]
    assert [(s["URIs"], s["Suites"]) for s in stanzas] == [
        (mirror, "bookworm bookworm-updates"),
        (f"{mirror}{CONTRACT.debian_security_suffix}", "bookworm-security"),
    ]
    read = {s.name: s.url for s in fingerprint.recipe_metadata("debian12", mirror)}
    assert read["repo:bookworm-security"] == f"{stanzas[1]['URIs']}/dists/bookworm-security/InRelease"


def test_debian_mirror_default_is_this_box() -> None:
    """Without --mirror the recipe uses what this machine's own apt sources use (no host in the code)."""
    proc = bash_lib("MIRROR=; debian_mirror", libs=("recipes/debian12.sh",))
    assert proc.returncode == 0, proc.stderr
    sources = "".join(p.read_text() for p in Path("/etc/apt").glob("sources.list*/**/*") if p.is_file())
    sources += Path("/etc/apt/sources.list").read_text() if Path("/etc/apt/sources.list").exists() else ""
    assert proc.stdout.strip() in sources
    override = bash_lib("MIRROR=http://mirror.test/debian; debian_mirror", libs=("recipes/debian12.sh",))
    assert override.stdout.strip() == "http://mirror.test/debian"


EL7_MKFS_USAGE = """Usage: mkfs.xfs
/* blocksize */         [-b log=n|size=num]
/* metadata */          [-m crc=0|1,finobt=0|1,uuid=xxx]
/* data subvol */       [-d agcount=n,agsize=n,file,name=xxx,size=num,
/* inode size */        [-i log=n|perblock=n|size=num,maxpct=n,attr=0|1|2,
                            projid32bit=0|1,sparse=0|1]
/* naming */            [-n log=n|size=num,version=2|ci,ftype=0|1]
"""


def test_mkfs_options_follow_the_box_mkfs(tmp_path: Path) -> None:
    """On this box every CentOS 7 switch is passed; on an EL7 box only those its mkfs.xfs knows.

    EL7's mkfs.xfs 4.5 cannot run here, so a stand-in prints its usage text (the part the
    recipe reads); the real mkfs.xfs of this machine is the first case.
    """
    recipe = ("lib/device.sh", "lib/disk.sh", "recipes/centos7.sh")
    code = 'mkfs_xfs_options "m:uuid=U" "${RECIPE_MKFS_XFS[@]}"'
    here = bash_lib(code, libs=recipe).stdout.split()
    assert here == [
        "-m", "uuid=U,crc=1,finobt=0,rmapbt=0,reflink=0,bigtime=0,inobtcount=0",
        "-i", "sparse=0,nrext64=0", "-n", "ftype=1",
    ]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mkfs.xfs").write_text(f"#!/bin/sh\ncat <<'EOF' >&2\n{EL7_MKFS_USAGE}EOF\nexit 1\n")
    (fake / "mkfs.xfs").chmod(0o755)
    el7 = bash_lib(code, libs=recipe, env={"PATH": f"{fake}:{os.environ['PATH']}"}).stdout.split()
    assert el7 == ["-m", "uuid=U,crc=1,finobt=0", "-i", "sparse=0", "-n", "ftype=1"]


def test_gpg_fingerprint_check(tmp_path: Path) -> None:
    """The CentOS key check accepts only the expected fingerprint (real gpg, throwaway key)."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    try:
        subprocess.run(
            ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "amibake test <t@example.invalid>",
             "ed25519", "sign", "1d"], check=True, capture_output=True, env=env,
        )
        key = tmp_path / "key.asc"
        subprocess.run(["gpg", "--batch", "--armor", "--output", str(key), "--export"], check=True, env=env)
        colons = subprocess.run(["gpg", "--batch", "--with-colons", "--list-keys"], capture_output=True,
                                text=True, check=True, env=env).stdout
    finally:  # generating the key started a gpg-agent for this home
        subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False)
    fpr = next(line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:"))
    libs = ("recipes/centos7.sh",)
    ok = bash_lib(f"check_gpg_fingerprint {key} {fpr}", libs=libs)
    assert ok.returncode == 0, ok.stderr
    wrong = bash_lib(f'check_gpg_fingerprint {key} "$CENTOS_GPG_FINGERPRINT"', libs=libs)
    assert wrong.returncode != 0
    assert "expected 6341AB2753D78A78A7C27BB124C6A8A7F4A80EB5" in wrong.stderr


def test_mirror_credentials_are_not_repeated(tmp_path: Path) -> None:
    """A refused mirror URL with user:password@ is named without the password (logs, task output)."""
    cmd = ["bash", str(BUILD_IMAGE), "--work-dir", str(tmp_path / "w"), *GOOD,
           "--mirror", "https://user:s3cret@mirror.example.org/debian", "bootstrap"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "--mirror: 'https://***@mirror.example.org/debian' holds credentials" in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout


def test_progress_refuses_an_event_outside_the_contract() -> None:
    """progress only prints events of contract.env: the Airflow side parses exactly those."""
    ok = bash_lib("progress phase-start '\"phase\":\"tools\"' 3>&1")
    assert ok.stdout == 'AMIBAKE {"event":"phase-start","phase":"tools"}\n'
    bad = bash_lib("progress phase-begin 3>&1")
    assert bad.returncode != 0 and "'phase-begin' is not in contract.env PROGRESS_EVENTS" in bad.stderr
