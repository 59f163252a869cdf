#!/usr/bin/env python3
"""The EC2 instance metadata service (IMDSv2 only) for the boot check, on one connection.

qemu's user-mode network runs this once per guest connection to 169.254.169.254:80
(``guestfwd=tcp:169.254.169.254:80-cmd:python3 imds.py STATE_DIR``): the HTTP connection is
stdin/stdout. It answers as IMDS does with ``HttpTokens=required`` (what RegisterImage's
``ImdsSupport=v2.0`` gives every instance of the AMI):

- ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds: 1..21600`` returns a token;
  a missing or bad TTL is 400, a request carrying ``X-Forwarded-For`` is 403 (as on AWS);
- every other request needs ``X-aws-ec2-metadata-token``: without it, or with an invalid or expired
  one, 401;
- the tree (``meta-data/``, ``user-data``, ``dynamic/instance-identity/document``) is served under
  ``latest/`` and under any ``/<yyyy-mm-dd>/`` (cloud-init asks for dated versions first).

Tokens are stateless (expiry + HMAC with the secret in STATE_DIR/imds-secret), so a token from one
connection is valid on the next, each served by its own process. STATE_DIR/imds.json holds the
instance's values (written by lib/bootcheck.sh, or by rehearsal/guests.py for an instance of the
local EC2 API; an empty ``public_key`` means no key pair: no ``public-keys/``); each request is
appended to STATE_DIR/imds.log.
Python 3.6 compatible (the EL7 box's python3), standard library only.
"""

import hashlib
import hmac
import json
import os
import re
import sys
import time

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "x-aws-ec2-metadata-token"
MAX_TTL = 21600
VERSION_RE = re.compile(r"^/(latest|\d{4}-\d{2}-\d{2})(/.*)?$")
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed"}


def metadata_tree(cfg):
    """The meta-data/ tree of one instance as nested dicts (leaves are strings)."""
    mac = cfg["mac"]
    iface = {
        "device-number": "0",
        "interface-id": cfg["eni_id"],
        "local-hostname": cfg["local_hostname"],
        "local-ipv4s": cfg["local_ipv4"],
        "mac": mac,
        "owner-id": cfg["account_id"],
        "security-group-ids": cfg["security_group_id"],
        "security-groups": cfg["security_group"],
        "subnet-id": cfg["subnet_id"],
        "subnet-ipv4-cidr-block": cfg["subnet_cidr"],
        "vpc-id": cfg["vpc_id"],
        "vpc-ipv4-cidr-block": cfg["subnet_cidr"],
        "vpc-ipv4-cidr-blocks": cfg["subnet_cidr"],
    }
    tree = {
        "ami-id": cfg["ami_id"],
        "ami-launch-index": "0",
        "ami-manifest-path": "(unknown)",
        "block-device-mapping": {"ami": "/dev/xvda", "root": "/dev/xvda"},
        "hostname": cfg["local_hostname"],
        "instance-action": "none",
        "instance-id": cfg["instance_id"],
        "instance-life-cycle": "on-demand",
        "instance-type": cfg["instance_type"],
        "local-hostname": cfg["local_hostname"],
        "local-ipv4": cfg["local_ipv4"],
        "mac": mac,
        "network": {"interfaces": {"macs": {mac: iface}}},
        "placement": {"availability-zone": cfg["availability_zone"], "region": cfg["region"]},
        "reservation-id": cfg["reservation_id"],
        "security-groups": cfg["security_group"],
        "services": {"domain": "amazonaws.com", "partition": "aws"},
    }
    if cfg.get("public_key"):  # an instance launched without a key pair has no public-keys/ at all
        tree["public-keys"] = {"0": {"openssh-key": cfg["public_key"]}}
    return tree


def identity_document(cfg):
    """dynamic/instance-identity/document, as AWS returns it."""
    return json.dumps({
        "accountId": cfg["account_id"], "architecture": "x86_64",
        "availabilityZone": cfg["availability_zone"], "billingProducts": None, "devpayProductCodes": None,
        "marketplaceProductCodes": None, "imageId": cfg["ami_id"], "instanceId": cfg["instance_id"],
        "instanceType": cfg["instance_type"], "kernelId": None, "pendingTime": cfg["pending_time"],
        "privateIp": cfg["local_ipv4"], "ramdiskId": None, "region": cfg["region"], "version": "2017-09-30",
    }, indent=2)


