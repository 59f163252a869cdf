"""What is in an image and what changed: its package list, the list's digest, the diff between two
lists, and a CycloneDX SBOM of it. Pure Python, no Airflow or boto import.

The list comes from the box (``build-image``'s verify phase, ``recipe_list_packages`` of the recipe:
rpm or dpkg in the image) as ``contract.env``'s ``PACKAGES_FILE`` format: one
``NAME<TAB>EPOCH<TAB>VERSION<TAB>RELEASE<TAB>ARCH`` line per package, sorted bytewise and unique. That
text is the canonical form: its sha256 is the list's digest (the ``amibake:packages-sha256`` tag), and
:func:`parse_list` accepts nothing else, so the digest the box reported, the worker checked and the AMI
carries is one value.

A change is judged per package name + architecture (old and new are by time, no version ordering):
a key in one list only is added or removed; a key whose versions differ is updated (old -> new) when it
had one version on each side, else its vanished versions count as removed and its new ones as added
(installonly packages such as several kernels side by side).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from operators.rules import lifecycle
from operators.rules.contract import CONTRACT

#: Fields of one line, in order (also the keys of a package's XCom / JSON form).
FIELDS = ("name", "epoch", "version", "release", "arch")
#: purl type and namespace of each recipe's packages (package-url spec: ``rpm`` / ``deb`` types).
PURL_OF_RECIPE = {"centos7": ("rpm", "centos"), "debian12": ("deb", "debian")}
#: The longest line contract.env's field patterns allow (128 + 10 + 128 + 128 + 32 and 5 separators).
MAX_LINE_BYTES = 431
#: Only a path in the box's work dir, of safe characters, may be named by the packages event.
_BOX_PATH_RE = re.compile(r"/[A-Za-z0-9._/-]+")


class ManifestError(ValueError):
    """A package list, its digest or the event announcing it is malformed."""


class Package(NamedTuple):
    """One installed package; ``release`` is '' for a Debian native package."""

    name: str
    epoch: int
    version: str
    release: str
    arch: str

    @property
    def key(self) -> tuple[str, str]:
        """What a diff matches packages by: name and architecture."""
        return (self.name, self.arch)

    @property
    def evr(self) -> str:
        """``[epoch:]version[-release]``: how rpm and dpkg both write a full version."""
        epoch = f"{self.epoch}:" if self.epoch else ""
        release = f"-{self.release}" if self.release else ""
        return f"{epoch}{self.version}{release}"

    def line(self) -> str:
        """The package's line of the canonical list (with its newline)."""
        return f"{self.name}\t{self.epoch}\t{self.version}\t{self.release}\t{self.arch}\n"

    def as_record(self) -> dict[str, Any]:
        """JSON / XCom form."""
        return dict(zip(FIELDS, self, strict=True))


def package(name: str, epoch: Any, version: str, release: str, arch: str) -> Package:
    """A checked :class:`Package` (contract.env's rules for each field), or ManifestError naming it."""
    text_epoch = str(epoch) if isinstance(epoch, int) and not isinstance(epoch, bool) else epoch
    checks = (
        ("name", name, CONTRACT.package_name_re),
        ("epoch", text_epoch, CONTRACT.package_epoch_re),
        ("version", version, CONTRACT.package_version_re),
        ("release", release, CONTRACT.package_release_re),
        ("arch", arch, CONTRACT.package_arch_re),
    )
    for field, value, pattern in checks:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ManifestError(f"package {field} {value!r} does not match {pattern.pattern}")
    return Package(name, int(text_epoch), version, release, arch)


def canonical(packages: Iterable[Package]) -> list[Package]:
    """Sorted as the box sorts its file (bytewise by line), duplicates dropped."""
    return sorted(set(packages), key=Package.line)


def render_list(packages: Iterable[Package]) -> str:
    """The canonical text of a list (what the box writes and the digest covers)."""
    return "".join(p.line() for p in canonical(packages))


