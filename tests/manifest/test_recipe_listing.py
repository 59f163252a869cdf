"""Each recipe's ``recipe_list_packages`` (include/scripts/recipes/*.sh), the box-side source of the
image's package list, run by bash as build-image runs it.

debian12 runs for real against a real dpkg database: this Debian 12 machine's own, read through
``chroot / dpkg-query`` exactly as the build reads the image's (the whole-image check is in
tests/scripts/test_debian12.py). centos7 runs against a stand-in ``rpm`` on PATH: no CentOS package,
rpm database or EL7 rpm is reachable here, so the stand-in answers the query the way rpm 4.11 does
(its ``--qf`` format applied to a fixed table, gpg-pubkey entries included) and records its argv."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from operators.rules import manifest
from operators.rules.manifest import Package

SCRIPTS = Path(__file__).resolve().parents[2] / "include" / "scripts"


def _list(recipe: str, root: str, env: dict[str, str] | None = None) -> str:
    code = (
        f'set -euo pipefail; export LC_ALL=C; . "{SCRIPTS}/contract.env"; . "{SCRIPTS}/lib/common.sh"; '
        f'. "{SCRIPTS}/recipes/{recipe}.sh"; ROOT="{root}"; recipe_list_packages'
    )
    result = subprocess.run(["bash", "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.root
def test_debian12_lists_the_installed_packages_of_dpkgs_database() -> None:
    """Every "ii" package of the database, its [epoch:]upstream[-revision] split so that the full
    version is dpkg's own; packages in another state (removed, config files left) are not listed."""
    listed = manifest.parse_list(manifest.render_list(
        manifest.package(*line.split("\t")) for line in _list("debian12", "/").splitlines()
    ).encode())  # fmt: skip
    dpkg = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    installed = {(n, a): v for s, n, v, a in (row.split("\t") for row in dpkg) if s.startswith("ii")}
    assert {p.key: p.evr for p in listed} == installed
    assert any(p.epoch for p in listed), "no package with an epoch on this machine to check the split"
    assert any(not p.release for p in listed), "no native package (no revision) to check the split"
    assert len(listed) == len(installed)


def test_centos7_asks_rpm_for_the_images_database_and_leaves_out_gpg_keys(tmp_path: Path) -> None:
    """A stand-in rpm (see the module docstring): the query is rpm's, against the image's root."""
    table = [
        ("bash", "0", "4.2.46", "35.el7_9", "x86_64"),
        ("gpg-pubkey", "0", "f4a80eb5", "53a7ff4b", "(none)"),
        ("openssl-libs", "1", "1.0.2k", "26.el7_9", "x86_64"),
        ("kernel", "0", "3.10.0", "1160.119.1.el7", "x86_64"),
    ]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rows = "\n".join("\t".join(row) for row in table)
    (bin_dir / "rpm").write_text(
        "#!/usr/bin/env python3\n"
        "import sys\n"
        f"open({str(tmp_path / 'argv')!r}, 'w').write('\\0'.join(sys.argv[1:]))\n"
        "fmt = sys.argv[sys.argv.index('--qf') + 1]\n"
        f"for row in {rows!r}.split('\\n'):\n"
        "    n, e, v, r, a = row.split('\\t')\n"
        "    out = fmt\n"
        "    for tag, val in (('NAME', n), ('EPOCHNUM', e), ('VERSION', v), ('RELEASE', r), ('ARCH', a)):\n"
        "        out = out.replace('%{' + tag + '}', val)\n"
        "    sys.stdout.write(out.replace('\\\\t', '\\t').replace('\\\\n', '\\n'))\n"
    )
    (bin_dir / "rpm").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = _list("centos7", "/var/tmp/amibake/vol-0123456789abcdef0/root", env)
    argv = (tmp_path / "argv").read_text().split("\0")
    assert argv == ["--root", "/var/tmp/amibake/vol-0123456789abcdef0/root", "-qa", "--qf",
                    "%{NAME}\\t%{EPOCHNUM}\\t%{VERSION}\\t%{RELEASE}\\t%{ARCH}\\n"]  # fmt: skip
    assert [manifest.package(*line.split("\t")) for line in out.splitlines()] == [
        Package("bash", 0, "4.2.46", "35.el7_9", "x86_64"),
        Package("openssl-libs", 1, "1.0.2k", "26.el7_9", "x86_64"),
        Package("kernel", 0, "3.10.0", "1160.119.1.el7", "x86_64"),
    ]
