"""Whether a night has anything to build: the fingerprint of its inputs against the newest verified AMI's.

The inputs, all read by the worker before any box exists:

- ``repo:<name>``: sha256 of the metadata file of every repository the image is built from: the
  recipe's own, on the mirror the build uses (:func:`recipe_metadata`), and the definition's
  (:func:`repository_metadata`). That file changes whenever a package of the repository does
  (apt ``InRelease``, yum ``repodata/repomd.xml``);
- ``definition``: the definition's canonical hash, this run's overrides applied;
- ``scripts``: the digest of the SHA256SUMS of everything shipped to the box (``include/scripts``
  and the definition's bundle), the one the box checks;
- ``recipe``: sha256 of the recipe script (also in ``scripts``; named apart because it reads better).

The digest of these parts is tagged on the AMI (``amibake:fingerprint``, with a short form of the
parts in ``amibake:inputs``). A night whose digest is the newest VERIFIED AMI's builds nothing
(:func:`decide`), unless forced, or that AMI is older than the definition's ``rebuild_after``.
A repository the worker cannot read makes the fingerprint incomplete: such a night always builds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from operators.rules import lifecycle, naming
from operators.rules.contract import CONTRACT

#: Metadata files of each recipe's repositories, relative to its mirror (what yum and apt read first).
RECIPE_METADATA: Mapping[str, tuple[tuple[str, str], ...]] = {
    "centos7": (
        ("base", "os/x86_64/repodata/repomd.xml"),
        ("updates", "updates/x86_64/repodata/repomd.xml"),
        ("extras", "extras/x86_64/repodata/repomd.xml"),
    ),
    "debian12": (
        ("bookworm", "dists/bookworm/InRelease"),
        ("bookworm-updates", "dists/bookworm-updates/InRelease"),
    ),
}
#: Debian's security archive sits next to the mirror (``.../debian`` -> ``.../debian-security``).
DEBIAN_SECURITY = ("bookworm-security", "dists/bookworm-security/InRelease")
#: AWS tag values hold at most 256 characters.
TAG_VALUE_MAX = 256
#: Hex digits of each part shown in the ``amibake:inputs`` tag.
SHORT = 12


@dataclass(frozen=True)
class Source:
    """One repository metadata file to fetch; ``connection_id`` names its login, if it needs one."""

    name: str
    url: str
    connection_id: str = ""


@dataclass(frozen=True)
class Fingerprint:
    """The parts (name -> sha256 hex) and what could not be read (name -> why)."""

    parts: Mapping[str, str]
    unreadable: Mapping[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """sha256 of the parts (canonical JSON): the ``amibake:fingerprint`` tag."""
        text = json.dumps(dict(self.parts), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(b"amibake inputs v1\0" + text.encode()).hexdigest()

    @property
    def complete(self) -> bool:
        """Every input was read: only then may a night be skipped."""
        return not self.unreadable

    def inputs_tag(self) -> str:
        """``name=<12 hex> ...``: the parts in the ``amibake:inputs`` tag, as many as fit in a tag."""
        shown = ""
        for name, value in sorted(self.parts.items()):
            item = f"{name}={value[:SHORT]}"
            if len(shown) + len(item) + 1 > TAG_VALUE_MAX:
                break
            shown = f"{shown} {item}" if shown else item
        return shown


@dataclass(frozen=True)
class Decision:
    """Whether to build, why (one line for the log), and the newest verified AMI of the line, if any."""

    build: bool
    reason: str
    ami_id: str = ""
    changed: tuple[str, ...] = ()


def recipe_metadata(recipe: str, mirror: str) -> list[Source]:
    """The recipe's repositories on ``mirror`` (the run's, the definition's or the recipe's default)."""
    base = mirror.rstrip("/")
    sources = [Source(f"repo:{name}", f"{base}/{path}") for name, path in RECIPE_METADATA[recipe]]
    if recipe == "debian12":
        security = base + CONTRACT.debian_security_suffix
        sources.append(Source(f"repo:{DEBIAN_SECURITY[0]}", f"{security}/{DEBIAN_SECURITY[1]}"))
    return sources


def repository_metadata(name: str, base_url: str, suite: str, connection_id: str = "") -> Source:
    """A definition repository's metadata: apt ``dists/<suite>/InRelease``, yum ``repodata/repomd.xml``."""
    base = base_url.rstrip("/")
    path = f"dists/{suite}/InRelease" if suite else "repodata/repomd.xml"
    return Source(f"repo:{name}", f"{base}/{path}", connection_id)


def parts_of(
    *,
    definition_hash: str,
    scripts_digest: str,
    recipe_script: bytes,
    metadata: Mapping[str, bytes | str],
) -> Fingerprint:
    """The fingerprint of one night. ``metadata``: source name (``repo:...``) -> its bytes, or why it
    was unreadable."""
    parts = {
        "definition": definition_hash,
        "scripts": scripts_digest,
        "recipe": hashlib.sha256(recipe_script).hexdigest(),
    }
    unreadable = {}
    for name, body in metadata.items():
        if isinstance(body, bytes):
            parts[name] = hashlib.sha256(body).hexdigest()
        else:
            unreadable[name] = body
    return Fingerprint(parts, unreadable)


def decide(
    fingerprint: Fingerprint,
    images: Sequence[Mapping[str, Any]],
    *,
    line: str,
    now: datetime,
    rebuild_after_days: int | None,
    force: bool,
) -> Decision:
    """Build, or skip because the newest verified AMI of ``line`` (among ``images``) has these inputs."""
    newest = lifecycle.newest_verified(images, line)
    ami_id = newest["ImageId"] if newest else ""
    if force:
        return Decision(True, "force is on: building whatever the inputs", ami_id)
    if not fingerprint.complete:
        why = "; ".join(f"{k}: {v}" for k, v in sorted(fingerprint.unreadable.items()))
        return Decision(True, f"cannot tell whether anything changed ({why}): building", ami_id)
    if newest is None:
        return Decision(True, f"no verified AMI of image line {line} yet: building", ami_id)
    tags = lifecycle.tags_of(newest)
    built = lifecycle.created_at(newest)
    when = built.strftime("%Y-%m-%d %H:%M UTC") if built else "at an unknown time"
    if tags.get(naming.TAG_FINGERPRINT) != fingerprint.digest:
        changed = changed_parts(fingerprint, tags.get(naming.TAG_INPUTS, ""))
        what = ", ".join(changed) if changed else "its inputs were not recorded"
        return Decision(True, f"changed since {ami_id} built {when}: {what}", ami_id, tuple(changed))
    if rebuild_after_days is not None and built is not None:
        age = now - built
        if age >= timedelta(days=rebuild_after_days):
            return Decision(
                True,
                f"unchanged since {ami_id} built {when}, but it is {age.days} days old "
                f"(rebuild_after: {rebuild_after_days}d): building",
                ami_id,
            )
    return Decision(False, f"unchanged since {ami_id} built {when}: {fingerprint.inputs_tag()}", ami_id)


def changed_parts(fingerprint: Fingerprint, inputs_tag: str) -> list[str]:
    """The parts that differ from an AMI's ``amibake:inputs`` tag (added and removed ones included)."""
    before = dict(item.split("=", 1) for item in inputs_tag.split() if "=" in item)
    now = {name: value[:SHORT] for name, value in fingerprint.parts.items()}
    if not before:
        return []
    return sorted(name for name in before.keys() | now.keys() if before.get(name) != now.get(name))