def list_sha256(packages: Iterable[Package]) -> str:
    """The digest of a list: sha256 of its canonical text."""
    return hashlib.sha256(render_list(packages).encode()).hexdigest()


def parse_list(data: bytes, *, sha256: str | None = None, count: int | None = None) -> list[Package]:
    """The packages of a list file from the box, refusing anything but the canonical form (and, when
    given, a digest or a count other than the event announced)."""
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ManifestError(
            f"the package list's sha256 is {hashlib.sha256(data).hexdigest()}, not the announced {sha256}"
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"the package list is not ASCII text: {exc}") from None
    if not text.endswith("\n"):
        raise ManifestError("the package list is empty or its last line has no newline")
    lines = text[:-1].split("\n")
    if len(lines) > CONTRACT.packages_max:
        raise ManifestError(f"the package list has {len(lines)} lines, more than {CONTRACT.packages_max}")
    packages = []
    for number, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) != len(FIELDS):
            raise ManifestError(f"package list line {number}: {len(fields)} tab-separated fields, not 5")
        try:
            packages.append(package(*fields))
        except ManifestError as exc:
            raise ManifestError(f"package list line {number}: {exc}") from None
    if render_list(packages) != text:
        raise ManifestError("the package list is not sorted bytewise and unique (contract.env PACKAGES_FILE)")
    if count is not None and len(packages) != count:
        raise ManifestError(f"the package list has {len(packages)} packages, not the announced {count}")
    return packages


def from_records(records: Any) -> list[Package]:
    """Packages from their JSON / XCom form (a list of ``{name, epoch, version, release, arch}``)."""
    if not isinstance(records, list) or not records:
        raise ManifestError(f"a package list must be a non-empty list, got {type(records).__name__}")
    if len(records) > CONTRACT.packages_max:
        raise ManifestError(f"a package list has {len(records)} entries, more than {CONTRACT.packages_max}")
    out = []
    for n, record in enumerate(records):
        if not isinstance(record, Mapping) or set(record) != set(FIELDS):
            raise ManifestError(f"package {n}: must be an object with exactly {', '.join(FIELDS)}")
        try:
            out.append(package(*(record[f] for f in FIELDS)))
        except ManifestError as exc:
            raise ManifestError(f"package {n}: {exc}") from None
    return canonical(out)


def to_records(packages: Iterable[Package]) -> list[dict[str, Any]]:
    """The canonical list in JSON / XCom form."""
    return [p.as_record() for p in canonical(packages)]


def packages_event(event: Mapping[str, Any]) -> tuple[str, int, str]:
    """``(path, count, sha256)`` of the box's ``packages`` event, checked: the path is a file named
    ``PACKAGES_FILE`` inside the box's work dir, the count within the contract, the digest a sha256."""
    path, count, digest = event.get("path"), event.get("count"), event.get("sha256")
    base = CONTRACT.box_work_dir.rstrip("/") + "/"
    if (
        not isinstance(path, str)
        or not _BOX_PATH_RE.fullmatch(path)
        or not path.startswith(base)
        or "/../" in path + "/"
        or "/./" in path + "/"
        or not path.endswith("/" + CONTRACT.packages_file)
    ):
        raise ManifestError(f"packages event: path {path!r} is not a {CONTRACT.packages_file} under {base}")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= CONTRACT.packages_max:
        raise ManifestError(f"packages event: count {count!r} is not 1 to {CONTRACT.packages_max}")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ManifestError(f"packages event: sha256 {digest!r} is not 64 lower-case hex digits")
    return path, count, digest


# -- what changed ----------------------------------------------------------------------------------


class Update(NamedTuple):
    """One package whose version changed: its name, arch, old and new full versions."""

    name: str
    arch: str
    old: str
    new: str


@dataclass(frozen=True)
class Changes:
    """What changed from one list to the next, each part sorted by name and arch."""

    added: tuple[Package, ...]
    removed: tuple[Package, ...]
    updated: tuple[Update, ...]

    def counts(self) -> dict[str, int]:
        """``{"added", "removed", "updated"}`` counts (the XCom summary)."""
        return {"added": len(self.added), "removed": len(self.removed), "updated": len(self.updated)}

    @property
    def none(self) -> bool:
        """True when the two lists hold the same packages."""
        return not (self.added or self.removed or self.updated)


