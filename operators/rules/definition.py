"""Image definitions: ``images/<name>.yaml``, checked, and the bundle the box receives.

One file per image. It is checked in two steps, and every error names the file and the field:

1. against ``image-definition.schema.json`` next to this module (types, required and unknown keys,
   the contract's patterns; editors with a YAML language server read the same file);
2. against the rules a schema cannot say: no control character in a value (a schema pattern is a
   search: ``"nginx\\n"`` would pass it), the name is the file's, sources are regular files inside
   their folder with no symlink on the way and within the size limits, scripts are UTF-8 text with a
   ``#!/interpreter`` line, each key file holds exactly the public key its fingerprint pins, apt
   repositories have a suite and components and yum ones do not, no duplicates or contradictions
   (installed and removed, enabled and disabled), a schedule Airflow accepts.

YAML is read with a safe loader that also refuses aliases (no "billion laughs"), duplicate keys and
keys that are not text.

The patterns and limits are the contract's (``include/scripts/contract.env``): the box checks the
same values again with the same rules when it reads ``image.env``.

Pure: no Airflow import (PyYAML and jsonschema come with Airflow). ``python -m
operators.rules.definition FILE...`` checks files from the command line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import shutil
import stat
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from operators import defaults
from operators.rules.contract import CONTRACT

SCHEMA_FILE = Path(__file__).with_name("image-definition.schema.json")
#: How each recipe installs packages: the repository fields it takes follow from it.
PACKAGE_FAMILY = {"centos7": "yum", "debian12": "apt"}
#: Sub-folders of ``images/<name>/`` for each kind of source.
FILES_DIR, SCRIPTS_DIR, KEYS_DIR = "files", "scripts", "keys"
#: An Airflow connection id (Airflow's own rule: letters, digits, ``_.-``, at most 250).
CONNECTION_ID_PATTERN = "^[A-Za-z0-9_.-]{1,250}$"
#: ``rebuild_after``: whole days, e.g. ``30d``
REBUILD_AFTER_PATTERN = "^[1-9][0-9]{0,2}d$"
#: ``distribution``: an AWS region; a 12-digit account; an organization and an organizational unit ARN
#: (AWS Organizations' formats); a KMS key of the target region: key id, ``alias/...`` or their ARN.
REGION_PATTERN = "^[a-z]{2}(-[a-z]+){1,2}-[1-9][0-9]?$"
ACCOUNT_PATTERN = "^[0-9]{12}$"
ORGANIZATION_ARN_PATTERN = "^arn:aws(-cn|-us-gov)?:organizations::[0-9]{12}:organization/o-[a-z0-9]{10,32}$"
OU_ARN_PATTERN = (
    "^arn:aws(-cn|-us-gov)?:organizations::[0-9]{12}:ou/o-[a-z0-9]{10,32}/ou-[a-z0-9]{4,32}-[a-z0-9]{8,32}$"
)
_KMS_KEY = "([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})"
_KMS_ALIAS = "alias/[A-Za-z0-9/_-]{1,250}"
KMS_KEY_PATTERN = (
    f"^({_KMS_KEY}|{_KMS_ALIAS}|arn:aws(-cn|-us-gov)?:kms:{REGION_PATTERN[1:-1]}:[0-9]{{12}}:"
    f"(key/{_KMS_KEY}|{_KMS_ALIAS}))$"
)
#: A definition file larger than this is refused before it is parsed.
DEFINITION_MAX_BYTES = 256 * 1024
#: Fields the trigger form may override for one run (dotted paths of the definition).
OVERRIDABLE = ("size_gib", "mirror", "retention.keep", "retention.deprecate")
#: The values of a field a definition leaves out: the product's defaults (one home: operators/defaults.py).
DEFAULT_SIZE_GIB = defaults.DEFAULT_CANVAS_SIZE_GIB
DEFAULT_KEEP, DEFAULT_DEPRECATE = defaults.DEFAULT_KEEP_AMIS, defaults.DEFAULT_DEPRECATE_GRACE
#: Airflow's cron presets a nightly image may use (``@once`` and ``@continuous`` are not schedules
#: for a rebuild; ``null`` means manual runs only).
CRON_PRESETS = ("@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")


class DefinitionError(ValueError):
    """A definition that cannot be built: ``<file>: <field>: <problem>``."""

    def __init__(self, path: Path | str, field: str, problem: str) -> None:
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{self.path}: {field}: {problem}")


@dataclass(frozen=True)
class Repository:
    """An extra package repository, its signing key pinned by fingerprint."""

    name: str
    base_url: str
    gpg_key: str
    gpg_fingerprint: str
    suite: str = ""
    components: tuple[str, ...] = ()
    connection_id: str = ""


@dataclass(frozen=True)
class ImageFile:
    """A file of ``images/<name>/files/`` placed in the image."""

    source: str
    destination: str
    mode: str
    owner: str
    group: str


@dataclass(frozen=True)
class SmokeCheck:
    """A command that must succeed on the booted image."""

    name: str
    command: str


@dataclass(frozen=True)
class RegionCopy:
    """One region the verified AMI is copied to, encrypted with ``kms_key_id`` of that region if given."""

    region: str
    kms_key_id: str = ""


@dataclass(frozen=True)
class Distribution:
    """Where the verified AMI goes: copies in other regions, and who may launch it (and its copies)."""

    regions: tuple[RegionCopy, ...] = ()
    accounts: tuple[str, ...] = ()
    organization_arns: tuple[str, ...] = ()
    organizational_unit_arns: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        """Whether there is anything to do."""
        return bool(self.regions or self.shared_with)

    @property
    def shared_with(self) -> tuple[str, ...]:
        """Every principal given launch permission: accounts, organizations, organizational units."""
        return (*self.accounts, *self.organization_arns, *self.organizational_unit_arns)

    def launch_permissions(self) -> list[dict[str, str]]:
        """The ``LaunchPermission`` entries EC2 names these principals with."""
        return (
            [{"UserId": a} for a in self.accounts]
            + [{"OrganizationArn": a} for a in self.organization_arns]
            + [{"OrganizationalUnitArn": a} for a in self.organizational_unit_arns]
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able form, as the definition writes it (what the validate task hands on)."""
        return {
            "regions": [
                {"region": r.region, **({"kms_key_id": r.kms_key_id} if r.kms_key_id else {})}
                for r in self.regions
            ],
            "accounts": list(self.accounts),
            "organization_arns": list(self.organization_arns),
            "organizational_unit_arns": list(self.organizational_unit_arns),
        }