def lookup(cfg, rest):
    """(status, body) of a GET below the version prefix ('' = the version's index)."""
    rest = rest.strip("/")
    if rest == "":
        return 200, "dynamic\nmeta-data\nuser-data" if cfg.get("user_data") else "dynamic\nmeta-data"
    if rest == "user-data":
        return (200, cfg["user_data"]) if cfg.get("user_data") else (404, "")
    if rest == "dynamic":
        return 200, "instance-identity/"
    if rest == "dynamic/instance-identity":
        return 200, "document"
    if rest == "dynamic/instance-identity/document":
        return 200, identity_document(cfg)
    node = {"meta-data": metadata_tree(cfg)}
    parts = rest.split("/")
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return 404, ""
        node = node[part]
    if not isinstance(node, dict):
        return 200, node
    if parts[-1] == "public-keys":  # IMDS lists keys as "<index>=<key name>"
        return 200, "\n".join(f"{k}={cfg['key_name']}" for k in sorted(node))
    return 200, "\n".join(k + "/" if isinstance(v, dict) else k for k, v in sorted(node.items()))


def make_token(secret, ttl, now):
    """A token valid until now + ttl: '<expiry>.<hmac>' (checked by token_valid)."""
    expiry = str(int(now) + ttl)
    mac = hmac.new(secret, expiry.encode(), hashlib.sha256).hexdigest()
    return f"{expiry}.{mac}"


def token_valid(secret, token, now):
    """True for a token made with this secret that has not expired."""
    expiry, _, mac = token.partition(".")
    if not expiry.isdigit():
        return False
    want = hmac.new(secret, expiry.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, mac) and int(expiry) > now


def respond(cfg, secret, method, path, headers, now):
    """(status, body) of one request, with IMDSv2's token rules."""
    if method == "PUT":
        if path != TOKEN_PATH:
            return 405 if VERSION_RE.match(path) else 404, ""
        if "x-forwarded-for" in headers:
            return 403, ""
        ttl = headers.get(TTL_HEADER, "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TTL:
            return 400, ""
        return 200, make_token(secret, int(ttl), now)
    if method != "GET":
        return 405, ""
    if path == TOKEN_PATH:
        return 405, ""
    if not token_valid(secret, headers.get(TOKEN_HEADER, ""), now):
        return 401, ""
    if path == "/":
        return 200, "latest"
    m = VERSION_RE.match(path)
    if not m:
        return 404, ""
    return lookup(cfg, m.group(2) or "")


def serve(state_dir, rfile, wfile):
    """Answer HTTP/1.x requests on one connection until the client closes it."""
    with open(os.path.join(state_dir, "imds.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(state_dir, "imds-secret"), "rb") as f:
        secret = f.read().strip()
    log = open(os.path.join(state_dir, "imds.log"), "a")
    try:
        while True:
            line = rfile.readline(8192)
            if not line.strip():
                return
            try:
                method, target, version = line.decode("latin-1").split()
            except ValueError:
                return
            headers = {}
            while True:
                h = rfile.readline(8192).decode("latin-1")
                if h in ("\r\n", "\n", ""):
                    break
                name, _, value = h.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or "0")
            if length:
                rfile.read(length)
            path = target.split("?")[0]
            status, body = respond(cfg, secret, method, path, headers, time.time())
            data = body.encode()
            keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            head = (f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {len(data)}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n")
            if method == "PUT" and status == 200:  # AWS echoes the TTL
                head += f"X-aws-ec2-metadata-token-ttl-seconds: {headers[TTL_HEADER]}\r\n"
            wfile.write(head.encode() + b"\r\n" + data)
            wfile.flush()
            token = "yes" if TOKEN_HEADER in headers else "no"
            log.write(f"{time.strftime('%H:%M:%S')} {method} {path} {status} token={token}\n")
            log.flush()
            if not keep:
                return
    finally:
        log.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: imds.py STATE_DIR  (serves one HTTP connection on stdin/stdout)")
    serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