def diff(old: Iterable[Package], new: Iterable[Package]) -> Changes:
    """What changed from ``old`` to ``new``, by name + arch (see the module docstring)."""
    before: dict[tuple[str, str], set[Package]] = {}
    after: dict[tuple[str, str], set[Package]] = {}
    for p in old:
        before.setdefault(p.key, set()).add(p)
    for p in new:
        after.setdefault(p.key, set()).add(p)
    added: list[Package] = []
    removed: list[Package] = []
    updated: list[Update] = []
    for key in sorted(before.keys() | after.keys()):
        gone = sorted(before.get(key, set()) - after.get(key, set()), key=Package.line)
        came = sorted(after.get(key, set()) - before.get(key, set()), key=Package.line)
        if len(gone) == 1 and len(came) == 1:
            updated.append(Update(key[0], key[1], gone[0].evr, came[0].evr))
        else:
            removed += gone
            added += came
    return Changes(tuple(added), tuple(removed), tuple(updated))


def render_changes(changes: Changes, *, previous_ami: str, current_ami: str = "") -> str:
    """The readable block for the log and the UI: a headline, then one line per change."""
    this = f" in {current_ami}" if current_ami else ""
    head = (
        f"what changed{this} since {previous_ami}: {len(changes.updated)} updated, "
        f"{len(changes.added)} added, {len(changes.removed)} removed"
    )
    labels = [_label(p.name, p.arch) for p in (*changes.added, *changes.removed)]
    width = max(map(len, labels + [_label(u.name, u.arch) for u in changes.updated]), default=0)
    lines = [head]
    lines += [f"  updated  {_label(u.name, u.arch):<{width}}  {u.old} -> {u.new}" for u in changes.updated]
    lines += [f"  added    {_label(p.name, p.arch):<{width}}  {p.evr}" for p in changes.added]
    lines += [f"  removed  {_label(p.name, p.arch):<{width}}  {p.evr}" for p in changes.removed]
    if changes.none:
        lines.append("  (the same packages, the same versions)")
    return "\n".join(lines)


def _label(name: str, arch: str) -> str:
    return f"{name}.{arch}"


# -- the previous AMI of a line --------------------------------------------------------------------


def previous_image(
    images: Iterable[Mapping[str, Any]], *, line: str, current_ami: str
) -> Mapping[str, Any] | None:
    """The AMI to compare with: the newest available amibake AMI of image ``line`` other than
    ``current_ami`` and not created after it (verified or not: what changed since the last image
    built). A re-run of an older night compares with what came before that night, not after."""
    candidates = [
        i
        for i in images
        if i.get("ImageId") != current_ami
        and i.get("State") == "available"
        and lifecycle.is_ours(i)
        and lifecycle.line_of(i) == line
    ]
    current = next((i for i in images if i.get("ImageId") == current_ami), None)
    if current is not None:
        newer_than = lifecycle.created_at(current)
        if newer_than is not None:
            candidates = [i for i in candidates if (lifecycle.created_at(i) or newer_than) <= newer_than]
    return max(candidates, key=_creation_key, default=None)


def _creation_key(image: Mapping[str, Any]) -> tuple:
    when = lifecycle.created_at(image)
    return (when.timestamp() if when else 0.0, image.get("ImageId", ""))


# -- where it is kept --------------------------------------------------------------------------------


def s3_prefix(line: str, ami_id: str) -> str:
    """The S3 "folder" of one AMI's manifest: ``<image line>/<ami id>/``."""
    if not line or "/" in line or line in (".", ".."):
        raise ManifestError(f"image line {line!r} cannot name an S3 folder")
    if not CONTRACT.ami_id_re.fullmatch(ami_id):
        raise ManifestError(f"{ami_id!r} is not an AMI id")
    return f"{line}/{ami_id}/"


