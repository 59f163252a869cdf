"""A local EC2 API: moto's server on 127.0.0.1 behind a recording, fault-injecting proxy.

moto accepts almost anything and reports little back (it drops most RegisterImage and
RunInstances parameters), so tests must check what our code SENDS. The proxy records every
EC2 query-protocol call (``{"action": ..., "params": {flattened query params}}``) before
forwarding it to moto, and can answer chosen actions with an AWS error or a delay instead.

In-process use (tests)::

    with LocalEc2() as ec2:
        conn_extra = {"endpoint_url": ec2.endpoint_url, "region_name": ec2.region}
        ...
        assert ec2.calls("RunInstances")[0]["MetadataOptions.HttpTokens"] == "required"

Standalone (other processes: the rehearsal, benchmarks)::

    python -m rehearsal.ec2_local --port 5055

prints one JSON line ``{"endpoint_url": ..., "moto_url": ..., "region": ...}`` and serves the
control API under ``/_amibake/``: ``GET requests`` (JSON list), ``DELETE requests``,
``POST faults`` / ``POST latency`` (JSON bodies as :meth:`LocalEc2.add_fault` /
:meth:`LocalEc2.add_latency`), ``POST rules`` (:meth:`LocalEc2.configure_rule`), ``POST reset``,
``GET info``, ``POST base-images`` (``{"name", "owner", "deprecated"}`` → ``{"image_id"}``).
:class:`Ec2Control` is a small client for it.

AWS behaviours moto lacks are :class:`Extension` s: :func:`standard_extensions` composes them (the
IAM policy of :mod:`rehearsal.iam`, the AWS rules of :mod:`rehearsal.aws_rules`, the boxes of
:mod:`rehearsal.boxes`). The AWS rules are on unless ``extensions=[]`` (``--moto-only``).

Faults come "before" moto (the request is refused, nothing happened) or "after" it (moto acted, then
the answer is lost: an AWS error, or the connection closed without an answer), so a test can prove
that a retry after a lost answer creates nothing twice.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import signal
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

# moto preloads ~1,300 AMIs (each with a snapshot) unless told not to; that confuses clean-up
# checks, so base images are registered explicitly (register_base_image). Must be set before
# moto's EC2 backend is first built in this process.
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")

DEFAULT_REGION = "us-east-1"
#: Dummy credentials moto accepts; no real account is ever reached through this endpoint.
FAKE_ACCESS_KEY = "testing"
FAKE_SECRET_KEY = "testing"
CONTROL_PREFIX = "/_amibake/"
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}
_XML = {"Content-Type": "text/xml"}


@dataclass
class _Rule:
    """A fault or a delay for one action, applied ``times`` more times (None = always)."""

    action: str
    times: int | None
    error_code: str | None = None
    http_status: int = 400
    message: str = ""
    seconds: float = 0.0
    when: str = "before"  # "after": moto acted, then the answer is lost
    drop_connection: bool = False  # an "after" fault that closes the connection without an answer
    region: str | None = None  # only calls to this region's endpoint (None: any region)


class Extension(Protocol):
    """One AWS behaviour the local EC2 API adds on top of moto (IAM, lifecycle rules, boxes ...).

    Extensions run in the order given to :class:`LocalEc2`, after the request was recorded and the
    injected "before" faults were applied: ``before`` may answer the call itself (an AWS error, a
    ``DryRunOperation``) by returning ``(http status, XML body)``; otherwise the call goes to moto and
    every extension's ``after`` sees (and may rewrite) moto's answer. ``moto`` is a boto3 EC2 client
    straight to moto (not recorded), for looking up state. An extension may also have ``reset()``
    (called by :meth:`LocalEc2.reset`) and ``close()`` (called by :meth:`LocalEc2.stop`).
    """

    def before(self, action: str, params: dict[str, str], moto: Any) -> tuple[int, bytes] | None: ...

    def after(self, action: str, params: dict[str, str], status: int, body: bytes, moto: Any) -> bytes: ...


def _calls(
    requests: list[dict[str, Any]], action: str, dry_run: bool, region: str | None = None
) -> list[dict[str, str]]:
    """The params of the recorded calls of ``action`` that are (or are not) dry runs (to ``region``'s
    endpoint only, if given)."""
    return [
        r["params"]
        for r in requests
        if r["action"] == action
        and (r["params"].get("DryRun", "").lower() == "true") == dry_run
        and region in (None, r.get("region"))
    ]


def region_of(authorization: str, default: str) -> str:
    """The region a SigV4-signed request is for (``Credential=KEY/DATE/REGION/ec2/aws4_request``),
    as moto reads it; ``default`` for an unsigned one."""
    scope = authorization.partition("Credential=")[2].split(",")[0].split("/")
    return scope[2] if len(scope) >= 5 and scope[2] else default


def tag_specs(params: dict[str, str]) -> dict[str, dict[str, str]]:
    """A recorded request's flattened ``TagSpecification.N.*`` params → {resource type: {key: value}}."""
    specs: dict[str, dict[str, str]] = {}
    n = 1
    while f"TagSpecification.{n}.ResourceType" in params:
        tags, m = {}, 1
        while f"TagSpecification.{n}.Tag.{m}.Key" in params:
            tags[params[f"TagSpecification.{n}.Tag.{m}.Key"]] = params[f"TagSpecification.{n}.Tag.{m}.Value"]
            m += 1
        specs[params[f"TagSpecification.{n}.ResourceType"]] = tags
        n += 1
    return specs


