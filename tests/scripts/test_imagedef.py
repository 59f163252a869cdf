"""The box side of image definitions (lib/imagedef.sh, the recipes' repository hooks, instance-check's
--check): what build-image accepts in an image bundle, the manifest check, the credentials command,
the repository files it writes, and the smoke checks. No disk and no chroot: the Debian build test
(test_debian12.py) runs the phases themselves on a real image."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from loopdisk import BUILD_IMAGE, run_build

SCRIPTS = BUILD_IMAGE.parent
VOLUME = ["--recipe", "debian12", "--volume-id", "vol-0123456789abcdef0"]
FPR = "0123456789ABCDEF0123456789ABCDEF01234567"
SECRET = "s3cret-Pass word!"

#: A complete, valid image.env: one authenticated repository, one file, one script, one check.
GOOD_ENV = {
    "IMAGE_NAME": "web",
    "IMAGE_RECIPE": "debian12",
    "IMAGE_PACKAGES": "nginx-light amibake-hello",
    "IMAGE_EXCLUDE": "exim4",
    "IMAGE_REMOVE": "",
    "IMAGE_SERVICES_ENABLE": "amibake-hello.service",
    "IMAGE_SERVICES_DISABLE": "",
    "IMAGE_KERNEL_ARGS": "amibake.test=1",
    "IMAGE_REPO_COUNT": "2",
    "IMAGE_REPO_1_NAME": "internal",
    "IMAGE_REPO_1_URL": "http://127.0.0.1:8111/debian",
    "IMAGE_REPO_1_SUITE": "bookworm",
    "IMAGE_REPO_1_COMPONENTS": "main contrib",
    "IMAGE_REPO_1_KEY": "keys/internal.asc",
    "IMAGE_REPO_1_FINGERPRINT": FPR,
    "IMAGE_REPO_1_AUTH": "1",
    "IMAGE_REPO_2_NAME": "public",
    "IMAGE_REPO_2_URL": "https://repo.example.org/debian",
    "IMAGE_REPO_2_SUITE": "bookworm",
    "IMAGE_REPO_2_COMPONENTS": "main",
    "IMAGE_REPO_2_KEY": "keys/internal.asc",
    "IMAGE_REPO_2_FINGERPRINT": FPR,
    "IMAGE_REPO_2_AUTH": "0",
    "IMAGE_FILE_COUNT": "1",
    "IMAGE_FILE_1_SOURCE": "files/motd",
    "IMAGE_FILE_1_DEST": "/etc/motd",
    "IMAGE_FILE_1_MODE": "0640",
    "IMAGE_FILE_1_OWNER": "root",
    "IMAGE_FILE_1_GROUP": "adm",
    "IMAGE_SCRIPTS": "scripts/10-setup.sh",
    "IMAGE_CHECK_COUNT": "1",
    "IMAGE_CHECK_1_NAME": "web-answers",
    "IMAGE_CHECK_1_COMMAND": "checks/1",
}


def write_bundle(image: Path, env: dict[str, str] | None = None, raw: str | None = None) -> Path:
    """An image bundle as the worker ships it: image.env (``raw`` text, else ``env`` rendered) and its
    files."""
    for sub in ("keys", "files", "scripts", "checks"):
        (image / sub).mkdir(parents=True, exist_ok=True)
    (image / "keys/internal.asc").write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n")
    (image / "files/motd").write_text("hello\n")
    (image / "scripts/10-setup.sh").write_text("#!/bin/sh\necho setup\n")
    (image / "checks/1").write_text("curl -fsS 'http://127.0.0.1/' | grep -q \"it's up\"")
    if raw is None:
        raw = "# rendered by operators/rules/definition.py\n\n" + "".join(
            f"{k}='{v}'\n" for k, v in (env or GOOD_ENV).items()
        )
    (image / "image.env").write_text(raw)
    return image


def build_image(
    tmp: Path, *args: str, stdin: str = "", scripts: Path = SCRIPTS
) -> subprocess.CompletedProcess:
    """Run build-image (from ``scripts``) with its work dir in ``tmp``."""
    return subprocess.run(
        ["bash", str(scripts / "build-image"), *VOLUME, "--work-dir", str(tmp / "work"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def with_image(tmp: Path, image: Path) -> list[str]:
    return ["--image-dir", str(image), "--build-id", "run-1"]


def bash(code: str, *libs: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """bash code with contract.env, lib/common.sh, lib/imagedef.sh and ``libs`` sourced."""
    sources = " ".join(
        f'. "{SCRIPTS / lib}";' for lib in ("contract.env", "lib/common.sh", "lib/imagedef.sh", *libs)
    )
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; {sources} {code}"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


# --- image.env ---------------------------------------------------------------------------------------


def test_a_good_bundle_is_loaded_and_its_checks_become_expectations(tmp_path: Path) -> None:
    """The whole valid image.env passes, and the check command (quotes and all) reaches both the
    expectations event's JSON and instance-check's arguments intact."""
    image = write_bundle(tmp_path / "image")
    res = bash(
        f"RECIPE=debian12 IMAGE_DIR={image}; load_image; image_checks_json; echo; "
        'printf "%s\\n" "${IMAGE_CHECK_ARGS[@]}"'
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    command = (image / "checks/1").read_text()
    assert json.loads(lines[0]) == [{"name": "web-answers", "command": command}]
    assert lines[1:] == ["--check", "web-answers", command]


def _bad(key: str, value: str) -> dict[str, str]:
    return {**GOOD_ENV, key: value}


@pytest.mark.parametrize(
    ("raw", "env", "message"),
    [
        ("IMAGE_NAME=web\n", None, "line 1: not KEY='value'"),
        ("IMAGE_NAME='web' # comment\n", None, "line 1: not KEY='value'"),
        ("IMAGE_NAME='we'b'\n", None, "line 1: not KEY='value'"),
        ("IMAGE_NAME='$(touch /tmp/x)'\nPATH='/tmp'\n", None, "line 2: unknown key PATH"),
        ("export IMAGE_NAME='web'\n", None, "line 1: not KEY='value'"),
        (None, {**GOOD_ENV, "IMAGE_REPO_1_PASSWORD": "x"}, "unknown key IMAGE_REPO_1_PASSWORD"),
        (None, _bad("IMAGE_NAME", "Web_1"), "IMAGE_NAME"),
        (None, _bad("IMAGE_RECIPE", "centos7"), "IMAGE_RECIPE"),
        (None, _bad("IMAGE_PACKAGES", "nginx;reboot"), "IMAGE_PACKAGES"),
        (None, _bad("IMAGE_EXCLUDE", "-oDebug"), "IMAGE_EXCLUDE"),
        (None, _bad("IMAGE_SERVICES_ENABLE", "../x.service"), "IMAGE_SERVICES_ENABLE"),
        (None, _bad("IMAGE_KERNEL_ARGS", "init=/bin/sh$(id)"), "IMAGE_KERNEL_ARGS"),
        (None, _bad("IMAGE_REPO_COUNT", "x"), "IMAGE_REPO_COUNT"),
        (None, _bad("IMAGE_REPO_1_NAME", "In ternal"), "IMAGE_REPO_1_NAME"),
        (None, _bad("IMAGE_REPO_1_URL", "http://u:p@127.0.0.1/debian"), "IMAGE_REPO_1_URL"),
        (None, _bad("IMAGE_REPO_1_URL", "file:///srv/repo"), "IMAGE_REPO_1_URL"),
        (None, _bad("IMAGE_REPO_1_FINGERPRINT", FPR.lower()), "IMAGE_REPO_1_FINGERPRINT"),
        (None, _bad("IMAGE_REPO_1_AUTH", "yes"), "IMAGE_REPO_1_AUTH"),
        (None, _bad("IMAGE_REPO_1_KEY", "../keys/internal.asc"), "IMAGE_REPO_1_KEY"),
        (None, _bad("IMAGE_FILE_1_SOURCE", "/etc/shadow"), "IMAGE_FILE_1_SOURCE"),
        (None, _bad("IMAGE_FILE_1_SOURCE", "files/missing"), "IMAGE_FILE_1_SOURCE"),
        (None, _bad("IMAGE_FILE_1_DEST", "/proc/sys/kernel/x"), "below /proc"),
        (None, _bad("IMAGE_FILE_1_DEST", "/dev"), "below /dev"),
        (None, _bad("IMAGE_FILE_1_DEST", "/etc/../root/.ssh/authorized_keys"), "IMAGE_FILE_1_DEST"),
        (None, _bad("IMAGE_FILE_1_DEST", "etc/motd"), "IMAGE_FILE_1_DEST"),
        (None, _bad("IMAGE_FILE_1_MODE", "644x"), "IMAGE_FILE_1_MODE"),
        (None, _bad("IMAGE_FILE_1_MODE", "0999"), "IMAGE_FILE_1_MODE"),
        (None, _bad("IMAGE_FILE_1_OWNER", "root;x"), "IMAGE_FILE_1_OWNER"),
        (None, _bad("IMAGE_FILE_1_GROUP", "Adm"), "IMAGE_FILE_1_GROUP"),
        (None, _bad("IMAGE_SCRIPTS", "scripts/../../x.sh"), "IMAGE_SCRIPTS"),
        (None, _bad("IMAGE_CHECK_1_NAME", "Web Answers"), "IMAGE_CHECK_1_NAME"),
    ],
)
def test_a_bad_image_env_is_refused_before_anything(
    tmp_path: Path, raw: str | None, env: dict | None, message: str
) -> None:
    """Format first (nothing of a malformed file is sourced), then every value with contract.env's
    rules; the message names the line or the key. Nothing is created in the work dir."""
    image = write_bundle(tmp_path / "image", env, raw)
    res = build_image(tmp_path, *with_image(tmp_path, image), "credentials")
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    assert not (tmp_path / "work").exists()
    assert not Path("/tmp/x").exists()


def test_bundle_files_must_be_regular_small_text(tmp_path: Path) -> None:
    """A symlink anywhere in the bundle, a file over IMAGE_FILE_MAX_BYTES and a script that is not a
    #! text are refused, each named."""
    limit = int(bash("echo $IMAGE_FILE_MAX_BYTES").stdout)
    cases = {
        "symlink": lambda image: (
            (image / "files/motd").unlink() or (image / "files/motd").symlink_to("/etc/shadow")
        ),
        "more than": lambda image: os.truncate(image / "files/motd", limit + 1),
        "does not start with #!": lambda image: (image / "scripts/10-setup.sh").write_bytes(b"\x7fELF\x02"),
    }
    for n, (message, spoil) in enumerate(cases.items()):
        image = write_bundle(tmp_path / str(n) / "image")
        spoil(image)
        res = build_image(tmp_path, *with_image(tmp_path, image), "credentials")
        assert res.returncode != 0 and message in res.stderr, (message, res.stderr)


