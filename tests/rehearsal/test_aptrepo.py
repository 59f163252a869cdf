"""rehearsal.aptrepo: a real signed apt repository behind basic auth, checked with the real apt-get.

apt runs against a private root (its own sources, keys, auth.conf, lists and cache under tmp_path),
so nothing of this machine's apt configuration is read or changed.
"""

from __future__ import annotations

import base64
import http.client
import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from rehearsal.aptrepo import PACKAGE, AptRepo

USER, PASSWORD = "builder", "Repo-Pass-4b1f9e"


def _apt(
    root: Path, repo: AptRepo, *args: str, credentials: bool = True, key: Path | None = None
) -> subprocess.CompletedProcess:
    """apt-get with everything under ``root``: the repository signed-by ``key`` (default its own)."""
    etc, state, cache = root / "etc", root / "state", root / "cache"
    for d in (etc / "apt.conf.d", etc / "preferences.d", etc / "auth.conf.d", etc / "trusted.gpg.d",
              state / "lists" / "partial", cache / "archives" / "partial"):  # fmt: skip
        d.mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    signed_by = key or repo.key_file
    (etc / "sources.list").write_text(f"deb [signed-by={signed_by}] {repo.url} {repo.suite} main\n")
    auth = etc / "auth.conf.d" / "repo.conf"
    auth.unlink(missing_ok=True)
    if credentials:
        # apt uses credentials for an unencrypted URL only when the machine names its http:// scheme
        auth.write_text(f"machine {repo.url} login {USER} password {PASSWORD}\n")
        auth.chmod(0o600)
    options = [
        f"-o=Dir::Etc={etc}", f"-o=Dir::State={state}", f"-o=Dir::Cache={cache}",
        f"-o=Dir::State::status={state / 'status'}", "-o=APT::Sandbox::User=root",
        "-o=Debug::NoLocking=1", "-o=APT::Architecture=amd64", "-o=Acquire::Retries=0",
    ]  # fmt: skip
    return subprocess.run(["apt-get", *options, *args], cwd=root, capture_output=True, text=True, timeout=120)


@pytest.fixture
def repo(tmp_path: Path):
    with AptRepo.serve(tmp_path / "repo", user=USER, password=PASSWORD) as served:
        yield served


def test_apt_updates_and_downloads_the_package_with_the_credentials(repo: AptRepo, tmp_path: Path) -> None:
    root = tmp_path / "apt"
    update = _apt(root, repo, "update")
    assert update.returncode == 0, update.stdout + update.stderr
    assert "W:" not in update.stderr, update.stderr  # signed, and the signature checked
    download = _apt(root, repo, "download", PACKAGE)
    assert download.returncode == 0, download.stdout + download.stderr
    assert [p.name for p in root.glob("*.deb")] == [f"{PACKAGE}_1.0_all.deb"]
    assert repo.fetched("/InRelease") and all(repo.fetched("/InRelease"))
    contents = subprocess.run(
        ["dpkg-deb", "--contents", str(next(root.glob("*.deb")))], capture_output=True, text=True, check=True
    ).stdout
    assert f"usr/lib/systemd/system/{repo.unit}" in contents and "usr/share/amibake-hello/VERSION" in contents


def test_without_credentials_apt_gets_401(repo: AptRepo, tmp_path: Path) -> None:
    update = _apt(tmp_path / "apt", repo, "update", credentials=False)
    assert "401" in update.stdout + update.stderr, update.stdout + update.stderr
    assert repo.fetched("/InRelease") and not any(repo.fetched("/InRelease"))


def test_a_wrong_key_fails_the_signature_check(repo: AptRepo, tmp_path: Path) -> None:
    with AptRepo.serve(tmp_path / "other", user=USER, password=PASSWORD) as other:
        update = _apt(tmp_path / "apt", repo, "update", key=other.key_file)
    text = update.stdout + update.stderr
    assert "NO_PUBKEY" in text or "not signed" in text or "signatures couldn't be verified" in text, text


def test_a_new_version_is_seen_by_apt(repo: AptRepo, tmp_path: Path) -> None:
    root = tmp_path / "apt"
    assert _apt(root, repo, "update").returncode == 0
    repo.add_version("1.1")
    assert _apt(root, repo, "update").returncode == 0
    assert _apt(root, repo, "download", PACKAGE).returncode == 0
    assert [p.name for p in root.glob("*.deb")] == [f"{PACKAGE}_1.1_all.deb"], "the newest version is chosen"


def _get(repo: AptRepo, path: str, *, auth: str | None) -> http.client.HTTPResponse:
    """One raw GET (no client-side path normalization): ``path`` is sent as written."""
    url = urllib.parse.urlsplit(repo.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_401_asks_for_basic_auth_and_a_wrong_password_is_refused(repo: AptRepo) -> None:
    path = urllib.parse.urlsplit(repo.url).path + "/dists/bookworm/InRelease"
    for auth in (None, f"{USER}:wrong", f"other:{PASSWORD}"):
        response = _get(repo, path, auth=auth)
        assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Basic "), auth
    assert _get(repo, path, auth=f"{USER}:{PASSWORD}").status == 200
    assert repo.fetched("/InRelease") == [False, False, False, True]


def test_nothing_outside_the_served_tree_is_reachable(repo: AptRepo) -> None:
    """The armored key and the work files sit next to the served tree: ``..`` must not reach them."""
    assert repo.key_file.parent == repo.root.parent
    for path in ("/../repo-key.asc", "/debian/../../repo-key.asc", "/%2e%2e/repo-key.asc", "//etc/passwd"):
        assert _get(repo, path, auth=f"{USER}:{PASSWORD}").status == 404, path


def test_the_pinned_fingerprint_is_the_served_key(repo: AptRepo, tmp_path: Path) -> None:
    assert re.fullmatch(r"[0-9A-F]{40}", repo.fingerprint)
    (home := tmp_path / "gnupg").mkdir(mode=0o700)
    shown = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--with-colons", "--show-keys", str(repo.key_file)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert [line.split(":")[9] for line in shown.splitlines() if line.startswith("fpr:")] == [
        repo.fingerprint
    ]
    assert "PRIVATE KEY" not in repo.key_file.read_text()


def test_leaving_stops_the_server_and_removes_the_signing_key(tmp_path: Path) -> None:
    with AptRepo.serve(tmp_path / "repo", user=USER, password=PASSWORD) as served:
        assert any(served.gnupghome.iterdir())
    with pytest.raises(ConnectionRefusedError):
        _get(served, "/debian/dists/bookworm/InRelease", auth=f"{USER}:{PASSWORD}")
    assert not served.gnupghome.exists()
    agents = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(served.gnupghome) not in agents


def test_a_bad_version_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a Debian package version"):
        with AptRepo.serve(tmp_path / "repo", user=USER, password=PASSWORD, version="../1"):
            pass
    assert not (tmp_path / "repo").exists()