def _error_code_of(body: bytes) -> str:
    """The ``<Code>`` of an EC2 error answer ('' if there is none)."""
    start = body.find(b"<Code>")
    end = body.find(b"</Code>", start)
    return body[start + 6 : end].decode(errors="replace") if start >= 0 and end > start else ""


def _fault_label(rule: _Rule | None) -> str | None:
    """How a recorded call was faulted: ``CODE`` (before moto), ``after:CODE`` or ``after:dropped``."""
    if rule is None:
        return None
    if rule.when == "before":
        return rule.error_code
    return "after:dropped" if rule.drop_connection else f"after:{rule.error_code}"


def standard_extensions(
    *,
    policy: dict[str, Any] | None = None,
    snapshots: Extension | None = None,
    boxes: Extension | None = None,
    **delays: float,
) -> list[Extension]:
    """The local EC2 API's extensions in the order they must run: the IAM policy (if one is given:
    it answers ``UnauthorizedOperation`` before DryRun is answered), the AWS rules moto lacks
    (``delays``: ``consistency_s``, ``snapshot_s``, ``linger_s``, see :func:`rehearsal.aws_rules.aws_rules`),
    the snapshot content (``rehearsal.ebs.EbsSnapshots``, if given: kept on CreateSnapshot), then the
    boxes (if given: they start on moto's RunInstances answer; with ``Boxes(guests=Guests(snapshots))``
    an AMI whose root snapshot has content boots its own bytes)."""
    from rehearsal.aws_rules import aws_rules

    found: list[Extension] = []
    if policy is not None:
        from rehearsal.iam import IamEnforcer

        found.append(IamEnforcer(policy))
    found.extend(aws_rules(**delays))
    if snapshots is not None:
        found.append(snapshots)
    if boxes is not None:
        found.append(boxes)
    return found


