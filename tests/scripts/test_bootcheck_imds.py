"""The boot check's metadata service (include/scripts/lib/imds.py) answers as IMDSv2 does.

It runs exactly as qemu's guestfwd runs it, one process per connection with the HTTP connection on
stdin/stdout, so these tests pipe raw HTTP through it (no qemu, no root). The guest side of the
same service is proven by the boot check of the green night (tests/e2e/test_green_night.py).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

IMDS = Path(__file__).resolve().parents[2] / "include" / "scripts" / "lib" / "imds.py"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummyDummyDummyDummyDummyDummyDummyDummy amibake-bootcheck"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state dir as lib/bootcheck.sh writes it."""
    cfg = {
        "instance_id": "i-0123456789abcdef0", "instance_type": "t3.micro", "ami_id": "ami-00000000000000000",
        "reservation_id": "r-0123456789abcdef0", "account_id": "000000000000", "region": "us-east-1",
        "availability_zone": "us-east-1a", "local_ipv4": "169.254.0.15",
        "local_hostname": "ip-169-254-0-15.ec2.internal", "mac": "02:aa:bb:cc:dd:ee",
        "eni_id": "eni-0123456789abcdef0", "subnet_id": "subnet-0123456789abcdef0",
        "vpc_id": "vpc-0123456789abcdef0", "subnet_cidr": "169.254.0.0/16",
        "security_group": "amibake-bootcheck", "security_group_id": "sg-0123456789abcdef0",
        "pending_time": "2026-11-30T00:00:00Z", "key_name": "amibake-bootcheck", "public_key": KEY,
        "user_data": "#cloud-config\nwrite_files: []\n",
    }
    (tmp_path / "imds.json").write_text(json.dumps(cfg))
    (tmp_path / "imds-secret").write_text("00112233445566778899aabbccddeeff")
    return tmp_path


def exchange(state: Path, *requests: str) -> list[tuple[int, dict[str, str], str]]:
    """Send raw requests on one connection (one imds.py process); (status, headers, body) of each."""
    proc = subprocess.run([sys.executable, str(IMDS), str(state)], input="".join(requests).encode(),
                          capture_output=True, timeout=30, check=True)
    out, answers = proc.stdout, []
    while out:
        head, _, rest = out.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int(headers["Content-Length"])
        answers.append((int(lines[0].split()[1]), headers, rest[:length].decode()))
        out = rest[length:]
    return answers


def req(method: str, path: str, *headers: str, close: bool = False) -> str:
    """One HTTP/1.1 request."""
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}" + (
        "Connection: close\r\n" if close else "") + "\r\n"


def token(state: Path, ttl: int = 21600) -> str:
    """A session token, from its own connection (as cloud-init gets it)."""
    [(status, headers, body)] = exchange(
        state, req("PUT", "/latest/api/token", f"X-aws-ec2-metadata-token-ttl-seconds: {ttl}", close=True))
    assert status == 200 and headers["X-aws-ec2-metadata-token-ttl-seconds"] == str(ttl)
    return body


def get(state: Path, path: str, tok: str | None) -> tuple[int, str]:
    """GET with (or without) a token."""
    hdr = [f"X-aws-ec2-metadata-token: {tok}"] if tok is not None else []
    [(status, _, body)] = exchange(state, req("GET", path, *hdr, close=True))
    return status, body


def test_runs_on_the_el7_box_python() -> None:
    """The EL7 box has python 3.6: no syntax newer than that."""
    ast.parse(IMDS.read_text(), feature_version=(3, 6))