def test_options_are_validated(tmp_path: Path) -> None:
    image = write_bundle(tmp_path / "image")
    for args, message in [
        (["--image-dir", "relative/image", "--build-id", "x"], "--image-dir"),
        (["--image-dir", str(image)], "--build-id"),
        (["--image-dir", str(image), "--build-id", "a b"], "--build-id"),
        (["--manifest-sha256", "ABC"], "--manifest-sha256"),
    ]:
        res = build_image(tmp_path, *args, "credentials")
        assert res.returncode != 0 and message in res.stderr, (args, res.stderr)


# --- the shipped manifest ----------------------------------------------------------------------------


def shipped(tmp_path: Path) -> tuple[Path, str]:
    """A build dir as the worker ships it: scripts/, image/, SHA256SUMS; returns it and the digest."""
    build = tmp_path / "build"
    shutil.copytree(SCRIPTS, build / "scripts")
    write_bundle(build / "image")
    files = sorted(str(p.relative_to(build)) for p in build.rglob("*") if p.is_file())
    sums = subprocess.run(["sha256sum", *files], cwd=build, capture_output=True, text=True, check=True).stdout
    (build / "SHA256SUMS").write_text(sums)
    return build, hashlib.sha256(sums.encode()).hexdigest()


def test_the_manifest_is_checked_first(tmp_path: Path) -> None:
    """The right digest passes; a changed file is named; a changed SHA256SUMS is caught by its digest."""
    build, digest = shipped(tmp_path)
    args = ["--manifest-sha256", digest, *with_image(tmp_path, build / "image")]
    ok = build_image(tmp_path, *args, "credentials", scripts=build / "scripts")
    assert ok.returncode == 0, ok.stderr

    (build / "image/files/motd").write_text("changed\n")
    changed = build_image(tmp_path, *args, "credentials", scripts=build / "scripts")
    assert changed.returncode != 0
    assert "image/files/motd: FAILED" in changed.stderr, changed.stderr

    sums = build / "SHA256SUMS"
    sums.write_text(sums.read_text() + f"{'0' * 64}  image/extra\n")
    forged = build_image(tmp_path, *args, "credentials", scripts=build / "scripts")
    assert forged.returncode != 0
    assert "it changed after the worker shipped it" in forged.stderr

    elsewhere = write_bundle(tmp_path / "other")
    _, digest2 = digest, hashlib.sha256(sums.read_bytes()).hexdigest()
    moved = build_image(
        tmp_path,
        "--manifest-sha256",
        digest2,
        *with_image(tmp_path, elsewhere),
        "abort",
        scripts=build / "scripts",
    )
    assert moved.returncode != 0 and "image/files/motd: FAILED" in moved.stderr