@dataclass(frozen=True)
class ImageDefinition:
    """One checked definition. ``raw`` is the parsed file (the base of per-run overrides)."""

    name: str
    path: Path
    recipe: str
    description: str = ""
    size_gib: int = DEFAULT_SIZE_GIB
    mirror: str = ""
    install: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    repositories: tuple[Repository, ...] = ()
    files: tuple[ImageFile, ...] = ()
    scripts: tuple[str, ...] = ()
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    kernel_args: tuple[str, ...] = ()
    schedule: str | None = None
    schedule_set: bool = False
    keep: int = DEFAULT_KEEP
    deprecate: int = DEFAULT_DEPRECATE
    #: days after which the newest verified AMI is rebuilt even when nothing changed (None: never)
    rebuild_after_days: int | None = None
    smoke_checks: tuple[SmokeCheck, ...] = ()
    distribution: Distribution = Distribution()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def folder(self) -> Path:
        """``images/<name>/``: where the definition's files, scripts and keys live."""
        return self.path.with_suffix("")


def dag_id(name: str) -> str:
    """The DAG of an image definition."""
    return f"amibake_{name}"


def name_of_dag(dag: str) -> str:
    """The image definition a DAG builds (the inverse of :func:`dag_id`; other DAGs give their id)."""
    return dag.removeprefix(dag_id(""))


def discover(images_dir: Path) -> list[Path]:
    """The definition files of a folder (``*.yaml`` at its top level, not hidden), in name order.

    Sub-folders (``images/<name>/`` sources, ``images/examples/``) are never definitions.
    """
    if not images_dir.is_dir():
        return []
    return sorted(p for p in images_dir.glob("*.yaml") if p.is_file() and not p.name.startswith("."))


def distribution_regions(images_dir: Path) -> tuple[list[str], list[DefinitionError]]:
    """Every region a definition of ``images_dir`` copies its AMI to (the sweeper sweeps there too),
    in name order, and the errors of the definitions that could not be read."""
    regions: set[str] = set()
    broken: list[DefinitionError] = []
    for path in discover(images_dir):
        try:
            regions.update(r.region for r in load(path).distribution.regions)
        except DefinitionError as exc:
            broken.append(exc)
    return sorted(regions), broken


def load_named(images_dir: Path, name: str) -> ImageDefinition:
    """The definition ``images_dir/<name>.yaml`` (the name checked first: it becomes a path)."""
    if not isinstance(name, str) or not CONTRACT.image_name_re.fullmatch(name):
        raise DefinitionError(
            images_dir, "name", f"{name!r} is not an image name ({CONTRACT.image_name_re.pattern})"
        )
    return load(images_dir / f"{name}.yaml")


def load(path: Path) -> ImageDefinition:
    """Read and check one definition file."""
    shown = _shown(path)
    try:
        with path.open("rb") as file:
            text = file.read(DEFINITION_MAX_BYTES + 1)
    except OSError as exc:
        raise DefinitionError(shown, "(file)", f"cannot be read: {exc.strerror}") from None
    if len(text) > DEFINITION_MAX_BYTES:
        raise DefinitionError(shown, "(file)", f"is more than {DEFINITION_MAX_BYTES} bytes: not a definition")
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        raise DefinitionError(shown, where, f"not a definition's YAML: {problem}") from None
    except UnicodeDecodeError:
        raise DefinitionError(shown, "(yaml)", "is not UTF-8 text") from None
    except RecursionError:
        raise DefinitionError(shown, "(yaml)", "is nested too deeply to be a definition") from None
    return from_mapping(path, data)


