"""Where a secret (a repository password) shows up after a run: the rehearsal's and the e2e tests' check
that credentials never stay in what Airflow and EC2 keep.

``found_in(secret, places)`` searches named texts (XCom values, rendered fields, task logs, EC2
requests); ``files_holding(secret, roots)`` searches every file under some folders as raw bytes (the
Airflow home with its SQLite database and task logs, the box-side logs), so a value kept in a form the
REST API does not show is found too. ``ec2_request_text`` makes the recorded EC2 requests searchable,
with each ``UserData`` decoded: it travels base64-encoded, where a plain search would miss it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def ec2_request_text(requests: Iterable[Mapping[str, Any]]) -> str:
    """The recorded EC2 requests as one text: their JSON, then every ``UserData`` value decoded."""
    requests = list(requests)
    decoded = []
    for request in requests:
        for key, value in (request.get("params") or {}).items():
            if key.endswith("UserData") and isinstance(value, str):
                try:
                    decoded.append(base64.b64decode(value, validate=True).decode(errors="replace"))
                except (binascii.Error, ValueError):
                    decoded.append(value)
    return "\n".join([json.dumps(requests, default=str), *decoded])


def found_in(secret: str, places: Mapping[str, str]) -> list[str]:
    """The names of the ``places`` whose text holds ``secret``."""
    if not secret:
        raise ValueError("an empty secret is in everything: give the real one")
    return [name for name, text in places.items() if secret in text]


def files_holding(secret: str, roots: Iterable[Path]) -> list[Path]:
    """Every regular file under ``roots`` whose bytes hold ``secret`` (read in chunks, any size)."""
    needle = secret.encode()
    if not needle:
        raise ValueError("an empty secret is in everything: give the real one")
    hits = []
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()):
            if _holds(path, needle):
                hits.append(path)
    return hits


def _holds(path: Path, needle: bytes) -> bool:
    """Whether the file's bytes hold ``needle``, also across the edge of two chunks."""
    tail = b""
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                if needle in tail + chunk:
                    return True
                tail = chunk[-(len(needle) - 1) :] if len(needle) > 1 else b""
    except OSError:  # a file removed while scanning (a log rotated away) holds nothing any more
        return False
    return False