# --- credentials -------------------------------------------------------------------------------------


def test_credentials_are_kept_root_only_and_forgotten_by_abort(tmp_path: Path) -> None:
    image = write_bundle(tmp_path / "image")
    res = build_image(
        tmp_path, *with_image(tmp_path, image), "credentials", stdin=f"internal\tdeploy\t{SECRET}\n"
    )
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr
    stored = tmp_path / "work/run/credentials"
    assert stored.read_text() == f"internal\tdeploy\t{SECRET}\n"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert {p.name for p in stored.parent.iterdir()} == {"credentials"}
    res = build_image(tmp_path, *with_image(tmp_path, image), "abort")
    assert res.returncode == 0, res.stderr
    assert not stored.exists()


@pytest.mark.root
def test_credentials_are_forgotten_when_all_ends(tmp_path: Path, make_volume) -> None:
    """`all` ends (here in resolve: the canvas is not the size given) and its exit trap deletes them."""
    vol = make_volume(size_gib=1)
    image = write_bundle(tmp_path / "image")
    options = [*with_image(tmp_path, image)]
    handed = run_build(vol, *options, "credentials", stdin=f"internal\tdeploy\t{SECRET}\n")
    assert handed.rc == 0, handed.stderr
    assert (vol.work / "run/credentials").exists()
    res = run_build(vol, *options, "--size-gib", "2", "all", timeout=120)
    assert res.rc != 0 and res.phases("phase-fail") == ["resolve"], res.stderr
    assert not (vol.work / "run/credentials").exists()


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ("internal deploy secret\n", "line 1 is not NAME<TAB>LOGIN<TAB>PASSWORD"),
        ("internal\tdeploy\n", "line 1 is not NAME<TAB>LOGIN<TAB>PASSWORD"),
        ("other\tdeploy\tsecret\n", "'other' is not a repository of the image that takes credentials"),
        ("public\tdeploy\tsecret\n", "'public' is not a repository of the image that takes credentials"),
        ("internal\t\tsecret\n", "an empty login or password"),
        ("internal\tdeploy\t\n", "an empty login or password"),
        ("internal\tdeploy\tsec\rret\n", "control character"),
        ("internal\tdeploy\tsec\tret\n", "control character"),
    ],
)
def test_bad_credentials_are_refused_and_nothing_is_kept(tmp_path: Path, stdin: str, message: str) -> None:
    image = write_bundle(tmp_path / "image")
    res = build_image(tmp_path, *with_image(tmp_path, image), "credentials", stdin=stdin)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    assert "secret" not in res.stderr and "sec\rret" not in res.stderr
    assert list((tmp_path / "work/run").iterdir()) == []


