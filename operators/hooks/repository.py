"""The one door to package repositories from the worker: their metadata over HTTP(S), read-only.

Preflight probes the recipe's mirror with it; the fingerprint reads each repository's metadata file
(``operators.rules.fingerprint``). A repository that needs a login gets it from its Airflow connection.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request

#: Seconds the worker waits for a repository.
TIMEOUT_S = 10
#: Metadata files are small (InRelease about 150 KB, repomd.xml a few KB): more is not metadata.
MAX_BYTES = 8 * 1024 * 1024
USER_AGENT = "amibake"


class Unreadable(Exception):
    """The repository did not give its metadata; the message says why (HTTP status or network error)."""


def _request(url: str, login: str, password: str, headers: dict[str, str]) -> urllib.request.Request:
    if not url.startswith(("http://", "https://")):
        raise Unreadable(f"{url}: only http(s) repositories are read from the worker")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    if login or password:
        token = base64.b64encode(f"{login}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def fetch(url: str, *, login: str = "", password: str = "", timeout: float = TIMEOUT_S) -> bytes:
    """The whole metadata file at ``url``; raises :class:`Unreadable`."""
    try:
        with urllib.request.urlopen(_request(url, login, password, {}), timeout=timeout) as answer:  # noqa: S310
            body = answer.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise Unreadable(f"{url} answered HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise Unreadable(f"{url}: {getattr(exc, 'reason', exc)}") from None
    if len(body) > MAX_BYTES:
        raise Unreadable(f"{url} is more than {MAX_BYTES} bytes: not repository metadata")
    return body


def probe(url: str, *, timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """(HTTP status, '') of a one-byte GET of ``url``, or (0, why) when nothing answered."""
    try:
        request = _request(url, "", "", {"Range": "bytes=0-0"})
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - http(s) only
            return answer.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except Unreadable as exc:
        return 0, str(exc)
    except (OSError, ValueError) as exc:
        return 0, str(getattr(exc, "reason", exc))