@pytest.mark.parametrize("headers,status", [
    ([], 400),
    (["X-aws-ec2-metadata-token-ttl-seconds: 0"], 400),
    (["X-aws-ec2-metadata-token-ttl-seconds: 21601"], 400),
    (["X-aws-ec2-metadata-token-ttl-seconds: ten"], 400),
    (["X-aws-ec2-metadata-token-ttl-seconds: 60", "X-Forwarded-For: 10.0.0.1"], 403),
])
def test_token_put_rules(state: Path, headers: list[str], status: int) -> None:
    """A TTL of 1..21600 is required; a forwarded request is refused, as on AWS."""
    [(got, _, body)] = exchange(state, req("PUT", "/latest/api/token", *headers, close=True))
    assert (got, body) == (status, "")


def test_imdsv1_is_refused(state: Path) -> None:
    """No token, a forged one, or an expired one: 401 (HttpTokens=required)."""
    assert get(state, "/latest/meta-data/instance-id", None) == (401, "")
    assert get(state, "/latest/meta-data/instance-id", "9999999999.forged") == (401, "")
    # a token works for its whole TTL (the longest AWS grants) ...
    assert get(state, "/latest/meta-data/instance-id", token(state, ttl=21600))[0] == 200
    # ... and not after it: one of 1 s, used 2.1 s later (its valid use is not timed here: under
    # load, starting the next request's process alone can take longer than 1 s)
    expired = token(state, ttl=1)
    subprocess.run(["sleep", "2.1"], check=True)
    assert get(state, "/latest/meta-data/instance-id", expired) == (401, "")


def test_token_of_one_connection_works_on_the_next(state: Path) -> None:
    """Each connection is its own process: the token is checked without shared memory."""
    tok = token(state)
    assert get(state, "/latest/meta-data/instance-id", tok) == (200, "i-0123456789abcdef0")
    assert get(state, "/2021-03-23/meta-data/local-hostname", tok) == (200, "ip-169-254-0-15.ec2.internal")
    assert get(state, "/2009-04-04/meta-data/local-ipv4", tok) == (200, "169.254.0.15")


def test_tree_as_cloud_init_crawls_it(state: Path) -> None:
    """Listings, public keys as '<index>=<name>', user data, the identity document, 404s."""
    tok = token(state)
    status, index = get(state, "/latest/meta-data/", tok)
    assert status == 200
    assert {"instance-id", "local-hostname", "public-keys/", "network/"} <= set(index.split())
    assert get(state, "/latest/meta-data/public-keys/", tok) == (200, "0=amibake-bootcheck")
    assert get(state, "/latest/meta-data/public-keys/0/", tok) == (200, "openssh-key")
    assert get(state, "/latest/meta-data/public-keys/0/openssh-key", tok) == (200, KEY)
    assert get(state, "/latest/meta-data/network/interfaces/macs/02:aa:bb:cc:dd:ee/local-ipv4s", tok) == (
        200, "169.254.0.15")
    assert get(state, "/latest/user-data", tok) == (200, "#cloud-config\nwrite_files: []\n")
    status, doc = get(state, "/latest/dynamic/instance-identity/document", tok)
    assert status == 200 and json.loads(doc)["instanceId"] == "i-0123456789abcdef0"
    assert get(state, "/latest/meta-data/no-such-thing", tok) == (404, "")
    assert get(state, "/not-a-version/meta-data/", tok) == (404, "")


def test_keep_alive_serves_several_requests_on_one_connection(state: Path) -> None:
    """HTTP/1.1 keep-alive (cloud-init's requests session): every request on the connection answered."""
    tok = token(state)
    hdr = f"X-aws-ec2-metadata-token: {tok}"
    answers = exchange(state, req("GET", "/latest/meta-data/instance-id", hdr),
                       req("GET", "/latest/meta-data/instance-type", hdr, close=True))
    assert [(s, b) for s, _, b in answers] == [(200, "i-0123456789abcdef0"), (200, "t3.micro")]
    assert answers[0][1]["Connection"] == "keep-alive" and answers[1][1]["Connection"] == "close"
    log = (state / "imds.log").read_text().splitlines()
    assert log[-1].endswith("GET /latest/meta-data/instance-type 200 token=yes")
