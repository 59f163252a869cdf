"""rehearsal/mirror.py: the rehearsal's Debian mirror whose indexes stand still, in front of a real
HTTP "archive" on 127.0.0.1 (the tests do not depend on Debian's own archive)."""

from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from rehearsal.mirror import FrozenMirror, debian_upstreams


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An archive tree served on 127.0.0.1: dists/bookworm/InRelease and one pool file."""
    root = tmp_path / "archive"
    (root / "debian" / "dists" / "bookworm").mkdir(parents=True)
    (root / "debian" / "dists" / "bookworm" / "InRelease").write_text("Date: day 1\n")
    (root / "debian" / "pool").mkdir()
    (root / "debian" / "pool" / "hello.deb").write_bytes(b"deb 1")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/debian", root / "debian"
    server.shutdown()
    server.server_close()
    thread.join()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Quiet."""


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read()


def test_indexes_stand_still_until_thawed_and_the_pool_passes_through(archive, tmp_path: Path) -> None:
    upstream, tree = archive
    with FrozenMirror.serve({"debian": upstream}, tmp_path / "cache") as mirror:
        index = f"{mirror.base('debian')}/dists/bookworm/InRelease"
        assert _get(index) == b"Date: day 1\n"
        (tree / "dists" / "bookworm" / "InRelease").write_text("Date: day 2\n")  # the archive pushes
        (tree / "pool" / "hello.deb").write_bytes(b"deb 2")
        assert _get(index) == b"Date: day 1\n"
        assert _get(f"{mirror.base('debian')}/pool/hello.deb") == b"deb 2"
        mirror.thaw("debian")  # a mirror sync
        assert _get(index) == b"Date: day 2\n"
        for missing in ("/debian/dists/trixie/InRelease", "/debian/pool/nothing.deb"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                _get(mirror.url + missing)
            assert refused.value.code == 404
        for outside in ("/ubuntu/dists/noble/InRelease", "/debian/dists/../../etc/passwd"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                _get(mirror.url + outside)
            assert refused.value.code == 404
    assert mirror.requests[0] == "/debian/dists/bookworm/InRelease"


def test_the_upstreams_are_this_machines_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert debian_upstreams(tmp_path) == {
        "debian": "http://mirror.example/debian",
        "debian-security": "http://security.example/debian-security",
    }
    assert debian_upstreams(tmp_path / "none")["debian"] == "http://deb.debian.org/debian"
