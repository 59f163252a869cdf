"""A real, signed apt repository behind HTTP basic auth on 127.0.0.1: an image definition's private
repository, for the rehearsal and the tests.

``AptRepo.serve(workdir, user=..., password=...)`` makes a throwaway OpenPGP key (its own GNUPGHOME),
builds the package ``amibake-hello`` with ``dpkg-deb`` (a file with its version, and a oneshot systemd
unit the package does NOT enable: a definition enables it), indexes it with ``apt-ftparchive``, signs
``InRelease`` and ``Release.gpg``, and serves the tree from a thread. Every request without the right
``Authorization: Basic`` header gets 401; each request's path and whether it was authorized are kept
in ``requests``. ``add_version`` publishes a newer version of the package and signs the index again.
Leaving the context stops the server, kills the key's gpg-agent and deletes the key's GNUPGHOME (a
short temporary path: gpg-agent's socket path has a length limit); the served tree stays in ``workdir``.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import http.server
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

SUITE = "bookworm"
COMPONENT = "main"
PACKAGE = "amibake-hello"
UNIT = f"{PACKAGE}.service"
#: What the package's unit writes at boot (the smoke check of the rehearsal's definition reads it).
UNIT_MARKER = f"/run/{PACKAGE}"
VERSION_FILE = f"/usr/share/{PACKAGE}/VERSION"
#: The name of the signing key's temporary GNUPGHOME starts with this (a killed run's is recognised).
GNUPGHOME_PREFIX = "amibake-gpg-"
#: A Debian version without epoch (Debian Policy 5.6.12): it names a file in the pool too.
VERSION_RE = re.compile(r"[0-9][A-Za-z0-9.+~]*(-[A-Za-z0-9.+~]+)?")


@dataclass
class AptRepo:
    """A served repository: what a definition needs to use it, and what the server saw."""

    root: Path
    gnupghome: Path
    url: str
    key_file: Path
    fingerprint: str
    suite: str = SUITE
    components: list[str] = field(default_factory=lambda: [COMPONENT])
    package: str = PACKAGE
    unit: str = UNIT
    requests: list[tuple[str, bool]] = field(default_factory=list)
    #: When the index was last published (epoch seconds, whole): each publication is at least 1 s later.
    published: int = 0

    @classmethod
    @contextlib.contextmanager
    def serve(
        cls, workdir: Path, *, user: str, password: str, version: str = "1.0", port: int = 0
    ) -> Iterator[AptRepo]:
        """Build, sign and serve the repository for the ``with`` block."""
        _check_version(version)
        workdir.mkdir(parents=True, exist_ok=True)
        gnupghome = Path(tempfile.mkdtemp(prefix=GNUPGHOME_PREFIX))
        server: http.server.ThreadingHTTPServer | None = None
        try:
            fingerprint = _make_key(gnupghome)
            key_file = workdir / "repo-key.asc"
            key_file.write_bytes(_gpg(gnupghome, "--armor", "--export", fingerprint))
            root = workdir / "www"
            (root / "debian").mkdir(parents=True)
            repo = cls(root, gnupghome, "", key_file, fingerprint)
            repo.add_version(version)
            handler = partial(_Handler, repo=repo, token=_basic(user, password), directory=str(root))
            server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
            server.daemon_threads = True
            repo.url = f"http://127.0.0.1:{server.server_address[1]}/debian"
            thread = threading.Thread(target=server.serve_forever, name="aptrepo", daemon=True)
            thread.start()
            try:
                yield repo
            finally:
                server.shutdown()
                thread.join(timeout=10)
        finally:
            if server is not None:
                server.server_close()
            subprocess.run(
                ["gpgconf", "--homedir", str(gnupghome), "--kill", "all"], check=False, capture_output=True
            )
            shutil.rmtree(gnupghome, ignore_errors=True)

    def add_version(self, version: str) -> None:
        """Publish ``amibake-hello`` at ``version`` (older versions stay in the pool) and re-sign."""
        _check_version(version)
        debian = self.root / "debian"
        pool = debian / "pool" / COMPONENT / "a" / PACKAGE
        pool.mkdir(parents=True, exist_ok=True)
        build = self.root.parent / f"build-{version}"
        _package_tree(build, version)
        subprocess.run(
            [
                "dpkg-deb",
                "--root-owner-group",
                "--build",
                str(build),
                str(pool / f"{PACKAGE}_{version}_all.deb"),
            ],
            check=True,
            capture_output=True,
        )
        shutil.rmtree(build)
        dist = debian / "dists" / SUITE
        for arch in ("amd64", "all"):
            index = dist / COMPONENT / f"binary-{arch}"
            index.mkdir(parents=True, exist_ok=True)
            packages = _run(["apt-ftparchive", "packages", "pool"], cwd=debian)
            (index / "Packages").write_bytes(packages)
        release = _run(
            [
                "apt-ftparchive",
                "-o", f"APT::FTPArchive::Release::Suite={SUITE}",
                "-o", f"APT::FTPArchive::Release::Codename={SUITE}",
                "-o", f"APT::FTPArchive::Release::Components={COMPONENT}",
                "-o", "APT::FTPArchive::Release::Architectures=amd64 all",
                "release", ".",
            ],
            cwd=dist,
        )  # fmt: skip
        for name in ("InRelease", "Release.gpg"):
            (dist / name).unlink(missing_ok=True)
        (dist / "Release").write_bytes(release)
        sign = [
            "--batch",
            "--yes",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--local-user",
            self.fingerprint,
        ]
        _gpg(self.gnupghome, *sign, "--clearsign", "--output", str(dist / "InRelease"), str(dist / "Release"))
        _gpg(
            self.gnupghome,
            *sign,
            "--detach-sign",
            "--armor",
            "--output",
            str(dist / "Release.gpg"),
            str(dist / "Release"),
        )
        self._stamp(dist)

    def _stamp(self, dist: Path) -> None:
        """Date the new index at least a second after the last one: HTTP dates count whole seconds, so
        an index re-published within the same second would answer apt's If-Modified-Since with 304."""
        self.published = max(int(time.time()), self.published + 1)
        for path in dist.rglob("*"):
            os.utime(path, (self.published, self.published))

    def fetched(self, suffix: str) -> list[bool]:
        """For each request whose path ends with ``suffix``: whether it carried the credentials."""
        return [ok for path, ok in self.requests if path.endswith(suffix)]


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the repository tree to requests with the right basic-auth header; 401 to the others."""

    def __init__(self, *args: Any, repo: AptRepo, token: str, **kwargs: Any) -> None:
        self.repo, self.token = repo, token
        super().__init__(*args, **kwargs)

    def _authorized(self) -> bool:
        return hmac.compare_digest(self.headers.get("Authorization", ""), self.token)

    def send_head(self) -> Any:
        ok = self._authorized()
        self.repo.requests.append((self.path, ok))
        if not ok:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="amibake test repository"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet: ``requests`` keeps what the tests need."""


