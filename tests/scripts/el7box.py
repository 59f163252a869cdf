"""Recording stand-ins for the EL7 tools build-image runs (yum, rpm, curl, chroot), for tests off EL7.

The one test seam of the box scripts for commands that need an EL7 box: a directory of stand-ins put
first on PATH (``build-image`` itself has no test mode). Each stand-in appends its command line,
quoted, to ``plan.txt`` and then behaves as far as the build needs to go on, as the real tool would:

- ``rpm -E %{?rhel}`` prints 7 when the stand-in box is EL7 (``El7Box(el7=True)``), as on CentOS 7;
- ``curl -o FILE URL`` writes the real CentOS 7 signing key (``data/RPM-GPG-KEY-CentOS-7``, public),
  so the recipe's fingerprint check runs for real;
- ``yum ... install PKG...`` "installs" a package the test offered with :meth:`El7Box.offer` by
  linking its commands into PATH;
- ``chroot ROOT grub2-mkconfig -o CFG`` writes a grub.cfg the way grub-mkconfig's 10_linux does:
  ``root=$GRUB_DEVICE`` when /etc/default/grub sets it, else the device it finds under the root
  (a /dev/loopNpM here, as on a box without /dev/disk/by-uuid). ``ignore_grub_device=True`` makes it
  fall back always, so a test can prove the recipe's root=UUID check fails the build.

What this cannot prove (it needs an EL7 box): that yum resolves the package set, that the commands
recorded in the plan succeed there.
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"

STUB = r"""#!/bin/bash
# Recording stand-in (tests/scripts/el7box.py): never part of the product.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
name=${0##*/}
printf -v line '%q ' "$name" "$@"
printf '%s\n' "${line% }" >>"$here/plan.txt"
case $name in
rpm)
    if [[ ${1:-} == -E ]]; then
        cat "$here/rhel" 2>/dev/null || echo
    fi
    ;;
curl)
    while (($#)); do
        if [[ $1 == -o ]]; then cp "$here/key.asc" "$2"; shift; fi
        shift
    done
    ;;
yum)
    [[ " $* " == *" install "* ]] || exit 0
    for pkg in "$@"; do
        if [[ -d $here/packages/$pkg ]]; then
            ln -sf "$here/packages/$pkg"/* "$here/bin/"
        fi
    done
    ;;
chroot)
    root=$1
    shift
    if [[ ${1:-} == grub*-mkconfig && ${2:-} == -o ]]; then
        GRUB_DEVICE=""
        GRUB_CMDLINE_LINUX=""
        # shellcheck disable=SC1091
        . "$root/etc/default/grub"
        [[ ! -e $here/ignore-grub-device ]] || GRUB_DEVICE=""
        dev=${GRUB_DEVICE:-$(findmnt -no SOURCE "$root")}
        for kdir in "$root"/lib/modules/*; do
            kver=${kdir##*/}
            entry="menuentry 'CentOS Linux (%s)' {\n\tlinux16 /vmlinuz-%s root=%s ro %s\n"
            printf "$entry\tinitrd16 /initramfs-%s.img\n}\n" \
                "$kver" "$kver" "$dev" "$GRUB_CMDLINE_LINUX" "$kver"
        done >"$root$3"
    fi
    ;;
esac
"""

TOOLS = ("yum", "rpm", "curl", "chroot")


@dataclass
class El7Box:
    """A stand-in directory under ``tmp``: ``bin/`` goes first on PATH, ``plan.txt`` records."""

    tmp: Path
    el7: bool = False
    ignore_grub_device: bool = False
    hide: tuple[str, ...] = ()
    dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir = self.tmp / "el7box"
        (self.dir / "bin").mkdir(parents=True)
        stub = self.dir / "stub"
        stub.write_text(STUB)
        stub.chmod(0o755)
        for tool in TOOLS:
            (self.dir / "bin" / tool).symlink_to(stub)
        shutil.copy(DATA / "RPM-GPG-KEY-CentOS-7", self.dir / "key.asc")
        if self.el7:
            (self.dir / "rhel").write_text("7\n")
        if self.ignore_grub_device:
            (self.dir / "ignore-grub-device").touch()
        if self.hide:
            self._path_without(self.hide)

    def _path_without(self, hidden: tuple[str, ...]) -> None:
        """``path/``: every command of this PATH except ``hidden`` (what a box without them has)."""
        path_dir = self.dir / "path"
        path_dir.mkdir()
        for d in os.environ["PATH"].split(os.pathsep):
            if not os.path.isdir(d):
                continue
            for entry in os.scandir(d):
                target = path_dir / entry.name
                if entry.name in hidden or target.exists() or not os.access(entry.path, os.X_OK):
                    continue
                target.symlink_to(entry.path)

    def offer(self, package: str, *commands: str) -> None:
        """Let the stand-in yum install ``package``, which brings ``commands`` (this machine's)."""
        pkg_dir = self.dir / "packages" / package
        pkg_dir.mkdir(parents=True)
        for command in commands:
            real = shutil.which(command)
            assert real, f"{command} is not on this machine"
            (pkg_dir / command).symlink_to(real)

    @property
    def env(self) -> dict[str, str]:
        """Environment for build-image: the stand-ins first, then this PATH (minus hidden tools)."""
        rest = str(self.dir / "path") if self.hide else os.environ["PATH"]
        return {"PATH": f"{self.dir / 'bin'}{os.pathsep}{rest}"}

    def plan(self) -> list[list[str]]:
        """The recorded command lines, split."""
        path = self.dir / "plan.txt"
        if not path.exists():
            return []
        return [shlex.split(line) for line in path.read_text().splitlines()]