def from_mapping(path: Path, data: Any) -> ImageDefinition:
    """Check parsed definition data (as read from ``path``) and build the definition."""
    shown = _shown(path)
    if not isinstance(data, dict):
        raise DefinitionError(shown, "(top level)", f"must be a mapping of fields, got {type(data).__name__}")
    _check_schema(shown, data)
    _check_text(shown, data)
    if data["name"] != path.stem:
        raise DefinitionError(shown, "name", f"{data['name']!r} must be the file's name, {path.stem!r}")
    recipe = data["recipe"]
    family = PACKAGE_FAMILY[recipe]
    packages, services, retention = (
        data.get("packages", {}),
        data.get("services", {}),
        data.get("retention", {}),
    )
    image = ImageDefinition(
        name=data["name"],
        path=path,
        recipe=recipe,
        description=data.get("description", ""),
        size_gib=data.get("size_gib", DEFAULT_SIZE_GIB),
        mirror=data.get("mirror") or "",
        install=tuple(packages.get("install", ())),
        exclude=tuple(packages.get("exclude", ())),
        remove=tuple(packages.get("remove", ())),
        repositories=tuple(
            _repository(shown, f"repositories[{i}]", r, family)
            for i, r in enumerate(data.get("repositories", ()))
        ),
        files=tuple(
            ImageFile(
                f["source"],
                f["destination"],
                f.get("mode", "0644"),
                f.get("owner", "root"),
                f.get("group", "root"),
            )
            for f in data.get("files", ())
        ),
        scripts=tuple(data.get("scripts", ())),
        enable=tuple(services.get("enable", ())),
        disable=tuple(services.get("disable", ())),
        kernel_args=tuple(data.get("kernel_args", ())),
        schedule=data.get("schedule"),
        schedule_set="schedule" in data,
        keep=retention.get("keep", DEFAULT_KEEP),
        deprecate=retention.get("deprecate", DEFAULT_DEPRECATE),
        rebuild_after_days=int(data["rebuild_after"][:-1]) if "rebuild_after" in data else None,
        smoke_checks=tuple(SmokeCheck(c["name"], c["command"]) for c in data.get("smoke_checks", ())),
        distribution=_distribution(data.get("distribution", {})),
        raw=data,
    )
    _check_rules(shown, image)
    return image


def apply_overrides(image: ImageDefinition, overrides: Mapping[str, Any]) -> ImageDefinition:
    """The definition with one run's values (dotted fields of :data:`OVERRIDABLE`), checked as a file."""
    data = json.loads(json.dumps(image.raw))
    for dotted, value in overrides.items():
        if dotted not in OVERRIDABLE:
            raise DefinitionError(
                _shown(image.path),
                dotted,
                f"is not a field a run may override (only {', '.join(OVERRIDABLE)})",
            )
        *parents, leaf = dotted.split(".")
        target = data
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return from_mapping(image.path, data)


def canonical_hash(image: ImageDefinition) -> str:
    """sha256 of the definition's values (canonical JSON, defaults filled in: ``size_gib: 8`` written
    or not is the same definition) and of every source file it ships, by its path in the bundle."""
    content = asdict(image)
    # where the file is; the parsed text; in `schedule`; where the AMI goes (not what it holds: adding
    # a region or an account must not rebuild the image, the next run's distribution step does it)
    for local in ("path", "raw", "schedule_set", "distribution"):
        del content[local]
    content["schedule"] = image.schedule if image.schedule_set else "(the [amibake] schedule)"
    digest = hashlib.sha256(b"amibake image definition v1\0")
    digest.update(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())
    for relative, source in sorted(_sources(image)):
        digest.update(f"\0{relative}\0".encode() + hashlib.sha256(source.read_bytes()).digest())
    return digest.hexdigest()


# -- the bundle shipped to the box ------------------------------------------------------------------
def render_bundle(image: ImageDefinition, dest: Path) -> None:
    """Write the box's image dir: ``image.env`` (contract.env format) and copies of every source."""
    dest.mkdir(parents=True)
    for relative, source in _sources(image):
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_read_source(image, relative, source))
        target.chmod(0o755 if relative.startswith(f"{SCRIPTS_DIR}/") else 0o644)
    (dest / "checks").mkdir()
    for number, check in enumerate(image.smoke_checks, 1):
        (dest / "checks" / str(number)).write_text(check.command)
    (dest / "image.env").write_text(image_env(image))