def _error_xml(code: str, message: str) -> bytes:
    """An EC2 error response body, as botocore parses it."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
    ).encode()


class LocalEc2:
    """moto ``ThreadedMotoServer`` + recording proxy, both threads bound to 127.0.0.1."""

    def __init__(
        self,
        *,
        region: str = DEFAULT_REGION,
        port: int = 0,
        moto_port: int = 0,
        extensions: list[Extension] | None = None,
    ) -> None:
        """``extensions``: None = :func:`standard_extensions` (the AWS rules); ``[]`` = plain moto."""
        self.region = region
        self.extensions: list[Extension] = standard_extensions() if extensions is None else list(extensions)
        self._rule_defaults: list[tuple[Any, str, Any]] = []
        self._moto_clients: dict[str, Any] = {}
        self._port = port
        self._moto_port = moto_port
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self._rules: list[_Rule] = []
        self._moto: Any = None
        self._proxy: ThreadingHTTPServer | None = None
        self._proxy_thread: threading.Thread | None = None
        self.moto_url = ""
        self.endpoint_url = ""

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> LocalEc2:
        """Start moto, then the proxy in front of it."""
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self._moto_port, verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.moto_url = f"http://{host}:{port}"
        try:
            self._proxy = ThreadingHTTPServer(("127.0.0.1", self._port), _make_handler(self))
        except BaseException:
            self._moto.stop()
            raise
        self._proxy.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._proxy.server_address[1]}"
        self._proxy_thread = threading.Thread(target=self._proxy.serve_forever, daemon=True)
        self._proxy_thread.start()
        return self

    def stop(self) -> None:
        """Stop the proxy, every extension that has a ``close()`` (boxes), and moto; safe to call twice."""
        for ext in self.extensions:
            getattr(ext, "close", lambda: None)()
        if self._proxy is not None:
            self._proxy.shutdown()
            self._proxy.server_close()
            self._proxy = None
        if self._moto is not None:
            self._moto.stop()
            self._moto = None

    def __enter__(self) -> LocalEc2:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- recorded requests -------------------------------------------------------------------
    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every EC2 call seen so far, oldest first (a copy)."""
        with self._lock:
            return [dict(r) for r in self._requests]

    def calls(self, action: str, *, dry_run: bool = False, region: str | None = None) -> list[dict[str, str]]:
        """The flattened parameters of every recorded call of one action: the real ones, or with
        ``dry_run`` only the ``DryRun=true`` ones (preflight's); with ``region``, only those sent to
        that region (each recorded call's ``region`` is its SigV4 signature's)."""
        return _calls(self.requests, action, dry_run, region)

    def clear_requests(self) -> None:
        """Forget the recorded calls (faults and delays stay)."""
        with self._lock:
            self._requests.clear()

    def _record(
        self, action: str, params: dict[str, str], fault: str | None, region: str | None = None
    ) -> dict[str, Any]:
        """Record one call; the entry gets ``status`` (and ``error``) once it is answered."""
        entry: dict[str, Any] = {
            "action": action,
            "params": params,
            "time": time.time(),
            "region": region or self.region,
        }
        if fault:
            entry["fault"] = fault
        with self._lock:
            self._requests.append(entry)
        return entry

    def _answered(self, entry: dict[str, Any] | None, status: int, body: bytes) -> None:
        """Note the HTTP status (and AWS error code) a recorded call was answered with."""
        if entry is None:
            return
        with self._lock:
            entry["status"] = status
            if status >= 300:
                entry["error"] = _error_code_of(body)

    # -- faults ------------------------------------------------------------------------------
    def add_fault(
        self,
        action: str,
        error_code: str = "RequestLimitExceeded",
        http_status: int = 503,
        times: int | None = 1,
        message: str = "injected by amibake LocalEc2",
        when: str = "before",
        drop_connection: bool = False,
        region: str | None = None,
    ) -> None:
        """Answer the next ``times`` calls of ``action`` with this AWS error (None = every call).

        ``when="before"``: instead of moto (nothing happens). ``when="after"``: moto acts first, then
        its answer is replaced by the error or, with ``drop_connection``, the connection is closed
        without an answer (a response lost on the way back: botocore retries it). ``region``: only
        calls to that region (None: any).
        """
        if when not in ("before", "after"):
            raise ValueError(f"when must be 'before' or 'after', got {when!r}")
        if drop_connection and when != "after":
            raise ValueError("drop_connection needs when='after'")
        with self._lock:
            self._rules.append(
                _Rule(
                    action,
                    times,
                    error_code,
                    int(http_status),
                    message,
                    when=when,
                    drop_connection=drop_connection,
                    region=region,
                )
            )

    def add_latency(self, action: str, seconds: float, times: int | None = None) -> None:
        """Delay the next ``times`` calls of ``action`` (None = every call) by ``seconds``."""
        with self._lock:
            self._rules.append(_Rule(action, times, seconds=float(seconds)))

    def clear_faults(self) -> None:
        """Drop every fault and delay."""
        with self._lock:
            self._rules.clear()

    def _take_rules(
        self, action: str, when: str = "before", region: str | None = None
    ) -> tuple[_Rule | None, float]:
        """Consume the first matching fault of ``when`` ("before" also: the total delay).

        "after" faults are taken only once the call succeeded: a lost answer is one of a done call.
        """
        fault, delay = None, 0.0
        with self._lock:
            for rule in list(self._rules):
                if rule.action != action or (rule.error_code is not None and rule.when != when):
                    continue
                if rule.region is not None and rule.region != (region or self.region):
                    continue
                if rule.error_code is None and when != "before":
                    continue
                if rule.error_code is not None and fault is not None:
                    continue
                if rule.error_code is not None:
                    fault = rule
                else:
                    delay += rule.seconds
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self._rules.remove(rule)
        return fault, delay

    # -- the AWS rules -----------------------------------------------------------------------
    def rule(self, name: str) -> Any:
        """The extension whose class is called ``name`` (e.g. ``"EventualConsistency"``)."""
        for ext in self.extensions:
            if type(ext).__name__ == name:
                return ext
        raise LookupError(f"no extension {name!r} in this local EC2 API")

    def configure_rule(self, name: str, **settings: Any) -> None:
        """Change a rule's tunables until the next :meth:`reset` (``delay=2.0``; the throttling rule
        takes ``category``, ``capacity``, ``refill``)."""
        ext = self.rule(name)
        if hasattr(ext, "configure"):
            ext.configure(**settings)
            return
        for key, value in settings.items():
            if key.startswith("_") or not hasattr(ext, key):
                raise ValueError(f"{name} has no setting {key!r}")
            with self._lock:
                self._rule_defaults.append((ext, key, getattr(ext, key)))
            setattr(ext, key, value)

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Wipe moto's state, the recorded calls, faults and delays, and reset every extension that
        has a ``reset()`` (boxes: all terminated)."""
        with self._lock:
            changed, self._rule_defaults = self._rule_defaults, []
        for ext, key, value in reversed(changed):
            setattr(ext, key, value)
        for ext in self.extensions:
            getattr(ext, "reset", lambda: None)()
        req = urllib.request.Request(f"{self.moto_url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30):
            pass
        with self._lock:
            self._requests.clear()
            self._rules.clear()

    def moto_client(self, region: str | None = None) -> Any:
        """One shared EC2 client straight to moto per region (default: this API's), for the
        extensions: a call to another region's endpoint is looked up in that region's state."""
        region = region or self.region
        with self._lock:
            if region not in self._moto_clients:
                self._moto_clients[region] = self.boto3_client(region=region)
            return self._moto_clients[region]

    def boto3_client(self, service: str = "ec2", *, recorded: bool = False, region: str | None = None) -> Any:
        """A boto3 client for assertions (in ``region``, default this API's); straight to moto (not
        recorded) unless ``recorded``."""
        import boto3

        return boto3.client(
            service,
            region_name=region or self.region,
            endpoint_url=self.endpoint_url if recorded else self.moto_url,
            aws_access_key_id=FAKE_ACCESS_KEY,
            aws_secret_access_key=FAKE_SECRET_KEY,
        )

    def register_base_image(self, name: str, *, owner: str = "", deprecated: bool = False) -> str:
        """An HVM base AMI with an 8 GiB root snapshot (moto preloads none here); returns its id.

        ``owner``: another account's public AMI (as CentOS's ``125523088429``) instead of one of this
        account. ``deprecated``: made three years ago and deprecated two years after, as AWS does
        with public AMIs; DescribeImages then hides it from other accounts unless IncludeDeprecated.
        """
        from moto.ec2.models import ec2_backends

        from rehearsal import aws_rules

        backend = ec2_backends[aws_rules.ACCOUNT_ID][self.region]
        owner_id = owner or aws_rules.ACCOUNT_ID
        volume = backend.create_volume(size=8, zone_name=f"{self.region}a")
        snapshot = backend.create_snapshot(volume.id, f"root of {name}", owner_id)
        backend.delete_volume(volume.id)
        created = datetime.now(UTC) - timedelta(days=3 * 365)
        image = aws_rules.new_image(
            backend,
            name=name,
            description="amibake local base image",
            root_device="/dev/xvda",
            mappings=[
                {
                    "DeviceName": "/dev/xvda",
                    "Ebs": {
                        "SnapshotId": snapshot.id,
                        "VolumeSize": 8,
                        "VolumeType": "gp2",
                        "DeleteOnTermination": True,
                        "Encrypted": False,
                    },
                }
            ],
            owner_id=owner_id,
            public=owner_id != aws_rules.ACCOUNT_ID,
            ena=True,
            creation_date=created if deprecated else None,
        )
        if deprecated:
            image.deprecation_time = aws_rules.iso_time(created + timedelta(days=2 * 365))
        return image.id

    def connection_extra(self) -> dict[str, str]:
        """The ``amibake_aws`` connection extra that points the Amazon provider here."""
        return {"endpoint_url": self.endpoint_url, "region_name": self.region}

    def info(self) -> dict[str, str]:
        """Where this instance listens."""
        return {"endpoint_url": self.endpoint_url, "moto_url": self.moto_url, "region": self.region}


def _make_handler(ec2: LocalEc2) -> type[BaseHTTPRequestHandler]:
    """The proxy's request handler class, bound to one :class:`LocalEc2`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            """Silence the per-request access log."""

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {"Content-Type": "application/json"}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _handle(self) -> None:
            body = self._body()
            path = urlsplit(self.path)
            if path.path.startswith(CONTROL_PREFIX):
                self._control(path.path[len(CONTROL_PREFIX) :], body)
                return
            params = dict(parse_qsl(path.query, keep_blank_values=True))
            content_type = self.headers.get("Content-Type", "")
            if body and "x-www-form-urlencoded" in content_type:
                params.update(parse_qsl(body.decode(), keep_blank_values=True))
            action = params.pop("Action", None)
            params.pop("Version", None)
            if not action:
                self._send(*self._forward(body))
                return
            region = region_of(self.headers.get("Authorization", ""), ec2.region)
            fault, delay = ec2._take_rules(action, region=region)
            entry = ec2._record(action, params, _fault_label(fault), region)
            if delay:
                time.sleep(delay)
            if fault is not None:
                status, data, headers = (
                    fault.http_status,
                    _error_xml(fault.error_code or "", fault.message),
                    _XML,
                )
            else:
                status, data, headers = self._through_extensions(action, params, body, region)
            lost = ec2._take_rules(action, "after", region)[0] if 200 <= status < 300 else None
            if lost is not None:
                with ec2._lock:
                    entry["fault"] = _fault_label(lost)
                if lost.drop_connection:
                    ec2._answered(entry, 0, b"")
                    self.close_connection = True  # no answer at all: the client sees the connection close
                    return
                status, data, headers = (
                    lost.http_status,
                    _error_xml(lost.error_code or "", lost.message),
                    _XML,
                )
            ec2._answered(entry, status, data)
            self._send(status, data, headers)

        def _through_extensions(
            self, action: str, params: dict[str, str], body: bytes, region: str
        ) -> tuple[int, bytes, dict[str, str]]:
            """An extension's ``before`` may answer; else moto does, and each ``after`` may rewrite that.
            Each gets a moto client of the call's region (``moto.meta.region_name``)."""
            moto = ec2.moto_client(region)
            for ext in ec2.extensions:
                answer = ext.before(action, params, moto)
                if answer is not None:
                    return answer[0], answer[1], _XML
            status, data, headers = self._forward(body)
            for ext in ec2.extensions:
                data = ext.after(action, params, status, data, moto)
            return status, data, headers

        def _forward(self, body: bytes) -> tuple[int, bytes, dict[str, str]]:
            """Send the request on to moto; its answer as (status, body, headers)."""
            target = urlsplit(ec2.moto_url)
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=300)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                out = {
                    k: v for k, v in resp.getheaders() if k.lower() not in _HOP_HEADERS | {"content-length"}
                }
                return resp.status, data, out
            finally:
                conn.close()

        def _control(self, what: str, body: bytes) -> None:
            payload = json.loads(body) if body else {}
            if what == "requests" and self.command == "GET":
                self._send(200, json.dumps(ec2.requests).encode())
            elif what == "requests" and self.command == "DELETE":
                ec2.clear_requests()
                self._send(200, b"{}")
            elif what == "faults" and self.command == "POST":
                ec2.add_fault(**payload)
                self._send(200, b"{}")
            elif what == "faults" and self.command == "DELETE":
                ec2.clear_faults()
                self._send(200, b"{}")
            elif what == "latency" and self.command == "POST":
                ec2.add_latency(**payload)
                self._send(200, b"{}")
            elif what == "reset" and self.command == "POST":
                ec2.reset()
                self._send(200, b"{}")
            elif what == "info" and self.command == "GET":
                self._send(200, json.dumps(ec2.info()).encode())
            elif what == "base-images" and self.command == "POST":
                self._send(200, json.dumps({"image_id": ec2.register_base_image(**payload)}).encode())
            elif what == "rules" and self.command == "POST":
                ec2.configure_rule(payload.pop("rule"), **payload)
                self._send(200, b"{}")
            else:
                self._send(404, json.dumps({"error": f"unknown control call {self.command} {what}"}).encode())

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle  # noqa: N815 - stdlib names

    return Handler


