"""Image definitions (operators/rules/definition.py): the shipped ones load, hostile ones are refused
with an error naming the file and the field, overrides are checked as the file is, and the bundle the
box receives is what its reader (contract.env format, bash ``source``) expects."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from operators.rules import contract, definition
from operators.rules.contract import CONTRACT
from operators.rules.definition import DefinitionError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "images" / "examples" / "centos7-web.yaml"
KEY = REPO / "images" / "examples" / "centos7-web" / "keys" / "internal.asc"
FINGERPRINT = "B984D6DCA059F90D49E80E9E4039B6FC71634273"

#: A valid Debian definition every hostile case starts from (one change each).
BASE = {
    "name": "web",
    "recipe": "debian12",
    "size_gib": 4,
    "packages": {"install": ["nginx-light"]},
    "repositories": [
        {
            "name": "internal",
            "base_url": "http://127.0.0.1:8111/debian",
            "suite": "bookworm",
            "components": ["main"],
            "gpg_key": "internal.asc",
            "gpg_fingerprint": FINGERPRINT,
            "connection_id": "amibake_repo_internal",
        }
    ],
    "files": [{"source": "motd", "destination": "/etc/motd", "mode": "0644"}],
    "scripts": ["10-setup.sh"],
    "services": {"enable": ["nginx.service"]},
    "kernel_args": ["net.ifnames=0"],
    "smoke_checks": [{"name": "motd", "command": "grep -q amibake /etc/motd"}],
}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """``images/`` with the sources of :data:`BASE` (images/web/{files,scripts,keys})."""
    folder = tmp_path / "images" / "web"
    for sub in ("files", "scripts", "keys"):
        (folder / sub).mkdir(parents=True)
    (folder / "files" / "motd").write_text("built by amibake\n")
    script = folder / "scripts" / "10-setup.sh"
    script.write_text("#!/bin/sh\necho setup\n")
    script.chmod(0o755)
    shutil.copy(KEY, folder / "keys" / "internal.asc")
    return tmp_path / "images"


def _write(images: Path, data: object, name: str = "web") -> Path:
    path = images / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _with(**changes: object) -> dict:
    """BASE with top-level fields replaced (a value of None removes the field)."""
    data = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return data


def _repo(**changes: object) -> list[dict]:
    repo = {**json.loads(json.dumps(BASE["repositories"][0])), **changes}
    return [{k: v for k, v in repo.items() if v is not None}]


def _file(**changes: object) -> list[dict]:
    return [{**BASE["files"][0], **changes}]


def test_the_shipped_definitions_and_the_example_load() -> None:
    found = {p.name for p in definition.discover(REPO / "images")}
    assert found == {"centos7.yaml", "debian12.yaml"}, "examples/ must not become DAGs"
    for path in [*definition.discover(REPO / "images"), EXAMPLE]:
        image = definition.load(path)
        assert image.name == path.stem and image.recipe in CONTRACT.recipes
    example = definition.load(EXAMPLE)
    assert (
        example.repositories[0].connection_id and example.files and example.scripts and example.smoke_checks
    )
    # the example shows every field of the schema
    schema = json.loads(definition.SCHEMA_FILE.read_text())
    assert set(yaml.safe_load(EXAMPLE.read_text())) == set(schema["properties"])


def test_the_base_is_valid_and_says_what_it_builds(images: Path) -> None:
    image = definition.load(_write(images, BASE))
    assert definition.dag_id(image.name) == "amibake_web"
    assert image.install == ("nginx-light",) and image.enable == ("nginx.service",)
    assert image.repositories[0].components == ("main",) and image.schedule_set is False
    assert image.folder == images / "web"


@pytest.fixture
def gpg(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """``gpg(*args)``: gpg in a throwaway GNUPGHOME (its agent stopped, the home removed, after the test)."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)

    def run(*args: str) -> str:
        return subprocess.run(
            [
                "gpg",
                "--homedir",
                str(home),
                "--batch",
                "--passphrase",
                "",
                "--pinentry-mode",
                "loopback",
                *args,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    try:
        yield run
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
        shutil.rmtree(home, ignore_errors=True)


def _gpg_fingerprints(gpg: Callable[..., str], key_file: Path) -> list[str]:
    """The primary keys' fingerprints gpg itself reads in a key file (``--show-keys --with-colons``)."""
    lines = gpg("--show-keys", "--with-colons", str(key_file)).splitlines()
    # an fpr line follows each pub (primary) and sub (subkey) line: keep the primaries'
    return [lines[n + 1].split(":")[9] for n, line in enumerate(lines) if line.startswith("pub:")]


def test_the_key_fingerprint_is_the_one_gpg_computes(gpg: Callable[..., str], tmp_path: Path) -> None:
    """Throwaway keys (RSA with a subkey: 2-byte packet lengths; ed25519), alone and together."""
    gpg("--quick-gen-key", "amibake test rsa <rsa@example.com>", "rsa2048", "sign", "never")
    gpg("--quick-gen-key", "amibake test ed <ed@example.com>", "ed25519", "sign", "never")
    rsa = gpg("--list-keys", "--with-colons", "rsa@example.com").split("fpr:::::::::")[1].split(":")[0]
    gpg("--quick-add-key", rsa, "rsa2048", "encr", "never")
    files = {}
    for who in ("rsa@example.com", "ed@example.com"):
        files[who] = tmp_path / f"{who}.asc"
        files[who].write_text(gpg("--export", "--armor", who))
    both = tmp_path / "both.asc"
    both.write_text(gpg("--export", "--armor", "rsa@example.com", "ed@example.com"))
    for key_file in [*files.values(), both]:
        ours = definition.key_fingerprints(key_file.read_text())
        assert ours == _gpg_fingerprints(gpg, key_file), key_file.name
    assert len(definition.key_fingerprints(both.read_text())) == 2
    # the shipped example's key too
    assert definition.key_fingerprints(KEY.read_text()) == _gpg_fingerprints(gpg, KEY) == [FINGERPRINT]
    # an exported SECRET key is refused, whatever its armor says
    secret = gpg("--export-secret-keys", "--armor", "ed@example.com")
    with pytest.raises(ValueError, match="PRIVATE KEY BLOCK"):
        definition.key_fingerprints(secret)
    relabeled = secret.replace("PRIVATE KEY", "PUBLIC KEY")
    with pytest.raises(ValueError, match="SECRET key"):
        definition.key_fingerprints(relabeled)


ORG_ARN = "arn:aws:organizations::123456789012:organization/o-abc123defg"
OU_ARN = "arn:aws:organizations::123456789012:ou/o-abc123defg/ou-ab12-cdefgh34"


def _dist(**fields: object) -> dict:
    """A distribution field with these fields."""
    return dict(fields)


def _make(images: Path, how: Callable[[Path], object]) -> Path:
    """Apply a hostile change (a function of the images dir returning the definition data)."""
    return _write(images, how(images))


def _symlink_out(images: Path) -> dict:
    (images / "web" / "files" / "motd").unlink()
    (images / "web" / "files" / "motd").symlink_to("/etc/shadow")
    return BASE


def _symlinked_dir(images: Path) -> dict:
    outside = images.parent / "elsewhere"
    outside.mkdir()
    (outside / "motd").write_text("x")
    shutil.rmtree(images / "web" / "files")
    (images / "web" / "files").symlink_to(outside)
    return BASE


def _huge_file(images: Path) -> dict:
    with open(images / "web" / "files" / "motd", "wb") as f:
        f.truncate(CONTRACT.image_file_max_bytes + 1)
    return BASE


def _script(body: bytes) -> Callable[[Path], dict]:
    def make(images: Path) -> dict:
        (images / "web" / "scripts" / "10-setup.sh").write_bytes(body)
        return BASE

    return make


def _two_keys(images: Path) -> dict:
    key = (images / "web" / "keys" / "internal.asc").read_text()
    (images / "web" / "keys" / "internal.asc").write_text(key + key)  # two blocks: the reader sees one
    body = key.splitlines()
    # one armored block holding the key's packets twice: two primary keys
    blank = body.index("")
    data = "".join(line for line in body[blank + 1 :] if line and not line.startswith(("=", "-----")))
    import base64

    raw = base64.b64decode(data)
    doubled = base64.b64encode(raw + raw).decode()
    text = "\n".join([body[0], "", *[doubled[i : i + 64] for i in range(0, len(doubled), 64)], body[-1]])
    (images / "web" / "keys" / "internal.asc").write_text(text + "\n")
    return BASE


def _key_text(change: Callable[[str], str]) -> Callable[[Path], dict]:
    """The key file of :data:`BASE` rewritten by ``change`` (its armored text in, new text out)."""

    def make(images: Path) -> dict:
        key = images / "web" / "keys" / "internal.asc"
        key.write_text(change(key.read_text()))
        return BASE

    return make


def _source_is_a_dir(images: Path) -> dict:
    (images / "web" / "files" / "motd").unlink()
    (images / "web" / "files" / "motd").mkdir()
    return BASE


HOSTILE: list[tuple[str, Callable[[Path], object], str, str]] = [
    # (id, make the definition, field the error names, words of the problem)
    ("source-dotdot", lambda i: _with(files=_file(source="../../../etc/shadow")), "files[0].source", "match"),
    ("source-absolute", lambda i: _with(files=_file(source="/etc/shadow")), "files[0].source", "match"),
    ("source-symlink-out", _symlink_out, "files[0].source", "symlink"),
    ("source-dir-symlinked", _symlinked_dir, "files[0].source", "symlink"),
    ("source-missing", lambda i: _with(files=_file(source="nope")), "files[0].source", "does not exist"),
    ("source-not-a-file", _source_is_a_dir, "files[0].source", "not a regular file"),
    ("script-dotdot", lambda i: _with(scripts=["../files/motd"]), "scripts[0]", "match"),
    ("key-dotdot", lambda i: _with(repositories=_repo(gpg_key="../../web.yaml")),
     "repositories[0].gpg_key", "match"),
    ("dest-proc", lambda i: _with(files=_file(destination="/proc/sys/kernel/x")),
     "files[0].destination", "/proc"),
    ("dest-dev", lambda i: _with(files=_file(destination="/dev/sda")), "files[0].destination", "/dev"),
    ("dest-sys", lambda i: _with(files=_file(destination="/sys/x")), "files[0].destination", "/sys"),
    ("dest-run", lambda i: _with(files=_file(destination="/run")), "files[0].destination", "/run"),
    ("dest-dotdot", lambda i: _with(files=_file(destination="/etc/../proc/x")),
     "files[0].destination", "match"),
    ("dest-relative", lambda i: _with(files=_file(destination="etc/motd")), "files[0].destination", "match"),
    ("dest-trailing-slash", lambda i: _with(files=_file(destination="/etc/")),
     "files[0].destination", "match"),
    ("pkg-semicolon", lambda i: _with(packages={"install": ["curl;reboot"]}), "packages.install[0]", "match"),
    ("pkg-subst", lambda i: _with(packages={"install": ["$(reboot)"]}), "packages.install[0]", "match"),
    ("pkg-backtick", lambda i: _with(packages={"remove": ["`id`"]}), "packages.remove[0]", "match"),
    ("pkg-pipe", lambda i: _with(packages={"exclude": ["a|b"]}), "packages.exclude[0]", "match"),
    ("pkg-space", lambda i: _with(packages={"install": ["a b"]}), "packages.install[0]", "match"),
    ("pkg-option", lambda i: _with(packages={"install": ["--force-yes"]}), "packages.install[0]", "match"),
    ("url-credentials", lambda i: _with(repositories=_repo(base_url="https://u:p@repo.example/x")),
     "repositories[0].base_url", "credentials never go in a URL"),
    ("mirror-credentials", lambda i: _with(mirror="http://user@mirror.example/debian"),
     "mirror", "credentials"),
    ("url-query", lambda i: _with(repositories=_repo(base_url="https://repo.example/x?token=1")),
     "repositories[0].base_url", "query"),
    ("url-ftp", lambda i: _with(mirror="ftp://mirror.example/debian"), "mirror", "http:// or https://"),
    ("url-space", lambda i: _with(mirror="http://m.example/a b"), "mirror", "http(s)://host"),
    ("unknown-top-key", lambda i: _with(packagez=["x"]), "packagez", "not a field here"),
    ("unknown-nested-key", lambda i: _with(files=_file(chmod="0777")), "files[0].chmod",
     "the fields: source, destination, mode, owner, group"),
    ("missing-recipe", lambda i: _with(recipe=None), "recipe", "required"),
    ("size-string", lambda i: _with(size_gib="8"), "size_gib", "must be an integer, got a string '8'"),
    ("size-bool", lambda i: _with(size_gib=True), "size_gib", "must be an integer, got true or false"),
    ("size-zero", lambda i: _with(size_gib=0), "size_gib", "minimum"),
    ("size-too-big", lambda i: _with(size_gib=CONTRACT.canvas_size_max_gib + 1), "size_gib", "maximum"),
    ("packages-a-string", lambda i: _with(packages={"install": "nginx"}), "packages.install",
     "must be a list"),
    ("pkg-trailing-newline", lambda i: _with(packages={"install": ["nginx\n"]}), "packages.install[0]",
     "control character '\\n'"),
    ("pkg-twice", lambda i: _with(packages={"install": ["nginx", "nginx"]}), "packages.install", "twice"),
    ("pkg-installed-and-removed", lambda i: _with(packages={"install": ["vim"], "remove": ["vim"]}),
     "packages.remove[0]", "also in packages.install"),
    ("service-enabled-and-disabled",
     lambda i: _with(services={"enable": ["a.service"], "disable": ["a.service"]}),
     "services.disable[0]", "also in services.enable"),
    ("dest-below-another-file", lambda i: _with(files=_file() + _file(destination="/etc/motd/x")),
     "files[1].destination", "below '/etc/motd'"),
    ("too-many-checks",
     lambda i: _with(smoke_checks=[{"name": f"c{n}", "command": "true"} for n in range(101)]),
     "smoke_checks", "101 entries, at most 100"),
    ("description-huge", lambda i: _with(description="x" * 501), "description", "501 characters long"),
    ("unknown-recipe", lambda i: _with(recipe="rhel9"), "recipe", "is not one of"),
    ("huge-file", _huge_file, "files[0].source", "more than"),
    ("script-no-shebang", _script(b"echo hi\n"), "scripts[0]", "#!"),
    ("script-relative-shebang", _script(b"#!bash\necho hi\n"), "scripts[0]", "naming its interpreter"),
    ("script-crlf", _script(b"#!/bin/sh\r\necho hi\r\n"), "scripts[0]", "CRLF"),
    ("script-binary", _script(b"#!/bin/sh\n\x00\x01ELF"), "scripts[0]", "NUL"),
    ("script-not-utf8", _script(b"#!/bin/sh\necho \xff\xfe\n"), "scripts[0]", "UTF-8"),
    ("fingerprint-mismatch", lambda i: _with(repositories=_repo(gpg_fingerprint="A" * 40)),
     "repositories[0].gpg_key", "not the pinned"),
    ("fingerprint-lowercase", lambda i: _with(repositories=_repo(gpg_fingerprint=FINGERPRINT.lower())),
     "repositories[0].gpg_fingerprint", "match"),
    ("key-two-keys", _two_keys, "repositories[0].gpg_key", "2 public keys"),
    ("key-two-blocks", _key_text(lambda k: k + k), "repositories[0].gpg_key", "2 public keys"),
    ("key-text-outside", _key_text(lambda k: "Here is our key:\n" + k), "repositories[0].gpg_key",
     "line 1 is outside"),
    ("key-damaged", _key_text(lambda k: k.replace(k.splitlines()[2], k.splitlines()[2][::-1])),
     "repositories[0].gpg_key", "checksum"),
    ("key-private", _key_text(lambda k: k.replace("PUBLIC KEY", "PRIVATE KEY")), "repositories[0].gpg_key",
     "not a public key block"),
    ("key-not-armored", _key_text(lambda k: "\n"), "repositories[0].gpg_key", "no BEGIN"),
    ("name-not-stem", lambda i: _with(name="other"), "name", "file's name"),
    ("name-uppercase", lambda i: _with(name="Web"), "name", "match"),
    ("duplicate-repo", lambda i: _with(repositories=_repo() + _repo()), "repositories[1]", "twice"),
    ("duplicate-destination", lambda i: _with(files=_file() + _file()), "files[1]", "twice"),
    ("apt-without-suite", lambda i: _with(repositories=_repo(suite=None)),
     "repositories[0].suite", "needs suite"),
    ("yum-with-suite", lambda i: _with(recipe="centos7"), "repositories[0].suite", "no suite"),
    ("yaml-alias-bomb", lambda i: "name: &a web\nrecipe: debian12\ndescription: *a\n", "line 3, column 14",
     "aliases"),
    ("yaml-duplicate-key", lambda i: "name: web\nrecipe: debian12\nrecipe: centos7\n", "line 3, column 1",
     "twice"),
    ("definition-huge", lambda i: "name: web\n" + "#" * definition.DEFINITION_MAX_BYTES, "(file)",
     "more than"),
    ("yaml-not-a-mapping", lambda i: "- name: web\n", "(top level)", "mapping"),
    ("yaml-deep-nesting", lambda i: "name: " + "[" * 100_000 + "]" * 100_000 + "\n",
     "line 1, column 1006" if yaml.__with_libyaml__ else "(yaml)", "nest"),
    ("yaml-number-key", lambda i: "name: web\nrecipe: debian12\n8: size\n", "line 3, column 1",
     "not a field name"),
    ("yaml-date-value", lambda i: "name: web\nrecipe: debian12\ndescription: 2026-11-30\n", "description",
     "got a date"),
    ("yaml-python-tag", lambda i: "name: !!python/object/apply:os.system [id]\n", "line 1, column 7",
     "constructor"),
    ("distribution-unknown-field", lambda i: _with(distribution={"region": "eu-west-1"}),
     "distribution.region", "not a field here"),
    ("distribution-region-bare", lambda i: _with(distribution={"regions": ["eu-west-1"]}),
     "distribution.regions[0]", "must be a mapping"),
    ("distribution-region-bad", lambda i: _with(distribution=_dist(regions=[{"region": "Europe"}])),
     "distribution.regions[0].region", "an AWS region"),
    ("distribution-region-twice",
     lambda i: _with(distribution=_dist(regions=[{"region": "eu-west-1"}, {"region": "eu-west-1"}])),
     "distribution.regions[1]", "'eu-west-1' is given twice"),
    ("distribution-region-extra", lambda i: _with(distribution=_dist(regions=[{"region": "eu-west-1",
     "encrypted": True}])), "distribution.regions[0].encrypted", "not a field here"),
    ("distribution-kms-bad", lambda i: _with(distribution=_dist(regions=[{"region": "eu-west-1",
     "kms_key_id": "my key"}])), "distribution.regions[0].kms_key_id", "a KMS key"),
    ("distribution-kms-other-region", lambda i: _with(distribution=_dist(regions=[{"region": "eu-west-1",
     "kms_key_id": "arn:aws:kms:us-east-1:123456789012:alias/amibake"}])),
     "distribution.regions[0].kms_key_id", "not of eu-west-1"),
    ("distribution-account-number", lambda i: _with(distribution=_dist(accounts=[123456789012])),
     "distribution.accounts[0]", "quote it"),
    ("distribution-account-short", lambda i: _with(distribution=_dist(accounts=["12345678901"])),
     "distribution.accounts[0]", "12 digits"),
    ("distribution-account-twice", lambda i: _with(distribution=_dist(accounts=["123456789012"] * 2)),
     "distribution.accounts", "given twice"),
    ("distribution-org-bad", lambda i: _with(distribution=_dist(organization_arns=["o-abc123defg"])),
     "distribution.organization_arns[0]", "an organization ARN"),
    ("distribution-ou-is-org", lambda i: _with(distribution=_dist(organizational_unit_arns=[ORG_ARN])),
     "distribution.organizational_unit_arns[0]", "an organizational unit ARN"),
    ("mode-not-octal", lambda i: _with(files=_file(mode="0999")), "files[0].mode", "match"),
    ("mode-an-int", lambda i: _with(files=_file(mode=644)), "files[0].mode", "must be a string"),
    ("mode-unquoted-octal", lambda i: yaml.safe_dump(BASE).replace("mode: '0644'", "mode: 0644"),
     "files[0].mode", 'quote it ("0644")'),
    ("owner-space", lambda i: _with(files=_file(owner="root root")), "files[0].owner", "match"),
    ("kernel-arg-space", lambda i: _with(kernel_args=["quiet splash"]), "kernel_args[0]", "match"),
    ("rebuild-after-hours", lambda i: _with(rebuild_after="12h"), "rebuild_after", "whole days"),
    ("rebuild-after-zero", lambda i: _with(rebuild_after="0d"), "rebuild_after", "whole days"),
    ("rebuild-after-number", lambda i: _with(rebuild_after=30), "rebuild_after", "a string"),
    ("kernel-arg-quote", lambda i: _with(kernel_args=["init='/bin/sh'"]), "kernel_args[0]", "match"),
    ("service-slash", lambda i: _with(services={"enable": ["../../x.service"]}),
     "services.enable[0]", "match"),
    ("check-blank-command", lambda i: _with(smoke_checks=[{"name": "a", "command": "   "}]),
     "smoke_checks[0].command", "blank"),
    ("bad-schedule", lambda i: _with(schedule="every night"), "schedule", "cron"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "field", "words"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_a_hostile_definition_is_refused_naming_the_file_and_the_field(
    images: Path, make: Callable[[Path], object], field: str, words: str
) -> None:
    path = _make(images, make)
    with pytest.raises(DefinitionError) as exc:
        definition.load(path)
    assert str(exc.value).startswith("images/web.yaml: "), str(exc.value)
    assert exc.value.field == field, str(exc.value)
    assert words in exc.value.problem, str(exc.value)


def test_at_least_twenty_hostile_definitions_are_covered() -> None:
    assert len(HOSTILE) >= 20


#: Where each of the contract's regexes is the schema's pattern (path of keys in the schema).
_ITEM, _PROPS = "items", "properties"
SCHEMA_PATTERNS = {
    (_PROPS, "name"): "image_name_re",
    (_PROPS, "mirror"): "mirror_url_re",
    **{(_PROPS, "packages", _PROPS, k, _ITEM): "package_name_re" for k in ("install", "exclude", "remove")},
    (_PROPS, "repositories", _ITEM, _PROPS, "name"): "repo_name_re",
    (_PROPS, "repositories", _ITEM, _PROPS, "base_url"): "mirror_url_re",
    (_PROPS, "repositories", _ITEM, _PROPS, "suite"): "repo_name_re",  # the box checks it so too
    (_PROPS, "repositories", _ITEM, _PROPS, "components", _ITEM): "repo_name_re",
    (_PROPS, "repositories", _ITEM, _PROPS, "gpg_key"): "bundle_path_re",
    (_PROPS, "repositories", _ITEM, _PROPS, "gpg_fingerprint"): "gpg_fingerprint_re",
    (_PROPS, "files", _ITEM, _PROPS, "source"): "bundle_path_re",
    (_PROPS, "files", _ITEM, _PROPS, "destination"): "image_path_re",
    (_PROPS, "files", _ITEM, _PROPS, "mode"): "file_mode_re",
    (_PROPS, "files", _ITEM, _PROPS, "owner"): "owner_re",
    (_PROPS, "files", _ITEM, _PROPS, "group"): "owner_re",
    (_PROPS, "scripts", _ITEM): "bundle_path_re",
    (_PROPS, "services", _PROPS, "enable", _ITEM): "service_name_re",
    (_PROPS, "services", _PROPS, "disable", _ITEM): "service_name_re",
    (_PROPS, "kernel_args", _ITEM): "kernel_arg_re",
    (_PROPS, "smoke_checks", _ITEM, _PROPS, "name"): "image_name_re",
}
#: Patterns of the schema that are not the contract's (Airflow's connection id rule, "not blank").
OWN_PATTERNS = {
    (_PROPS, "repositories", _ITEM, _PROPS, "connection_id"): definition.CONNECTION_ID_PATTERN,
    (_PROPS, "smoke_checks", _ITEM, _PROPS, "command"): definition.NOT_BLANK,
    (
        _PROPS,
        "rebuild_after",
    ): definition.REBUILD_AFTER_PATTERN,
    **{
        (_PROPS, "distribution", _PROPS, *where): pattern
        for where, pattern in {
            ("regions", _ITEM, _PROPS, "region"): definition.REGION_PATTERN,
            ("regions", _ITEM, _PROPS, "kms_key_id"): definition.KMS_KEY_PATTERN,
            ("accounts", _ITEM): definition.ACCOUNT_PATTERN,
            ("organization_arns", _ITEM): definition.ORGANIZATION_ARN_PATTERN,
            ("organizational_unit_arns", _ITEM): definition.OU_ARN_PATTERN,
        }.items()
    },
}


def _schema_at(schema: dict, where: tuple[str, ...]) -> dict:
    for key in where:
        schema = schema[key]
    return schema


def test_schema_patterns_are_the_contracts() -> None:
    """One home: each pattern of the static schema is, at its place, the contract.env regex (drift test)."""
    schema = json.loads(definition.SCHEMA_FILE.read_text())

    def patterns(node: object, where: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                yield where, node["pattern"]
            for key, value in node.items():
                yield from patterns(value, (*where, key))

    found = dict(patterns(schema))
    wanted = {
        where: getattr(CONTRACT, name).pattern for where, name in SCHEMA_PATTERNS.items()
    } | OWN_PATTERNS
    assert found == wanted
    for where, value in OWN_PATTERNS.items():
        assert re.compile(value) and _schema_at(schema, where)["pattern"] == value


def test_schema_limits_are_the_contracts_and_the_boxs() -> None:
    """Ranges and lists of the schema: the contract's canvas range and recipes, the retention ranges of
    operators/defaults.py, and the box's limit of numbered image.env entries (lib/imagedef.sh)."""
    from operators import defaults

    props = json.loads(definition.SCHEMA_FILE.read_text())["properties"]
    assert props["recipe"]["enum"] == list(CONTRACT.recipes) == list(definition.PACKAGE_FAMILY)
    assert (props["size_gib"]["minimum"], props["size_gib"]["maximum"]) == (
        CONTRACT.canvas_size_min_gib,
        CONTRACT.canvas_size_max_gib,
    )
    retention = props["retention"]["properties"]
    assert (retention["keep"]["minimum"], retention["keep"]["maximum"]) == defaults.KEEP_AMIS_RANGE
    assert (
        retention["deprecate"]["minimum"],
        retention["deprecate"]["maximum"],
    ) == defaults.DEPRECATE_GRACE_RANGE
    repo_props = props["repositories"]["items"]["properties"]
    assert props["mirror"]["maxLength"] == repo_props["base_url"]["maxLength"] == CONTRACT.mirror_url_max
    box = (REPO / "include" / "scripts" / "lib" / "imagedef.sh").read_text()
    entries_max = int(re.search(r"^IMAGE_ENTRIES_MAX=([0-9]+)$", box, re.M).group(1))
    assert {props[k]["maxItems"] for k in ("repositories", "files", "smoke_checks")} == {entries_max}


def test_overrides_are_checked_as_the_file_is(images: Path) -> None:
    image = definition.load(_write(images, BASE))
    changed = definition.apply_overrides(image, {"size_gib": 6, "retention.keep": 5})
    assert (changed.size_gib, changed.keep, image.size_gib) == (6, 5, 4)
    with pytest.raises(DefinitionError, match=r"images/web.yaml: size_gib: .*maximum"):
        definition.apply_overrides(image, {"size_gib": 10**9})
    with pytest.raises(DefinitionError, match=r"mirror: credentials never go in a URL"):
        definition.apply_overrides(image, {"mirror": "http://a:b@m.example/debian"})
    with pytest.raises(DefinitionError, match=r"packages: is not a field a run may override"):
        definition.apply_overrides(image, {"packages": {"install": ["evil"]}})


def test_load_named_refuses_a_path_as_a_name(images: Path) -> None:
    _write(images, BASE)
    assert definition.load_named(images, "web").name == "web"
    for name in ("../web", "web/../web", "", "WEB"):
        with pytest.raises(DefinitionError, match="not an image name"):
            definition.load_named(images, name)


def test_the_bundle_is_what_the_box_reads(images: Path, tmp_path: Path) -> None:
    image = definition.load(_write(images, BASE))
    stage = tmp_path / "stage"
    (stage / "scripts").mkdir(parents=True)
    (stage / "scripts" / "build-image").write_text("#!/bin/bash\n")
    definition.render_bundle(image, stage / "image")
    env_text = (stage / "image" / "image.env").read_text()
    values = contract.parse(env_text)  # the contract's strict KEY='value' format
    assert values["IMAGE_REPO_1_KEY"] == "keys/internal.asc" and values["IMAGE_REPO_1_AUTH"] == "1"
    assert values["IMAGE_FILE_1_SOURCE"] == "files/motd" and values["IMAGE_SCRIPTS"] == "scripts/10-setup.sh"
    assert (stage / "image" / values["IMAGE_CHECK_1_COMMAND"]).read_text() == BASE["smoke_checks"][0][
        "command"
    ]
    assert os.access(stage / "image" / "scripts" / "10-setup.sh", os.X_OK)
    # bash reads the same values by sourcing it
    keys = " ".join(values)
    out = subprocess.run(
        ["bash", "-c", f'set -eu; . "$1"; for k in {keys}; do printf "%s=%s\\n" "$k" "${{!k}}"; done', "_",
         str(stage / "image" / "image.env")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert dict(line.split("=", 1) for line in out.splitlines()) == values
    digest = definition.write_manifest(stage)
    sums = (stage / "SHA256SUMS").read_bytes()
    assert digest == hashlib.sha256(sums).hexdigest()
    # sha256sum itself agrees with every line
    subprocess.run(["sha256sum", "--check", "--strict", "--quiet", "SHA256SUMS"], cwd=stage, check=True)
    listed = {line.split("  ", 1)[1] for line in sums.decode().splitlines()}
    assert "scripts/build-image" in listed and "image/image.env" in listed and "image/files/motd" in listed


def test_the_command_line_check(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(images, BASE)
    bad = _write(images, {**BASE, "name": "bad", "kernel_args": ["a b"]}, name="bad")
    assert definition.main([str(good)]) == 0
    assert definition.main([str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "OK   " in out and "FAIL images/bad.yaml: kernel_args[0]:" in out


def test_discover_finds_top_level_definitions_only(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "examples").mkdir(parents=True)
    for name in ("b.yaml", "a.yaml", ".hidden.yaml", "notes.txt", "examples/c.yaml"):
        (images / name).write_text("name: x\n")
    (images / "dir.yaml").mkdir()
    assert [p.name for p in definition.discover(images)] == ["a.yaml", "b.yaml"]
    assert definition.discover(tmp_path / "missing") == []


def test_names_of_the_dag_and_the_ami_line() -> None:
    # the shipped definitions keep the prefixes their recipes had: older AMIs rotate on with new ones
    from operators import defaults
    from operators.rules import naming

    assert defaults.default_ami_prefix("centos7") == "amibake-centos7"
    assert definition.dag_id("debian12") == "amibake_debian12"

    longest = "a" * 40
    assert CONTRACT.image_name_re.fullmatch(longest) and not CONTRACT.image_name_re.fullmatch(longest + "a")
    assert naming.AMI_NAME_RE.fullmatch(defaults.default_ami_prefix(longest))
    assert len(defaults.default_ami_prefix(longest)) <= naming.AMI_PREFIX_MAX
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,250}", definition.dag_id(longest + "-x"))  # Airflow's dag_id rule


def test_defaults_and_schedule_absent_or_null(images: Path) -> None:
    minimal = definition.load(_write(images, {"name": "web", "recipe": "centos7"}))
    assert (minimal.size_gib, minimal.keep, minimal.deprecate, minimal.mirror) == (
        definition.DEFAULT_SIZE_GIB,
        definition.DEFAULT_KEEP,
        definition.DEFAULT_DEPRECATE,
        "",
    )
    assert (minimal.schedule, minimal.schedule_set) == (None, False)  # the [amibake] schedule
    manual = definition.load(_write(images, {"name": "web", "recipe": "centos7", "schedule": None}))
    assert (manual.schedule, manual.schedule_set) == (None, True)  # manual runs only
    assert hash(minimal) != hash(manual)  # frozen, hashable
    with pytest.raises(AttributeError):
        minimal.size_gib = 9  # type: ignore[misc]


def test_overrides_refuse_other_fields_and_leave_the_definition_alone(images: Path) -> None:
    image = definition.load(_write(images, BASE))
    for field in ("name", "recipe", "retention", "retention.foo", "packages.install", "scripts"):
        with pytest.raises(
            DefinitionError, match=rf"images/web.yaml: {re.escape(field)}: is not a field a run"
        ):
            definition.apply_overrides(image, {field: 1})
    with pytest.raises(DefinitionError, match=r"retention.keep: must be an integer, got a string"):
        definition.apply_overrides(image, {"retention.keep": "5"})
    changed = definition.apply_overrides(image, {"mirror": "http://mirror.example/debian"})
    assert changed.mirror == "http://mirror.example/debian" and image.mirror == ""
    assert "mirror" not in image.raw and definition.apply_overrides(image, {}) == image


def test_the_canonical_hash_is_of_the_values_not_the_spelling(images: Path) -> None:
    path = _write(images, BASE)
    first = definition.canonical_hash(definition.load(path))
    # the same values written otherwise (defaults spelled out, another key order, comments)
    spelled = yaml.safe_dump({"retention": {"keep": 3, "deprecate": 2}, **BASE}, sort_keys=True)
    assert definition.canonical_hash(definition.load(_write(images, "# a comment\n" + spelled))) == first
    # another value, another hash; and the overridden definition has its own
    image = definition.load(path)
    assert definition.canonical_hash(definition.apply_overrides(image, {"size_gib": 5})) != first
    (images / "web" / "scripts" / "10-setup.sh").write_text("#!/bin/sh\necho changed\n")
    assert definition.canonical_hash(definition.load(path)) != first


def test_a_distribution_is_read_checked_and_handed_on_but_not_hashed(images: Path) -> None:
    """The distribution field as the brief's example writes it: read into a Distribution, handed on
    as JSON (the validate task's XCom), checked the same way on its own, and left out of the hash
    (where the AMI goes is not what it holds)."""
    written = {
        "regions": [{"region": "eu-west-1", "kms_key_id": "alias/amibake"}, {"region": "us-west-2"}],
        "accounts": ["123456789012", "210987654321"],
        "organization_arns": [ORG_ARN],
        "organizational_unit_arns": [OU_ARN],
    }
    image = definition.load(_write(images, _with(distribution=written)))
    assert image.distribution == definition.Distribution(
        regions=(definition.RegionCopy("eu-west-1", "alias/amibake"), definition.RegionCopy("us-west-2")),
        accounts=("123456789012", "210987654321"),
        organization_arns=(ORG_ARN,),
        organizational_unit_arns=(OU_ARN,),
    )
    assert image.distribution.as_dict() == written
    assert json.loads(json.dumps(image.distribution.as_dict())) == written
    assert definition.distribution_of(written) == image.distribution
    assert image.distribution.launch_permissions() == [
        {"UserId": "123456789012"},
        {"UserId": "210987654321"},
        {"OrganizationArn": ORG_ARN},
        {"OrganizationalUnitArn": OU_ARN},
    ]
    plain = definition.load(_write(images, BASE))
    assert not plain.distribution and plain.distribution.as_dict()["regions"] == []
    assert definition.canonical_hash(image) == definition.canonical_hash(plain)
    with pytest.raises(DefinitionError, match=r"^distribution: distribution\.regions\[0\]\.region: "):
        definition.distribution_of({"regions": [{"region": "EU"}]})


def test_the_manifest_covers_scripts_and_image_only(tmp_path: Path) -> None:
    build = tmp_path / "build"
    for name in ("scripts/build-image", "scripts/lib/common.sh", "image/image.env", "stray/other"):
        (build / name).parent.mkdir(parents=True, exist_ok=True)
        (build / name).write_text(name)
    definition.write_manifest(build)
    listed = [line.split("  ", 1)[1] for line in (build / "SHA256SUMS").read_text().splitlines()]
    assert listed == ["scripts/build-image", "scripts/lib/common.sh", "image/image.env"]
    (build / "image" / "link").symlink_to("/etc/passwd")
    with pytest.raises(ValueError, match="image/link: a symlink"):
        definition.write_manifest(build)


def test_the_cron_presets_are_airflows() -> None:
    """A definition's ``@preset`` schedules are the ones Airflow's timetables resolve (drift test)."""
    from airflow.sdk.definitions.timetables._cron import CRON_PRESETS

    assert set(definition.CRON_PRESETS) == set(CRON_PRESETS)


def test_a_source_swapped_after_loading_is_not_shipped(images: Path, tmp_path: Path) -> None:
    image = definition.load(_write(images, BASE))
    motd = images / "web" / "files" / "motd"
    motd.unlink()
    motd.symlink_to("/etc/shadow")
    with pytest.raises(DefinitionError, match=r"images/web.yaml: files/motd: cannot be read"):
        definition.render_bundle(image, tmp_path / "bundle")


def test_a_folder_named_like_a_definition_is_an_error(images: Path) -> None:
    (images / "web.yaml").mkdir()
    with pytest.raises(DefinitionError, match=r"images/web.yaml: \(file\): cannot be read"):
        definition.load(images / "web.yaml")


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    from jsonschema import Draft202012Validator

    schema = json.loads(definition.SCHEMA_FILE.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_the_box_reads_the_bundle_python_rendered(images: Path, tmp_path: Path) -> None:
    """The other side of the agreement: lib/imagedef.sh's ``load_image`` (the box's checks of every
    value, with the same contract) accepts the bundle, sees the same checks, and the box's key check
    (gpg on the box) agrees with the pinned fingerprint."""
    image = definition.load(_write(images, BASE))
    definition.render_bundle(image, tmp_path / "image")
    scripts = REPO / "include" / "scripts"
    probe = (
        'set -euo pipefail; . "$1/contract.env"; . "$1/lib/common.sh"; . "$1/lib/imagedef.sh"; '
        'IMAGE_DIR=$2 RECIPE=debian12; load_image; printf "%s\\n" "${IMAGE_CHECK_ARGS[@]}"; '
        'check_gpg_fingerprint "$IMAGE_DIR/$IMAGE_REPO_1_KEY" "$IMAGE_REPO_1_FINGERPRINT" >/dev/null'
    )
    out = subprocess.run(
        ["bash", "-c", probe, "_", str(scripts), str(tmp_path / "image")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["--check", "motd", BASE["smoke_checks"][0]["command"]]