def test_credentials_need_an_image(tmp_path: Path) -> None:
    res = build_image(tmp_path, "credentials", stdin="internal\tdeploy\tx\n")
    assert res.returncode != 0 and "no --image-dir" in res.stderr


# --- repository files --------------------------------------------------------------------------------


def test_apt_repository_rendering(tmp_path: Path, gpg_key: tuple[Path, str]) -> None:
    """Debian: a one-line source signed-by the dearmored key, the login root-only in auth.conf.d (the
    whole URL: apt applies a scheme-less machine only to https), the exclude pins; clean removes the
    login."""
    key, _ = gpg_key
    root = tmp_path / "root"
    url = "http://127.0.0.1:8111/debian"
    res = bash(
        f'ROOT={root}; recipe_add_repository internal {url} bookworm "main contrib" {key}; '
        f"recipe_repository_auth internal {url} deploy 'pa$$:w0rd'; apt_exclude_pins exim4 nano",
        "recipes/debian12.sh",
    )
    assert res.returncode == 0, res.stderr
    source = root / "etc/apt/sources.list.d/amibake-internal.list"
    assert source.read_text() == (
        f"deb [signed-by=/usr/share/keyrings/amibake-internal.gpg] {url} bookworm main contrib\n"
    )
    keyring = (root / "usr/share/keyrings/amibake-internal.gpg").read_bytes()
    assert keyring[0] in (0x98, 0x99), "not a binary (dearmored) OpenPGP key"
    auth = root / "etc/apt/auth.conf.d/amibake-internal.conf"
    assert auth.read_text() == f"machine {url} login deploy password pa$$:w0rd\n"
    assert auth.stat().st_mode & 0o777 == 0o600
    assert res.stdout == (
        "Package: exim4\nPin: release *\nPin-Priority: -1\n\n"
        "Package: nano\nPin: release *\nPin-Priority: -1\n\n"
    )
    spaced = bash(f'ROOT={root}; recipe_repository_auth internal {url} deploy "a b"', "recipes/debian12.sh")
    assert spaced.returncode != 0 and "white space" in spaced.stderr
    cleaned = bash(f"ROOT={root}; IMAGE_LOADED=1; clean_credentials", "recipes/debian12.sh")
    assert cleaned.returncode == 0, cleaned.stderr
    assert not auth.exists() and source.exists()