class Ec2Control:
    """Client of a standalone proxy's control API (for other processes)."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url.rstrip("/")

    def _call(self, method: str, what: str, payload: dict | None = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(
            f"{self.endpoint_url}{CONTROL_PREFIX}{what}",
            method=method,
            data=data,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read() or b"null")

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every recorded EC2 call."""
        return self._call("GET", "requests")

    def calls(self, action: str, *, dry_run: bool = False) -> list[dict[str, str]]:
        """See :meth:`LocalEc2.calls`."""
        return _calls(self.requests, action, dry_run)

    def clear_requests(self) -> None:
        """Forget the recorded calls."""
        self._call("DELETE", "requests")

    def add_fault(
        self,
        action: str,
        error_code: str = "RequestLimitExceeded",
        http_status: int = 503,
        times: int | None = 1,
        when: str = "before",
        drop_connection: bool = False,
        region: str | None = None,
    ) -> None:
        """See :meth:`LocalEc2.add_fault`."""
        self._call(
            "POST",
            "faults",
            {
                "action": action,
                "error_code": error_code,
                "http_status": http_status,
                "times": times,
                "when": when,
                "drop_connection": drop_connection,
                "region": region,
            },
        )

    def add_latency(self, action: str, seconds: float, times: int | None = None) -> None:
        """See :meth:`LocalEc2.add_latency`."""
        self._call("POST", "latency", {"action": action, "seconds": seconds, "times": times})

    def reset(self) -> None:
        """Wipe moto's state, recorded calls and faults."""
        self._call("POST", "reset")

    def info(self) -> dict[str, str]:
        """``endpoint_url``, ``moto_url``, ``region``."""
        return self._call("GET", "info")

    def register_base_image(self, name: str, *, owner: str = "", deprecated: bool = False) -> str:
        """See :meth:`LocalEc2.register_base_image`."""
        payload = {"name": name, "owner": owner, "deprecated": deprecated}
        return self._call("POST", "base-images", payload)["image_id"]

    def configure_rule(self, rule: str, **settings: Any) -> None:
        """See :meth:`LocalEc2.configure_rule`."""
        self._call("POST", "rules", {"rule": rule, **settings})


