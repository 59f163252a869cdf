"""Fixtures for the build-script tests: real loop devices registered under volume ids.

Every volume made here is torn down even when its test fails (thaw, abort the build, unmount,
detach, unlink), and the session ends by checking that none of them left a loop device, a mount,
a by-id link or a process behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loopdisk import CREATED, LoopVolume, byid_link  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip root-only tests when not root (loop devices and mounts need it)."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: loop devices and mounts")
    for item in items:
        if "root" in item.keywords and str(item.fspath).startswith(str(Path(__file__).parent)):
            item.add_marker(skip)


@pytest.fixture
def make_volume() -> Iterator[Callable[..., LoopVolume]]:
    """Factory: ``make_volume(size_gib=1, link=True)`` -> a LoopVolume removed after the test."""
    made: list[LoopVolume] = []

    def make(size_gib: int = 1, link: bool = True) -> LoopVolume:
        vol = LoopVolume(size_gib=size_gib, link=link)
        made.append(vol)
        return vol

    yield make
    for vol in made:
        vol.teardown()


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the session: no loop device, mount, by-id link or process of our volumes remains."""
    yield
    if not CREATED:
        return
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    mounts = Path("/proc/self/mountinfo").read_text()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    for vol in CREATED:
        assert str(vol.tmp) not in loops, f"loop device left for {vol.tmp}"
        assert str(vol.tmp) not in mounts, f"mount left under {vol.tmp}"
        assert not byid_link(vol.volume_id).is_symlink(), f"by-id link left for {vol.volume_id}"
        assert not vol.tmp.exists(), f"temp dir {vol.tmp} left"
        assert str(vol.tmp) not in ps, f"process left using {vol.tmp}"