def test_el7_repository_rendering(tmp_path: Path) -> None:
    """EL7: the .repo file with gpgcheck and the pinned key, username=/password= root-only until clean,
    then the same file without them; exclude= in the image's yum.conf. Only the rendering runs here:
    yum and rpm need an EL7 box (tests/scripts/test_centos7.py, el7box.py), which the suite has not."""
    root = tmp_path / "root"
    (root / "etc/yum.repos.d").mkdir(parents=True)
    (root / "etc/yum.conf").write_text("[main]\ngpgcheck=1\n")
    run = tmp_path / "run"
    run.mkdir()
    url = "https://els.example.com/centos/7/x86_64"
    res = bash(
        f'ROOT={root}; RUN_DIR={run}; el7_repo_section els {url} "file://$(el7_repo_key els)" '
        f'>"$(el7_repo_file els)"; recipe_repository_auth els {url} deploy "{SECRET}"; '
        f"el7_yum_exclude $ROOT/etc/yum.conf kernel-debug 'java-*'",
        "recipes/centos7.sh",
    )
    assert res.returncode == 0, res.stderr
    repo = root / "etc/yum.repos.d/amibake-els.repo"
    section = (
        "[amibake-els]\nname=amibake els\n"
        f"baseurl={url}\nenabled=1\ngpgcheck=1\ngpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-amibake-els\n"
    )
    assert repo.read_text() == section + f"username=deploy\npassword={SECRET}\n"
    assert repo.stat().st_mode & 0o777 == 0o600
    assert (run / "credentials-yum.conf").read_text().endswith(f"password={SECRET}\n")
    assert (root / "etc/yum.conf").read_text() == "[main]\nexclude=kernel-debug java-*\ngpgcheck=1\n"
    cleaned = bash(f"ROOT={root}; IMAGE_LOADED=1; clean_credentials", "recipes/centos7.sh")
    assert cleaned.returncode == 0, cleaned.stderr
    assert repo.read_text() == section
    assert repo.stat().st_mode & 0o777 == 0o644
    forgot = bash(f"RUN_DIR={run}; forget_credentials")
    assert forgot.returncode == 0 and list(run.iterdir()) == []


