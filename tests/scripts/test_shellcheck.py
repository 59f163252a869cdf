"""Every box-side script passes shellcheck (following sourced files) and parses as bash."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "include" / "scripts"
ALL = sorted([SCRIPTS / "build-image", SCRIPTS / "instance-check", SCRIPTS / "ec2-guest",
              *SCRIPTS.glob("lib/*.sh"), *SCRIPTS.glob("recipes/*.sh")])


def test_scripts_exist() -> None:
    """The entry point is executable and the libs and both recipes are there."""
    assert (SCRIPTS / "build-image").stat().st_mode & 0o111
    names = {p.name for p in ALL}
    assert {"build-image", "device.sh", "centos7.sh", "debian12.sh", "freeze-guard.sh"} <= names


@pytest.mark.parametrize("script", ALL, ids=lambda p: str(p.relative_to(SCRIPTS)))
def test_shellcheck(script: Path) -> None:
    """shellcheck -x is clean (warnings included)."""
    proc = subprocess.run(
        ["shellcheck", "-x", "-S", "style", script.name], cwd=script.parent, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ALL, ids=lambda p: str(p.relative_to(SCRIPTS)))
def test_bash_syntax(script: Path) -> None:
    """bash -n accepts the file."""
    subprocess.run(["bash", "-n", str(script)], check=True)
