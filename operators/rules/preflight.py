"""Preflight decisions: will tonight's build succeed with these settings? (pure: no Airflow import)

``operators.preflight`` asks AWS, the SSH connection and the package mirror (read-only calls and
``DryRun`` requests only: it creates nothing) and hands the answers to the functions here, which turn
each into a :class:`Check` naming the setting to change and how. :func:`raise_on_failure` then fails
with every problem at once, so one preflight run shows a new user every fix.

Of the night's mutating EC2 calls, preflight dry-runs the creates that need nothing the night makes
(CreateSecurityGroup, RunInstances, CreateVolume). The others cannot prove anything before the night:
AuthorizeSecurityGroupIngress, AttachVolume, CreateSnapshot and RegisterImage need the group, box,
canvas or snapshot the night makes; the deletes act on resources tagged ``amibake:build-id``, which
the policy allows by that tag, so a made-up id answers NotFound before any permission is evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from operators import defaults
from operators.rules import fingerprint

#: How the recipe script names its default mirror (``CENTOS_DEFAULT_MIRROR=https://...``).
_DEFAULT_MIRROR_RE = re.compile(r"^[A-Z0-9_]*DEFAULT_MIRROR=(\S+)$", re.M)
KMS_USABLE_STATE = "Enabled"
IAM_DOC = "README, 'IAM permissions of the amibake_aws connection'"


@dataclass(frozen=True)
class Check:
    """One preflight answer: ``ok`` (``warning``: ok, but read this), the setting concerned and the fix."""

    name: str
    ok: bool
    detail: str
    setting: str = ""
    fix: str = ""
    warning: bool = False

    def line(self) -> str:
        """One log line: ``OK``, ``WARN`` or ``FAIL``, what, and the fix."""
        status = "FAIL" if not self.ok else "WARN" if self.warning else "OK"
        text = f"{status:4} {self.name}: {self.detail}"
        if self.setting and (self.warning or not self.ok):
            text += f" [setting: {self.setting}]"
        if self.fix and (self.warning or not self.ok):
            text += f" Fix: {self.fix}"
        return text


class PreflightFailed(ValueError):
    """At least one check failed: the message lists every failure with its setting and fix."""

    fix = "each failed check above names its setting and fix; run preflight again after fixing them"

    def __init__(self, checks: Iterable[Check]) -> None:
        self.checks = list(checks)
        self.failed = [c for c in self.checks if not c.ok]
        super().__init__(
            f"preflight: {len(self.failed)} check(s) failed, nothing was created:\n"
            + "\n".join(c.line() for c in self.failed)
        )


def raise_on_failure(checks: Iterable[Check]) -> list[Check]:
    """The checks, or :class:`PreflightFailed` listing every failed one."""
    checks = list(checks)
    if any(not c.ok for c in checks):
        raise PreflightFailed(checks)
    return checks


#: Dry runs that cannot send what the night sends, and so may be denied where the night is not.
STAND_INS = {
    "RunInstances": (
        "the dry run launches into the VPC's default security group (the build's own group does not "
        "exist yet), and a policy that lets the box use amibake's tagged groups only denies that group"
    ),
}


def dry_run(action: str, code: str, message: str, *, settings: Mapping[str, str]) -> Check:
    """What AWS's answer to one ``DryRun`` request means.

    ``settings`` maps values sent in the request (``subnet-…``, a KMS key, a profile) to the setting
    that holds them, so a refusal naming one names that setting. ``UnauthorizedOperation`` of a dry
    run with a stand-in (:data:`STAND_INS`) is a warning: the encoded message does not say which
    resource was denied, and a night that is really denied fails at once at launch, naming the fix.
    """
    name = f"{action} (DryRun)"
    if code == "DryRunOperation":
        return Check(name, True, "would succeed")
    if code == "":
        return Check(
            name,
            False,
            "the EC2 endpoint ignored DryRun and carried the call out: it may have created a resource",
            "the amibake_aws connection's endpoint_url",
            "point the connection at EC2 (or an emulator that honours DryRun); remove what it created",
        )
    if code == "UnauthorizedOperation":
        fix = (
            f"allow ec2:{action} as in the policy of the {IAM_DOC}; "
            "`aws sts decode-authorization-message` tells which resource or condition was denied"
        )
        if action in STAND_INS:
            return Check(
                name,
                True,
                f"not allowed, possibly only because {STAND_INS[action]}: {message}",
                "the IAM policy of the amibake_aws connection's principal",
                fix,
                warning=True,
            )
        return Check(
            name,
            False,
            f"not allowed: {message}",
            "the IAM policy of the amibake_aws connection's principal",
            fix,
        )
    named = [setting for value, setting in settings.items() if value and value in message]
    if named:
        return Check(
            name,
            False,
            f"{code}: {message}",
            ", ".join(sorted(set(named))),
            "AWS refuses this value: correct it (the message says why)",
        )
    return Check(name, False, f"{code}: {message}", "", "AWS refuses the request: the message says why")


def subnet(found: Mapping[str, Any] | None, subnet_id: str, ssh_address: str) -> list[Check]:
    """The subnet exists and is available; it gives the box a public IP when the worker needs one."""
    setting = "subnet_id (trigger Param or [amibake] subnet_id)"
    if not found:
        return [
            Check(
                "subnet",
                False,
                f"{subnet_id} does not exist in this account and region",
                setting,
                "set the id of a subnet in the AWS connection's region",
            )
        ]
    where = f"{found['SubnetId']} in {found.get('VpcId')} ({found.get('AvailabilityZone')})"
    checks = []
    if found.get("State", "available") != "available":
        checks.append(
            Check("subnet", False, f"{where} is {found.get('State')}", setting, "use an available subnet")
        )
    else:
        checks.append(Check("subnet", True, where))
    if ssh_address == "public_ip":
        if found.get("MapPublicIpOnLaunch"):
            checks.append(
                Check("public IP", True, f"{found['SubnetId']} gives instances a public IPv4 address")
            )
        else:
            checks.append(
                Check(
                    "public IP",
                    False,
                    f"{found['SubnetId']} does not give instances a public IPv4 address "
                    "(MapPublicIpOnLaunch is false): with ssh_address=public_ip no worker can reach the box",
                    "[amibake] ssh_address, subnet_id",
                    "use a public subnet (MapPublicIpOnLaunch, a route to an internet gateway), or set "
                    "[amibake] ssh_address=private_ip when the workers are inside the VPC",
                )
            )
    return checks


def instance_type(offered: bool | None, type_name: str, zone: str, field: str = "instance_type") -> Check:
    """An instance type (``field``: the build box's, or ``smoke_instance_type``) is offered in the
    subnet's availability zone (None: not allowed to ask)."""
    name = field.replace("_", " ")
    if offered is None:
        return Check(
            name,
            True,
            f"cannot tell whether {type_name} is offered in {zone}: DescribeInstanceTypeOfferings is denied",
            "the IAM policy of the amibake_aws connection's principal",
            "allow ec2:DescribeInstanceTypeOfferings (read-only) so preflight can check it",
            warning=True,
        )
    if offered:
        return Check(name, True, f"{type_name} is offered in {zone}")
    return Check(
        name,
        False,
        f"{type_name} is not offered in {zone}",
        f"{field}, subnet_id",
        "choose a type offered there (aws ec2 describe-instance-type-offerings) or a subnet in another zone",
    )


def base_ami(image: Mapping[str, Any] | None, problem: str, *, by_id: bool) -> Check:
    """The build box's AMI: found (deprecated ones included), available, x86_64, HVM."""
    setting = "base_ami" if by_id else "base_ami_owner, base_ami_name (or base_ami)"
    fix = (
        "set base_ami to an AMI id of this region, or base_ami_owner + base_ami_name to a filter that "
        "matches an available x86_64 HVM AMI (CentOS 7: owner 125523088429, name 'CentOS Linux 7 x86_64*')"
    )
    if image is None:
        return Check("base AMI", False, problem, setting, fix)
    what = f"{image['ImageId']} ({image.get('Name', '')})"
    wrong = []
    if image.get("State") != "available":
        wrong.append(f"is {image.get('State')}")
    if image.get("Architecture", defaults.ARCHITECTURE) != defaults.ARCHITECTURE:
        wrong.append(f"is {image.get('Architecture')}, not {defaults.ARCHITECTURE}")
    if image.get("VirtualizationType", "hvm") != "hvm":
        wrong.append(f"is {image.get('VirtualizationType')}, not hvm")
    if wrong:
        return Check("base AMI", False, f"{what} {', '.join(wrong)}", setting, fix)
    deprecated = image.get("DeprecationTime")
    if deprecated:
        return Check(
            "base AMI",
            True,
            f"{what}, deprecated since {deprecated} (AWS hides it from searches without IncludeDeprecated; "
            "amibake includes them, and a deprecated AMI still launches)",
            setting,
            "none needed; pin base_ami or move to a maintained base image when one exists",
            warning=True,
        )
    return Check("base AMI", True, what)


def kms_key(metadata: Mapping[str, Any] | None, problem: str, key_id: str) -> Check:
    """The canvas's KMS key exists, is enabled and can encrypt EBS (symmetric ENCRYPT_DECRYPT)."""
    setting = "[amibake] kms_key_id"
    if metadata is None:
        return Check(
            "KMS key",
            False,
            f"{key_id}: {problem}",
            setting,
            "set the id, alias or ARN of a key in this region that the amibake_aws principal may use "
            f"(kms:DescribeKey, CreateGrant, GenerateDataKey*, ReEncrypt*, Decrypt: {IAM_DOC})",
        )
    wrong = []
    if metadata.get("KeyState") != KMS_USABLE_STATE:
        wrong.append(f"is {metadata.get('KeyState')}")
    if metadata.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":
        wrong.append(f"is for {metadata.get('KeyUsage')}")
    if metadata.get("KeySpec", "SYMMETRIC_DEFAULT") != "SYMMETRIC_DEFAULT":
        wrong.append(f"is {metadata.get('KeySpec')} (EBS needs a symmetric key)")
    if wrong:
        return Check(
            "KMS key",
            False,
            f"{metadata.get('KeyId', key_id)} {', '.join(wrong)}",
            setting,
            "enable the key, or set an enabled symmetric ENCRYPT_DECRYPT key",
        )
    return Check("KMS key", True, f"{metadata.get('Arn', key_id)} is enabled for encryption")


def ssh_key(problem: str, login: str, conn_id: str) -> Check:
    """The SSH connection holds a private key (its public half goes to the box) and a login."""
    setting = f"the {conn_id} connection"
    if problem:
        return Check(
            "SSH key",
            False,
            problem,
            setting,
            "put the private key (PEM) in the connection's private_key extra, or a secrets backend",
        )
    if not login:
        return Check(
            "SSH key",
            False,
            "the connection has no login",
            setting,
            "set login to the base AMI's user (centos for CentOS 7, admin for Debian 12)",
        )
    return Check("SSH key", True, f"{conn_id} holds a private key; login {login}")


def repository_credentials(repo: str, conn_id: str, problem: str) -> Check:
    """A repository of the image definition that needs credentials: its connection holds them."""
    name = f"repository {repo}"
    if problem:
        return Check(
            name,
            False,
            problem,
            f"the {conn_id} connection (connection_id of repository {repo})",
            "create the connection with the repository's login and password (or in a secrets backend)",
        )
    return Check(name, True, f"{conn_id} holds a login and a password")


def default_mirror_of(recipe_script: str) -> str:
    """The default mirror a recipe script writes (``*_DEFAULT_MIRROR=...``), '' if it has none.

    Read from ``include/scripts/recipes/<recipe>.sh`` so the default lives in one place.
    """
    match = _DEFAULT_MIRROR_RE.search(recipe_script)
    return match.group(1).strip("'\"") if match else ""


def mirror_probe(recipe: str, mirror_url: str, default_mirror: str) -> str:
    """The URL of the repository metadata to fetch from the worker ('' = nothing to check here)."""
    base = mirror_url or default_mirror
    if not base or recipe not in fingerprint.RECIPE_METADATA:
        return ""
    return fingerprint.recipe_metadata(recipe, base)[0].url


def mirror(url: str, status: int, error: str) -> Check:
    """What fetching the mirror's metadata from the worker showed.

    An HTTP answer other than 2xx is a failure: the mirror is there but has no such repository.
    No answer at all is a warning only: the box may reach a mirror the workers cannot (a VPC
    endpoint, a proxy), so the night goes on and the build's bootstrap phase has the last word.
    """
    setting = "mirror_url (trigger Param; empty = the recipe's default)"
    if not url:
        return Check("mirror", True, "the recipe uses the box's own package sources: nothing to check here")
    if 200 <= status < 300:
        return Check("mirror", True, f"{url} answered HTTP {status}")
    if status:
        return Check(
            "mirror",
            False,
            f"{url} answered HTTP {status}: no repository there",
            setting,
            "set mirror_url to the base URL of a mirror of the recipe's repositories",
        )
    return Check(
        "mirror",
        True,
        f"{url} did not answer from this worker ({error})",
        setting,
        "make sure the BOX can reach it (security group egress, NAT, proxy); if it cannot, set mirror_url",
        warning=True,
    )