def main(argv: list[str] | None = None) -> int:
    """Run a :class:`LocalEc2` in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m rehearsal.ec2_local", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="proxy port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--moto-port", type=int, default=0, help="moto's own port (0 = any free port)")
    parser.add_argument("--region", default=DEFAULT_REGION)
    parser.add_argument(
        "--boxes",
        type=Path,
        metavar="DIR",
        help="give every instance a box (rehearsal.boxes), its files in DIR",
    )
    parser.add_argument(
        "--box-env", action="append", default=[], metavar="NAME=VALUE", help="a box session variable"
    )
    parser.add_argument("--box-logs", type=Path, metavar="DIR", help="keep the boxes' build logs here")
    parser.add_argument(
        "--snapshots",
        type=Path,
        metavar="DIR",
        help="keep each snapshot's content in DIR (rehearsal.ebs.EbsSnapshots; give LoopEbs the same "
        "snapshots_dir); with --boxes, an AMI of such a snapshot boots its own bytes (rehearsal.guests)",
    )
    parser.add_argument(
        "--iam-policy", type=Path, metavar="FILE", help="enforce this IAM policy (JSON) on every call"
    )
    parser.add_argument(
        "--moto-only", action="store_true", help="no AWS rules: moto as it is (they are on by default)"
    )
    from rehearsal import aws_rules

    for flag, default, what in (
        ("--consistency-s", aws_rules.CONSISTENCY_S, "a new instance, volume or snapshot stays unknown"),
        ("--snapshot-s", aws_rules.SNAPSHOT_S, "a new snapshot stays pending"),
        (
            "--linger-s",
            aws_rules.LINGER_S,
            "a terminated instance's network interface keeps its security group",
        ),
    ):
        parser.add_argument(
            flag, type=float, default=default, metavar="SECONDS", help=f"{what} (default {default})"
        )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535 or not 0 <= args.moto_port <= 65535:
        parser.error("--port and --moto-port must be between 0 and 65535")
    if min(args.consistency_s, args.snapshot_s, args.linger_s) < 0:
        parser.error("--consistency-s, --snapshot-s and --linger-s must be >= 0")
    policy = None
    if args.iam_policy:
        try:
            policy = json.loads(args.iam_policy.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--iam-policy {args.iam_policy}: {exc}")
    if args.moto_only and (policy is not None or args.boxes or args.snapshots):
        parser.error("--moto-only cannot be combined with --iam-policy, --boxes or --snapshots")
    snapshots = None
    if args.snapshots:
        from rehearsal.ebs import EbsSnapshots

        snapshots = EbsSnapshots(args.snapshots)
    boxes = None
    if args.boxes:
        from rehearsal.boxes import Boxes
        from rehearsal.guests import Guests

        box_env = dict(item.partition("=")[::2] for item in args.box_env)
        guests = Guests(snapshots, parent_dir=args.boxes) if snapshots is not None else None
        boxes = Boxes(parent_dir=args.boxes, session_env=box_env, keep_logs=args.box_logs, guests=guests)
    if args.moto_only:
        extensions: list[Extension] = []
    else:
        extensions = standard_extensions(
            policy=policy,
            snapshots=snapshots,
            boxes=boxes,
            consistency_s=args.consistency_s,
            snapshot_s=args.snapshot_s,
            linger_s=args.linger_s,
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with LocalEc2(region=args.region, port=args.port, moto_port=args.moto_port, extensions=extensions) as ec2:
        print(json.dumps(ec2.info()), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