def _read_source(image: ImageDefinition, relative: str, source: Path) -> bytes:
    """A source's bytes as loading checked it: still a regular file (not swapped for a symlink since,
    ``O_NOFOLLOW``) and within the size limit."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(source, flags)
    except OSError as exc:
        raise DefinitionError(_shown(image.path), relative, f"cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > CONTRACT.image_file_max_bytes:
            raise DefinitionError(_shown(image.path), relative, "changed since the definition was checked")
        return file.read(CONTRACT.image_file_max_bytes + 1)


def image_env(image: ImageDefinition) -> str:
    """``image.env``: what the box's phases read, in contract.env's ``KEY='value'`` format."""
    values: dict[str, str] = {
        "IMAGE_NAME": image.name,
        "IMAGE_RECIPE": image.recipe,
        "IMAGE_PACKAGES": " ".join(image.install),
        "IMAGE_EXCLUDE": " ".join(image.exclude),
        "IMAGE_REMOVE": " ".join(image.remove),
        "IMAGE_SERVICES_ENABLE": " ".join(image.enable),
        "IMAGE_SERVICES_DISABLE": " ".join(image.disable),
        "IMAGE_KERNEL_ARGS": " ".join(image.kernel_args),
        "IMAGE_REPO_COUNT": str(len(image.repositories)),
    }
    for n, repo in enumerate(image.repositories, 1):
        values |= {
            f"IMAGE_REPO_{n}_NAME": repo.name,
            f"IMAGE_REPO_{n}_URL": repo.base_url,
            f"IMAGE_REPO_{n}_SUITE": repo.suite,
            f"IMAGE_REPO_{n}_COMPONENTS": " ".join(repo.components),
            f"IMAGE_REPO_{n}_KEY": f"{KEYS_DIR}/{repo.gpg_key}",
            f"IMAGE_REPO_{n}_FINGERPRINT": repo.gpg_fingerprint,
            f"IMAGE_REPO_{n}_AUTH": "1" if repo.connection_id else "0",
        }
    values["IMAGE_FILE_COUNT"] = str(len(image.files))
    for n, item in enumerate(image.files, 1):
        values |= {
            f"IMAGE_FILE_{n}_SOURCE": f"{FILES_DIR}/{item.source}",
            f"IMAGE_FILE_{n}_DEST": item.destination,
            f"IMAGE_FILE_{n}_MODE": item.mode,
            f"IMAGE_FILE_{n}_OWNER": item.owner,
            f"IMAGE_FILE_{n}_GROUP": item.group,
        }
    values["IMAGE_SCRIPTS"] = " ".join(f"{SCRIPTS_DIR}/{s}" for s in image.scripts)
    values["IMAGE_CHECK_COUNT"] = str(len(image.smoke_checks))
    for n, check in enumerate(image.smoke_checks, 1):
        values |= {f"IMAGE_CHECK_{n}_NAME": check.name, f"IMAGE_CHECK_{n}_COMMAND": f"checks/{n}"}
    lines = [
        f"# image.env of {image.name}: written by operators/rules/definition.py, read by lib/imagedef.sh"
    ]
    for key, value in values.items():
        if "'" in value or "\n" in value:  # the checks above make this impossible; the format forbids it
            raise DefinitionError(_shown(image.path), key, "holds a quote or a line break")
        lines.append(f"{key}='{value}'")
    return "\n".join(lines) + "\n"


#: What ``SHA256SUMS`` covers: the folders of a build directory shipped to the box.
MANIFEST_DIRS = ("scripts", "image")


def write_manifest(build_dir: Path) -> str:
    """``build_dir/SHA256SUMS`` (sha256sum format, paths relative to ``build_dir``) over every file of
    :data:`MANIFEST_DIRS`; returns the sha256 of that file (build-image's ``--manifest-sha256``)."""
    lines = []
    for top in MANIFEST_DIRS:
        for file in sorted((build_dir / top).rglob("*")):
            relative = file.relative_to(build_dir).as_posix()
            if file.is_symlink() or "\\" in relative or "\n" in relative:
                raise ValueError(f"{relative}: a symlink or an odd name has no place in a shipped build")
            if file.is_file():
                lines.append(f"{hashlib.sha256(file.read_bytes()).hexdigest()}  {relative}\n")
    manifest = "".join(lines).encode()
    (build_dir / "SHA256SUMS").write_bytes(manifest)
    return hashlib.sha256(manifest).hexdigest()


def stage(dest: Path, scripts: Path, image: ImageDefinition | None) -> str:
    """What goes to the box, in the empty dir ``dest``: ``scripts/`` (a copy of ``scripts``), the
    definition's bundle in ``image/``, and their SHA256SUMS; returns that file's digest."""
    shutil.copytree(scripts, dest / "scripts")
    if image is not None:
        render_bundle(image, dest / "image")
    return write_manifest(dest)


# -- the checks -------------------------------------------------------------------------------------
#: libyaml's safe loader when PyYAML has it: about ten times faster than the pure-Python one (parse
#: time counts: every definition is read at each DAG parse), and it caps nesting at 1000 levels.
_SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse_yaml(text: bytes) -> Any:
    """A definition's YAML: aliases refused first, from the event stream (no "billion laughs", no
    merge keys), then loaded with :class:`_StrictLoader`."""
    for event in yaml.parse(text, Loader=_SAFE_LOADER):
        if isinstance(event, yaml.AliasEvent):
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not allowed in a definition", event.start_mark
            )
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader


class _StrictLoader(_SAFE_LOADER):  # type: ignore[misc,valid-type]
    """The safe loader, refusing duplicate keys (no silent override) and keys that are not text."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is not a field name (text)", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _schema_validator() -> Any:
    from jsonschema import Draft202012Validator

    global _VALIDATOR
    if _VALIDATOR is None:
        _VALIDATOR = Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    return _VALIDATOR


_VALIDATOR: Any = None


def _field_path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _check_schema(shown: str, data: dict) -> None:
    """The schema's verdict: its most relevant error, in words a YAML author reads (no dump of the value)."""
    from jsonschema.exceptions import best_match

    error = best_match(_schema_validator().iter_errors(data))
    if error is None:
        return
    where, kind, expected, value = (
        list(error.absolute_path),
        error.validator,
        error.validator_value,
        error.instance,
    )
    if kind == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        unknown = sorted(set(value) - set(allowed))
        where, message = (
            [*where, unknown[0]],
            f"is not a field here (a typo?); the fields: {', '.join(allowed)}",
        )
    elif kind == "required":
        missing = sorted(set(expected) - set(value))
        where, message = [*where, missing[0]], "is required"
    elif kind == "pattern" and expected == CONTRACT.mirror_url_re.pattern:
        message = _url_problem(value)
    elif kind == "pattern" and expected == NOT_BLANK:
        message = "must not be blank"
    elif kind == "pattern":
        message = (
            f"{_brief(value)} does not match {expected}: {_PATTERN_WORDS.get(expected, 'see the schema')}"
        )
    elif kind == "type":
        wanted = " or ".join(_YAML_KIND[t] for t in ([expected] if isinstance(expected, str) else expected))
        shown_value = json.dumps(value) if value is None or isinstance(value, bool) else _brief(value)
        message = f"must be {wanted}, got {_kind_of(value)} {shown_value}"
        if where and where[-1] == "mode":
            message += '; quote it ("0644"): YAML reads an unquoted 0644 as the octal number 420'
        elif "accounts" in where and isinstance(value, int):
            message += '; quote it ("012345678901"): YAML reads it as a number, dropping leading 0s'
    elif kind == "maxItems":
        message = f"has {len(value)} entries, at most {expected}"
    elif kind == "uniqueItems":
        message = f"{_brief(_first_repeated(value))} is given twice"
    elif kind == "maxLength":
        message = f"is {len(value)} characters long, at most {expected}"
    else:
        message = error.message
    raise DefinitionError(shown, _field_path(where), message)


#: The schema's pattern of a text that must hold more than white space.
NOT_BLANK = "\\S"
#: What each of the contract's patterns means, for the error.
_PATTERN_WORDS = {
    CONTRACT.image_name_re.pattern: "lower-case letters, digits and -, at most 40, no - at either end",
    CONTRACT.package_name_re.pattern: "a package name: a letter or digit, then letters, digits and ._+-",
    CONTRACT.repo_name_re.pattern: "lower-case letters, digits, _ and -",
    CONTRACT.service_name_re.pattern: "a systemd unit name: letters, digits and @._-",
    CONTRACT.kernel_arg_re.pattern: "one argument: letters, digits and _.,:=/+-, no space or quote",
    CONTRACT.image_path_re.pattern: "an absolute path of letters, digits and ._+@-, no . or .. segment, "
    "no trailing /",
    CONTRACT.bundle_path_re.pattern: "a path inside the image's folder: letters, digits and ._+@-, no . "
    "or .. segment, not absolute",
    CONTRACT.file_mode_re.pattern: 'octal digits, quoted: "0644"',
    CONTRACT.owner_re.pattern: "a user or group name: lower-case letters, digits, _ and -",
    CONTRACT.gpg_fingerprint_re.pattern: "40 upper-case hex digits (gpg --show-keys --with-colons: fpr)",
    CONNECTION_ID_PATTERN: "an Airflow connection id: letters, digits and _.-",
    REBUILD_AFTER_PATTERN: "whole days, 1 to 999, like 30d",
    REGION_PATTERN: "an AWS region like eu-west-1",
    ACCOUNT_PATTERN: "an AWS account id: 12 digits, quoted",
    ORGANIZATION_ARN_PATTERN: "an organization ARN: arn:aws:organizations::<account>:organization/o-...",
    OU_ARN_PATTERN: "an organizational unit ARN: arn:aws:organizations::<account>:ou/o-.../ou-...",
    KMS_KEY_PATTERN: "a KMS key of that region: key id, alias/<name>, or the key's or alias's ARN",
}

#: JSON Schema type names as a YAML author calls them.
_YAML_KIND = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
    "array": "a list",
    "object": "a mapping",
}


