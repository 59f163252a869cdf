"""A Debian mirror on 127.0.0.1 whose indexes stand still: the rehearsal's ``mirror`` of debian12.

The real archive publishes new indexes several times a day (the security archive more often). A
rehearsal that builds, then asks whether anything changed, must not see such a push in between, or
"unchanged" could not be tested. ``FrozenMirror.serve(upstreams, cache_dir)`` serves
``/<name>/...`` from ``upstreams[name]`` (e.g. ``debian`` -> ``http://deb.debian.org/debian``): every
file under ``dists/`` is fetched once and then served as it was (so ``InRelease`` and the
``Packages`` it signs always agree), everything else (``pool/``, content-addressed ``by-hash/``) is
passed through. ``freeze()`` is the snapshot; ``thaw(name)`` forgets one tree's indexes (the next
request fetches the archive's current ones), as a real mirror sync does. Each request's path is kept
in ``requests``.
"""

from __future__ import annotations

import contextlib
import http.server
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Where the trees come from when this machine's apt sources do not say (deb822 ``URIs:``).
DEBIAN_ARCHIVES = {
    "debian": "http://deb.debian.org/debian",
    "debian-security": "http://deb.debian.org/debian-security",
}
#: Seconds to wait for the upstream archive.
UPSTREAM_TIMEOUT_S = 60
CHUNK = 1024 * 1024


@dataclass
class FrozenMirror:
    """A served mirror: its base URL per tree, what it froze, and what it was asked for."""

    url: str
    upstreams: Mapping[str, str]
    cache: Path
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    @contextlib.contextmanager
    def serve(cls, upstreams: Mapping[str, str], cache: Path) -> Iterator[FrozenMirror]:
        """Serve on a free port of 127.0.0.1 until the context ends."""
        cache.mkdir(parents=True, exist_ok=True)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        mirror = cls(f"http://127.0.0.1:{server.server_address[1]}", dict(upstreams), cache)
        server.mirror = mirror  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, name="frozen-mirror", daemon=True)
        thread.start()
        try:
            yield mirror
        finally:
            server.shutdown()
            server.server_close()
            thread.join()

    def base(self, name: str) -> str:
        """The URL a definition's ``mirror`` takes for tree ``name``."""
        return f"{self.url}/{name}"

    def thaw(self, name: str) -> None:
        """Forget tree ``name``'s frozen indexes: the next request gets the archive's current ones."""
        with self.lock:
            shutil.rmtree(self.cache / name / "dists", ignore_errors=True)

    def frozen(self, name: str, path: str) -> Path:
        """The cached copy of ``dists/`` file ``path`` of tree ``name``, fetched on first use."""
        target = self.cache / name / path
        with self.lock:
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".part")
                with _upstream(f"{self.upstreams[name]}/{path}") as answer, partial.open("wb") as out:
                    shutil.copyfileobj(answer, out, CHUNK)
                partial.rename(target)
        return target


def debian_upstreams(sources: Path = Path("/etc/apt/sources.list.d")) -> dict[str, str]:
    """The archives this machine's apt uses for bookworm and bookworm-security (what the boxes use
    too), as ``{"debian": ..., "debian-security": ...}``; Debian's own where it names none."""
    found = dict(DEBIAN_ARCHIVES)
    for file in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in file.read_text().split("\n\n"):
            fields = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (line.partition(":") for line in stanza.splitlines())
                if v and not k.startswith("#")
            )
            suites, uris = fields.get("suites", "").split(), fields.get("uris", "").split()
            if uris and "bookworm" in suites:
                found["debian"] = uris[0].rstrip("/")
            if uris and "bookworm-security" in suites:
                found["debian-security"] = uris[0].rstrip("/")
    return found


@contextlib.contextmanager
def _upstream(url: str) -> Iterator[Any]:
    with urllib.request.urlopen(url, timeout=UPSTREAM_TIMEOUT_S) as answer:  # noqa: S310 - the archive
        yield answer


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD of ``/<tree>/<path>``: dists/ from the frozen cache, the rest passed through."""

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802 - the base class's name
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        mirror: FrozenMirror = self.server.mirror  # type: ignore[attr-defined]
        mirror.requests.append(self.path)
        name, _, path = self.path.lstrip("/").partition("/")
        if name not in mirror.upstreams or ".." in path.split("/") or not path:
            self.send_error(404)
            return
        try:
            if path.startswith("dists/") and "/by-hash/" not in path:
                self._send_file(mirror.frozen(name, path), body)
            else:
                with _upstream(f"{mirror.upstreams[name]}/{path}") as answer:
                    self._send_stream(answer, body)
        except urllib.error.HTTPError as exc:
            self.send_error(exc.code)
        except (OSError, ValueError):
            self.send_error(502)

    def _send_file(self, file: Path, body: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(file.stat().st_size))
        self.end_headers()
        if body:
            with file.open("rb") as data:
                shutil.copyfileobj(data, self.wfile, CHUNK)

    def _send_stream(self, answer: Any, body: bool) -> None:
        self.send_response(200)
        length = answer.headers.get("Content-Length")
        if length:
            self.send_header("Content-Length", length)
        self.end_headers()
        if body:
            shutil.copyfileobj(answer, self.wfile, CHUNK)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet: ``requests`` keeps what the tests need."""
