"""Real disks for the build-script tests and benchmarks: a sparse file on a loop device, registered
under a volume id exactly as Nitro udev does, by the rehearsal's EBS emulator itself
(``rehearsal.ebs.attach_image`` / ``detach_image``), plus a runner for ``build-image`` that parses
its progress lines.

Everything made here is undone by ``LoopVolume.close()``, which tests and benchmarks call in a
``finally``: thaw, unmount, detach, remove the by-id link and the file.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from operators.rules.contract import CONTRACT
from rehearsal.ebs import attach_image, detach_image, mounts_of

REPO = Path(__file__).resolve().parents[2]
BUILD_IMAGE = REPO / "include" / "scripts" / "build-image"
PROGRESS_PREFIX = CONTRACT.progress_prefix
#: Every LoopVolume made in this process, so a test session can prove none was left behind.
CREATED: list[LoopVolume] = []


def new_volume_id() -> str:
    """A unique, well-formed EBS volume id (17 hex digits), so parallel runs never collide."""
    return "vol-" + secrets.token_hex(9)[:17]


def byid_link(volume_id: str) -> Path:
    """The Nitro by-id link of a volume id (what udev makes and build-image looks up)."""
    return Path(CONTRACT.nvme_byid_link(volume_id))


def majmin(dev: str) -> str:
    """major:minor of a block device node."""
    st = os.stat(dev)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


@dataclass
class LoopVolume:
    """A sparse file of ``size_gib`` GiB on a loop device, linked under a fresh volume id."""

    size_gib: int
    link: bool = True
    volume_id: str = field(default_factory=new_volume_id)
    tmp: Path = field(init=False)
    image: Path = field(init=False)
    device: str = field(init=False, default="")
    extra_nodes: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"amibake-{self.volume_id}-"))
        CREATED.append(self)
        self.image = self.tmp / "disk.img"
        try:
            with open(self.image, "wb") as f:
                f.truncate(self.size_gib * 1024**3)
            self.device = attach_image(self.image, self.volume_id if self.link else None)
        except BaseException:
            self.close()
            raise

    @property
    def work(self) -> Path:
        """The build-image work directory used for this volume in tests."""
        return self.tmp / "work"

    def partition(self, n: int) -> str:
        """Partition node n of the loop device (loop devices take the ``p`` infix)."""
        return f"{self.device}p{n}"

    def mountpoints(self) -> list[str]:
        """Mount points of the device or any of its partitions, and every mount beneath them."""
        return mounts_of(self.device) if self.device and os.path.exists(self.device) else []

    def teardown(self, recipe: str = "debian12") -> None:
        """Stop the freeze guard and any build on the volume, then remove every trace of it."""
        if self.work.exists():
            for cmd in ("thaw", "abort"):
                subprocess.run(build_image_cmd(self, cmd, recipe=recipe), capture_output=True, timeout=180)
        self.close()

    def close(self) -> None:
        """Thaw, unmount, detach, remove link, extra nodes and files; safe to call twice."""
        for node in self.extra_nodes:
            if os.path.lexists(node):
                os.unlink(node)
        self.extra_nodes.clear()
        detach_image(self.image, self.device, self.volume_id if self.link else None)
        self.device = ""
        link = byid_link(self.volume_id)  # a test may have linked this unique id by hand
        if link.is_symlink():
            link.unlink()
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.tmp)], capture_output=True)


@dataclass
class BuildResult:
    """What one build-image invocation did: exit code, progress events, other stdout, stderr."""

    rc: int
    events: list[dict]
    other_stdout: list[str]
    stderr: str

    def phases(self, event: str) -> list[str]:
        """Phases that emitted the given event, in order."""
        return [e["phase"] for e in self.events if e.get("event") == event]

    @property
    def result(self) -> dict:
        """The final result event."""
        results = [e for e in self.events if e.get("event") == "result"]
        assert results, f"no result event; stderr: {self.stderr}"
        return results[-1]


def parse_output(stdout: str) -> tuple[list[dict], list[str]]:
    """Split build-image stdout into progress events and the other lines (failure log tails)."""
    events, other = [], []
    for line in stdout.splitlines():
        if line.startswith(PROGRESS_PREFIX):
            events.append(json.loads(line[len(PROGRESS_PREFIX):]))
        else:
            other.append(line)
    return events, other


def build_image_cmd(vol: LoopVolume, *args: str, recipe: str = "debian12") -> list[str]:
    """The command line the operator runs, for this volume."""
    return [
        "bash", str(BUILD_IMAGE), "--recipe", recipe, "--volume-id", vol.volume_id,
        "--size-gib", str(vol.size_gib), "--work-dir", str(vol.work), *args,
    ]


def run_build(vol: LoopVolume, *args: str, recipe: str = "debian12", env: dict | None = None,
              timeout: float = 1200, stdin: str = "") -> BuildResult:
    """Run build-image for this volume (``stdin``: what it reads, e.g. credentials) and parse what it
    printed."""
    proc = subprocess.run(
        build_image_cmd(vol, *args, recipe=recipe), capture_output=True, text=True, input=stdin,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )
    events, other = parse_output(proc.stdout)
    return BuildResult(proc.returncode, events, other, proc.stderr)