PACKAGES_OBJECT = "packages.json"
SBOM_OBJECT = "sbom.cdx.json"


def packages_document(packages: Iterable[Package], *, ami_id: str, line: str, recipe: str) -> str:
    """``packages.json``: the AMI, its line and recipe, the list's digest and the packages."""
    listed = canonical(packages)
    body = {
        "ami_id": ami_id,
        "image_line": line,
        "recipe": recipe,
        "sha256": list_sha256(listed),
        "packages": to_records(listed),
    }
    return json.dumps(body, indent=1, sort_keys=True) + "\n"


def read_packages_document(text: str | bytes) -> list[Package]:
    """The packages of a ``packages.json``, checked against the digest it states."""
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"packages.json is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ManifestError("packages.json is not a JSON object")
    packages = from_records(body.get("packages"))
    if list_sha256(packages) != body.get("sha256"):
        raise ManifestError("packages.json: its packages do not have the sha256 it states")
    return packages


# -- the SBOM ------------------------------------------------------------------------------------------


def purl(p: Package, recipe: str) -> str:
    """The package-url of one package: ``pkg:rpm/centos/NAME@VERSION-RELEASE?arch=A&epoch=E`` or
    ``pkg:deb/debian/NAME@VERSION-REVISION?arch=A&epoch=E`` (epoch only when not 0)."""
    from packageurl import PackageURL

    kind, namespace = PURL_OF_RECIPE[recipe]
    qualifiers = {"arch": p.arch}
    if p.epoch:
        qualifiers["epoch"] = str(p.epoch)
    version = f"{p.version}-{p.release}" if p.release else p.version
    return PackageURL(
        type=kind, namespace=namespace, name=p.name, version=version, qualifiers=qualifiers
    ).to_string()


def sbom(
    packages: Iterable[Package],
    *,
    recipe: str,
    ami_id: str,
    ami_name: str,
    line: str,
    created: datetime,
    tool_version: str,
) -> str:
    """A CycloneDX 1.6 JSON SBOM of the image (``cyclonedx-python-lib``): the AMI as the described
    operating-system component, each package a library component with its purl, all depending on
    nothing but the image. Its serial number is derived from the AMI id and the list's digest, so
    the same image always gets the same document."""
    from cyclonedx.model import Property
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.tool import ToolRepository
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    if recipe not in PURL_OF_RECIPE:
        raise ManifestError(f"no package-url type for recipe {recipe!r}")
    listed = canonical(packages)
    digest = list_sha256(listed)
    image = Component(
        type=ComponentType.OPERATING_SYSTEM,
        name=ami_name,
        version=ami_id,
        bom_ref=ami_id,
        description=f"amibake image of line {line} (recipe {recipe})",
        properties=[
            Property(name="amibake:recipe", value=recipe),
            Property(name="amibake:image-line", value=line),
            Property(name="amibake:packages-sha256", value=digest),
        ],
    )
    tools = ToolRepository(
        components=[
            Component(
                type=ComponentType.APPLICATION,
                name="amibake",
                version=tool_version,
                purl=PackageURL(type="pypi", name="amibake", version=tool_version),
            )
        ]
    )
    bom = Bom(
        serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"amibake:{ami_id}:{digest}"),
        metadata=BomMetaData(component=image, timestamp=created, tools=tools),
    )
    members = []
    for p in listed:
        ref = purl(p, recipe)
        component = Component(
            type=ComponentType.LIBRARY,
            name=p.name,
            version=p.evr,
            bom_ref=ref,
            purl=PackageURL.from_string(ref),
        )
        bom.components.add(component)
        members.append(component)
    bom.register_dependency(image, members)
    for component in members:
        bom.register_dependency(component)
    return JsonV1Dot6(bom).output_as_string(indent=1)


def tag_value(value: str) -> str:
    """A tag value as EC2 takes it: at most 256 characters (a longer one keeps its start, marked)."""
    return value if len(value) <= 256 else value[:253] + "..."