def _kind_of(value: Any) -> str:
    """What a parsed YAML value is, in the words of :data:`_YAML_KIND` (a date, too: YAML reads one)."""
    if value is None or isinstance(value, bool):
        return _YAML_KIND["null" if value is None else "boolean"]
    kinds = {int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    found = next((name for cls, name in kinds.items() if isinstance(value, cls)), None)
    return _YAML_KIND[found] if found else f"a {type(value).__name__}"


def _first_repeated(values: list[Any]) -> Any:
    """The first value of a list seen before in it."""
    seen: list[Any] = []
    for value in values:
        if value in seen:
            return value
        seen.append(value)
    return None


def _brief(value: Any) -> str:
    """A value as an error shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


#: The fields whose text may span lines (a shell command, a description).
MULTILINE_FIELDS = ("description", "command")


def _check_text(shown: str, node: Any, parts: tuple[str | int, ...] = ()) -> None:
    """No control character in any value (a line break only in :data:`MULTILINE_FIELDS`).

    Needed beyond the schema: JSON Schema's ``pattern`` is a search, and Python's ``$`` also matches
    before a final line break, so ``"nginx\\n"`` passes the package name pattern on its own.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            _check_text(shown, value, (*parts, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_text(shown, value, (*parts, index))
    elif isinstance(node, str):
        allowed = "\t\n" if parts and parts[-1] in MULTILINE_FIELDS else ""
        bad = next((c for c in node if (c < " " or c == "\x7f") and c not in allowed), None)
        if bad is not None:
            raise DefinitionError(shown, _field_path(parts), f"holds the control character {bad!r}")


def _url_problem(url: str) -> str:
    """Why a mirror or repository URL fails the contract's rule (the URL is not repeated: it may hold
    a password)."""
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if "@" in rest.partition("/")[0]:
        return "credentials never go in a URL: use the repository's connection_id"
    if any(c in rest for c in "?=#"):
        return "must not have a query or fragment (?, = or #)"
    return "must be http(s)://host[:port][/path] with letters, digits and ._~%+-/ in the path"


def _repository(shown: str, where: str, data: dict, family: str) -> Repository:
    for key in ("suite", "components"):
        if family == "apt" and key not in data:
            raise DefinitionError(
                shown, f"{where}.{key}", "is required: an apt repository needs suite and components"
            )
        if family == "yum" and key in data:
            raise DefinitionError(
                shown, f"{where}.{key}", "a yum repository (recipe centos7) has no suite or components"
            )
    return Repository(
        name=data["name"],
        base_url=data["base_url"],
        gpg_key=data["gpg_key"],
        gpg_fingerprint=data["gpg_fingerprint"],
        suite=data.get("suite", ""),
        components=tuple(data.get("components", ())),
        connection_id=data.get("connection_id", ""),
    )


def _distribution(data: Mapping[str, Any]) -> Distribution:
    """The ``distribution`` field (schema-checked) as a :class:`Distribution`."""
    return Distribution(
        regions=tuple(RegionCopy(r["region"], r.get("kms_key_id", "")) for r in data.get("regions", ())),
        accounts=tuple(data.get("accounts", ())),
        organization_arns=tuple(data.get("organization_arns", ())),
        organizational_unit_arns=tuple(data.get("organizational_unit_arns", ())),
    )


def distribution_of(data: Any, where: str = "distribution") -> Distribution:
    """Check a ``distribution`` mapping handed over on its own (an operator's argument) as the
    definition's field is checked; errors name ``where``."""
    if data is None or data == {}:
        return Distribution()
    check = {"name": "distribution", "recipe": next(iter(PACKAGE_FAMILY)), "distribution": data}
    _check_schema(where, check)
    _check_text(where, data, ("distribution",))
    found = _distribution(data)
    _check_distribution(where, found)
    return found


def _check_distribution(shown: str, found: Distribution) -> None:
    """Each region once; a KMS key given by ARN is a key of the region it encrypts in (AWS: CopyImage
    takes a key of the destination region only)."""
    _duplicates(shown, "distribution.regions", [r.region for r in found.regions])
    for i, copy in enumerate(found.regions):
        if copy.kms_key_id.startswith("arn:") and copy.kms_key_id.split(":")[3] != copy.region:
            raise DefinitionError(
                shown,
                f"distribution.regions[{i}].kms_key_id",
                f"is a key of {copy.kms_key_id.split(':')[3]}, not of {copy.region}: CopyImage encrypts "
                "with a key of the region it copies to",
            )


def _duplicates(shown: str, where: str, values: list[str]) -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise DefinitionError(shown, f"{where}[{i}]", f"{value!r} is given twice")
        seen.add(value)


def _disjoint(shown: str, where: str, values: tuple[str, ...], other: str, others: tuple[str, ...]) -> None:
    """No value of ``where`` is also in ``other`` (a package installed and removed, ...)."""
    for i, value in enumerate(values):
        if value in others:
            raise DefinitionError(shown, f"{where}[{i}]", f"{value!r} is also in {other}: it cannot be both")


def _check_rules(shown: str, image: ImageDefinition) -> None:
    """What the schema cannot say; the order follows the file's."""
    _check_schedule(shown, image.schedule)
    _duplicates(shown, "repositories", [r.name for r in image.repositories])
    _duplicates(shown, "files", [f.destination for f in image.files])
    _duplicates(shown, "scripts", list(image.scripts))
    _duplicates(shown, "smoke_checks", [c.name for c in image.smoke_checks])
    _check_distribution(shown, image.distribution)
    _disjoint(shown, "packages.exclude", image.exclude, "packages.install", image.install)
    _disjoint(shown, "packages.remove", image.remove, "packages.install", image.install)
    _disjoint(shown, "services.disable", image.disable, "services.enable", image.enable)
    destinations = [f.destination for f in image.files]
    for i, dest in enumerate(destinations):
        above = next((d for d in destinations if dest.startswith(d + "/")), None)
        if above is not None:
            raise DefinitionError(
                shown, f"files[{i}].destination", f"{dest!r} is below {above!r}, which is a file of the list"
            )
    for i, item in enumerate(image.files):
        dest = item.destination
        forbidden = [p for p in CONTRACT.image_path_forbidden if dest == p or dest.startswith(p + "/")]
        if forbidden:
            raise DefinitionError(
                shown,
                f"files[{i}].destination",
                f"{dest!r} is in {forbidden[0]}: {' '.join(CONTRACT.image_path_forbidden)} are kernel and "
                "runtime filesystems, not part of an image",
            )
    total = 0
    for where, relative, source in _checked_sources(shown, image):
        total += _check_source(shown, where, image.folder, relative, source)
        if relative.startswith(f"{SCRIPTS_DIR}/"):
            _check_script(shown, where, source)
    if total > CONTRACT.image_bundle_max_bytes:
        raise DefinitionError(
            shown,
            "files",
            f"the files, scripts and keys are {total} bytes, more than {CONTRACT.image_bundle_max_bytes}",
        )
    for i, repo in enumerate(image.repositories):
        _check_key(
            shown, f"repositories[{i}].gpg_key", image.folder / KEYS_DIR / repo.gpg_key, repo.gpg_fingerprint
        )


def _check_schedule(shown: str, schedule: str | None) -> None:
    if schedule is None or schedule in CRON_PRESETS:
        return
    from croniter import croniter

    if not croniter.is_valid(schedule):
        raise DefinitionError(
            shown, "schedule", f"{schedule!r} is not a cron expression (or {', '.join(CRON_PRESETS)})"
        )


def _sources(image: ImageDefinition) -> Iterator[tuple[str, Path]]:
    """(path in the bundle, file in the folder) of every file, script and key the image ships."""
    for item in image.files:
        yield f"{FILES_DIR}/{item.source}", image.folder / FILES_DIR / item.source
    for script in image.scripts:
        yield f"{SCRIPTS_DIR}/{script}", image.folder / SCRIPTS_DIR / script
    for repo in image.repositories:
        yield f"{KEYS_DIR}/{repo.gpg_key}", image.folder / KEYS_DIR / repo.gpg_key


def _checked_sources(shown: str, image: ImageDefinition) -> Iterator[tuple[str, str, Path]]:
    wheres = [f"files[{i}].source" for i in range(len(image.files))]
    wheres += [f"scripts[{i}]" for i in range(len(image.scripts))]
    wheres += [f"repositories[{i}].gpg_key" for i in range(len(image.repositories))]
    for where, (relative, source) in zip(wheres, _sources(image), strict=True):
        yield where, relative, source


def _check_source(shown: str, where: str, folder: Path, relative: str, source: Path) -> int:
    """A source is a regular file inside its folder, reached without a symlink, within the limit."""
    if not CONTRACT.bundle_path_re.fullmatch(relative):
        raise DefinitionError(shown, where, f"{relative!r} is not a relative path inside {folder.name}/")
    current = folder.parent
    for part in (folder.name, *relative.split("/")):
        current = current / part
        try:
            mode = current.lstat().st_mode
        except FileNotFoundError:
            raise DefinitionError(shown, where, f"{_shown(current)} does not exist") from None
        if stat.S_ISLNK(mode):
            raise DefinitionError(
                shown, where, f"{_shown(current)} is a symlink (sources must be plain files)"
            )
    if not stat.S_ISREG(mode):
        raise DefinitionError(shown, where, f"{_shown(current)} is not a regular file")
    if not current.resolve().is_relative_to(folder.resolve() / relative.split("/")[0]):
        raise DefinitionError(shown, where, f"{_shown(current)} resolves outside {_shown(folder)}/")
    size = current.stat().st_size
    if size > CONTRACT.image_file_max_bytes:
        raise DefinitionError(
            shown, where, f"{_shown(current)} is {size} bytes, more than {CONTRACT.image_file_max_bytes}"
        )
    return size


def _check_script(shown: str, where: str, script: Path) -> None:
    """Executable text: a ``#!/interpreter`` line (not CRLF), UTF-8, no NUL byte."""
    body = script.read_bytes()
    if not body.startswith(b"#!/"):
        raise DefinitionError(
            shown,
            where,
            f"{_shown(script)} does not start with a #! line naming its interpreter (#!/bin/bash)",
        )
    if body.partition(b"\n")[0].endswith(b"\r"):
        raise DefinitionError(
            shown, where, f"{_shown(script)} has Windows line ends (CRLF): its #! line would name 'bash\\r'"
        )
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise DefinitionError(shown, where, f"{_shown(script)} is not UTF-8 text") from None
    if "\0" in text:
        raise DefinitionError(shown, where, f"{_shown(script)} holds a NUL byte: not a script")


def _check_key(shown: str, where: str, key: Path, pinned: str) -> None:
    try:
        found = key_fingerprints(key.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DefinitionError(
            shown, where, f"{_shown(key)} is not an armored OpenPGP public key: {exc}"
        ) from None
    if len(found) != 1:
        raise DefinitionError(shown, where, f"{_shown(key)} holds {len(found)} public keys, not exactly one")
    if found[0] != pinned:
        raise DefinitionError(shown, where, f"{_shown(key)} is key {found[0]}, not the pinned {pinned}")


_ARMOR = "-----{} PGP PUBLIC KEY BLOCK-----"


def key_fingerprints(armored: str) -> list[str]:
    """Fingerprints (v4: 40 upper-case hex) of the primary keys in an armored OpenPGP key file.

    Every armored block of the file counts (two concatenated exports are two keys); text outside the
    blocks, secret keys and a wrong armor checksum are errors. RFC 4880 §12.2: the fingerprint is the
    SHA-1 of 0x99, the two-byte length and the body of the public-key packet (tag 6; subkeys, tag 14,
    are not primary keys).
    """
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for number, raw in enumerate(armored.splitlines(), 1):
        line = raw.strip()
        if current is None:
            if line == _ARMOR.format("BEGIN"):
                current = []
            elif line.startswith("-----BEGIN PGP"):
                raise ValueError(f"line {number} begins a {line.strip('-')[6:]}, not a public key block")
            elif line:
                raise ValueError(f"line {number} is outside an armored public key block")
        elif line == _ARMOR.format("END"):
            blocks.append(current)
            current = None
        else:
            current.append(line)
    if current is not None:
        raise ValueError("no END PGP PUBLIC KEY BLOCK line")
    if not blocks:
        raise ValueError("no BEGIN PGP PUBLIC KEY BLOCK line")
    fingerprints = []
    for block in blocks:
        for tag, packet in _packets(_dearmor(block)):
            if tag in (5, 7):
                raise ValueError("it holds a SECRET key: ship only the public key (gpg --export --armor)")
            if tag != 6:
                continue
            if not packet or packet[0] != 4:
                version = packet[0] if packet else "?"
                raise ValueError(
                    f"it is a version {version} key: only v4 keys (40-hex fingerprints) are pinned"
                )
            fingerprints.append(
                hashlib.sha1(b"\x99" + len(packet).to_bytes(2, "big") + packet).hexdigest().upper()  # noqa: S324 - RFC 4880
            )
    return fingerprints


def _dearmor(block: list[str]) -> bytes:
    """The bytes of one armored block's lines (RFC 4880 §6.2: headers, a blank line, base64, =CRC24)."""
    if "" in block:  # armor headers (Version:, Comment:) end at the first blank line
        block = block[block.index("") + 1 :]
    checksum = [line for line in block if line.startswith("=")]
    try:
        data = base64.b64decode(
            "".join(line for line in block if line and not line.startswith("=")), validate=True
        )
        expected = (
            int.from_bytes(base64.b64decode(checksum[-1][1:], validate=True), "big") if checksum else None
        )
    except binascii.Error as exc:
        raise ValueError(f"bad base64: {exc}") from None
    if expected is not None and _crc24(data) != expected:
        raise ValueError("the armor checksum does not match: the key file is damaged")
    return data


def _crc24(data: bytes) -> int:
    """The CRC-24 of OpenPGP's armor checksum (RFC 4880 §6.1)."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def _packets(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(tag, body) of each OpenPGP packet (old and new header formats, no partial lengths)."""
    i = 0
    while i < len(data):
        header = data[i]
        if not header & 0x80:
            raise ValueError(f"byte {i} is not a packet header")
        if header & 0x40:  # new format
            tag, first = header & 0x3F, data[i + 1]
            if first < 192:
                length, i = first, i + 2
            elif first < 224:
                length, i = ((first - 192) << 8) + data[i + 2] + 192, i + 3
            elif first == 255:
                length, i = int.from_bytes(data[i + 2 : i + 6], "big"), i + 6
            else:
                raise ValueError("partial packet lengths are not used by public keys")
        else:
            tag, kind = (header >> 2) & 0x0F, header & 0x03
            if kind == 3:
                raise ValueError("indeterminate packet length")
            size = (1, 2, 4)[kind]
            length, i = int.from_bytes(data[i + 1 : i + 1 + size], "big"), i + 1 + size
        if i + length > len(data):
            raise ValueError("truncated packet")
        yield tag, data[i : i + length]
        i += length


def _shown(path: Path | str) -> str:
    """A path as errors show it: from the images folder's parent (``images/web.yaml``)."""
    path = Path(path)
    parts = path.parts
    if "images" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("images") - 1 :])
    return str(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m operators.rules.definition FILE...``: OK or the error of each; exit 1 if any failed."""
    failed = 0
    for name in argv if argv is not None else sys.argv[1:]:
        try:
            image = load(Path(name))
        except DefinitionError as exc:
            print(f"FAIL {exc}")
            failed += 1
        else:
            print(f"OK   {_shown(image.path)}: DAG {dag_id(image.name)}, recipe {image.recipe}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