def _check_version(version: str) -> None:
    if not VERSION_RE.fullmatch(version):
        raise ValueError(f"aptrepo: {version!r} is not a Debian package version (e.g. 1.0 or 1.1-2)")


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _run(argv: list[str], cwd: Path) -> bytes:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True).stdout


def _gpg(home: Path, *args: str) -> bytes:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", *args], check=True, capture_output=True
    ).stdout


def _make_key(home: Path) -> str:
    """A throwaway RSA signing key (CentOS 7's gpg 2.0 cannot read ed25519 keys); its fingerprint."""
    _gpg(
        home,
        "--passphrase", "", "--pinentry-mode", "loopback",
        "--quick-gen-key", "amibake test repository <repo@amibake.invalid>", "rsa3072", "sign", "never",
    )  # fmt: skip
    colons = _gpg(home, "--with-colons", "--list-keys").decode()
    return next(line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:"))


def _package_tree(build: Path, version: str) -> None:
    """The files of ``amibake-hello`` at ``version``: its version file and a oneshot unit."""
    (build / "DEBIAN").mkdir(parents=True)
    (build / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: amibake <repo@amibake.invalid>\n"
        "Description: amibake test package\n a file with its version and a oneshot unit\n"
    )
    share = build / VERSION_FILE.lstrip("/")
    share.parent.mkdir(parents=True)
    share.write_text(f"{version}\n")
    unit = build / "usr" / "lib" / "systemd" / "system" / UNIT
    unit.parent.mkdir(parents=True)
    unit.write_text(
        "[Unit]\nDescription=amibake test unit\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
        f"ExecStart=/bin/sh -c 'cat {VERSION_FILE} >{UNIT_MARKER}'\n\n[Install]\nWantedBy=multi-user.target\n"
    )