@pytest.fixture(scope="module")
def gpg_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A throwaway armored public key and its fingerprint (real gpg)."""
    tmp = tmp_path_factory.mktemp("gpg")
    home = tmp / "home"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    try:
        subprocess.run(
            [
                "gpg",
                "--batch",
                "--passphrase",
                "",
                "--quick-gen-key",
                "amibake test <t@example.invalid>",
                "ed25519",
                "sign",
                "1d",
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        key = tmp / "key.asc"
        subprocess.run(["gpg", "--batch", "--armor", "--output", str(key), "--export"], check=True, env=env)
        colons = subprocess.run(
            ["gpg", "--batch", "--with-colons", "--list-keys"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False)
    return key, next(line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:"))


def test_the_key_is_checked_against_its_pin(gpg_key: tuple[Path, str]) -> None:
    key, fpr = gpg_key
    assert bash(f"check_gpg_fingerprint {key} {fpr}").returncode == 0
    wrong = bash(f"check_gpg_fingerprint {key} {FPR}")
    assert wrong.returncode != 0 and f"'{fpr}', expected {FPR}" in wrong.stderr


# --- smoke checks ------------------------------------------------------------------------------------


def test_instance_check_runs_the_definitions_checks() -> None:
    """instance-check --check: each command through bash -c, an item "check NAME" PASS or FAIL with its
    exit code and last line. Run on this machine: the image's other items fail here and are ignored."""
    res = subprocess.run(
        [
            "bash",
            str(SCRIPTS / "instance-check"),
            "--check",
            "quoted",
            'echo "it\'s fine"',
            "--check",
            "broken",
            "echo first; echo 'last words'; exit 3",
        ],
        capture_output=True,
        text=True,
        timeout=200,
    )
    items = [line for line in res.stdout.splitlines() if line.startswith("amibake-check: check ")]
    assert items == [
        "amibake-check: check quoted: PASS: exit 0: it's fine",
        "amibake-check: check broken: FAIL: exit 3: last words",
    ]
    assert res.returncode != 0
    missing = subprocess.run(
        ["bash", str(SCRIPTS / "instance-check"), "--check", "alone"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "--check needs NAME and COMMAND" in missing.stderr


# --- verify's password search ------------------------------------------------------------------------


@pytest.mark.root
def test_verify_finds_a_password_in_a_file_or_in_free_blocks(tmp_path: Path, make_volume) -> None:
    """verify_no_secrets on a real XFS on a loop device (the whole device is the canvas here, made
    known to the function by redefining canvas_device in the test's bash, not in the scripts): a file
    holding a password is named; the same file deleted, its blocks not overwritten, is found in the raw
    bytes ("free blocks"); after `shred_file` (what clean does) nothing is found. The Debian build test
    runs it in the real verify phase on a built image."""
    vol = make_volume(size_gib=1)
    root, run = tmp_path / "root", tmp_path / "run"
    root.mkdir()
    run.mkdir()
    (run / "credentials").write_text(f"internal\tdeploy\t{SECRET}\n")
    subprocess.run(["mkfs.xfs", "-q", vol.device], check=True)
    subprocess.run(["mount", vol.device, str(root)], check=True)
    leak = root / "etc" / "leaked"
    leak.parent.mkdir()

    def verify() -> str:
        res = bash(
            f"ROOT={root} RUN_DIR={run}; canvas_device() {{ echo {vol.device}; }}; verify_no_secrets",
            "lib/verify.sh",
        )
        assert res.returncode == 0, res.stderr
        assert SECRET not in res.stdout + res.stderr
        assert [p.name for p in run.iterdir()] == ["credentials"], "the patterns file was left"
        return res.stdout + res.stderr

    def write_synced() -> None:
        with open(leak, "w") as note:
            note.write(f"password={SECRET}\n")
            note.flush()
            os.fsync(note.fileno())

    try:
        write_synced()
        assert "verify: FAIL: a repository password is in the image: /etc/leaked" in verify()
        leak.unlink()
        assert "verify: FAIL: a repository password is in the canvas's raw bytes (free blocks)" in verify()
        write_synced()  # shred overwrites the blocks it was given, then unlinks it
        assert bash(f"shred_file {leak}").returncode == 0
        assert not leak.exists()
        assert "verify: ok: no repository password in the image's files or raw bytes" in verify()
    finally:
        subprocess.run(["umount", str(root)], check=True)
