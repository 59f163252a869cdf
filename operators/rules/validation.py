"""Validation of every value a user or the configuration gives amibake, before anything is created.

Pure Python, no Airflow import: the DAG's first task and each operator call :func:`validate_build`,
and the rules are unit-tested on their own. A bad value raises :class:`ParamError` naming the field.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from operators import defaults
from operators.rules import naming
from operators.rules.contract import CONTRACT

if TYPE_CHECKING:
    from operators.rules.definition import ImageDefinition

# Checked by the box too: one home, include/scripts/contract.env.
AMI_ID_RE = CONTRACT.ami_id_re
VOLUME_ID_RE = CONTRACT.volume_id_re
DEVICE_NAME_RE = CONTRACT.device_name_re
SUBNET_ID_RE = re.compile(r"^subnet-[0-9a-f]{8,17}$")
INSTANCE_ID_RE = re.compile(r"^i-[0-9a-f]{8,17}$")
SNAPSHOT_ID_RE = re.compile(r"^snap-[0-9a-f]{8,17}$")
INSTANCE_TYPE_RE = re.compile(r"^[a-z][a-z0-9-]{0,15}\.[a-z0-9-]{1,15}$")
OWNER_RE = re.compile(r"^(self|amazon|aws-marketplace|\d{12})$")
AMI_NAME_FILTER_RE = re.compile(r"^[A-Za-z0-9()\[\] ./'@_*?-]{1,128}$")
INSTANCE_PROFILE_RE = re.compile(
    r"^([\w+=,.@-]{1,128}|arn:aws[\w-]*:iam::\d{12}:instance-profile/[\w+=,.@/-]{1,128})$"
)
KMS_KEY_RE = re.compile(
    r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32}|alias/[\w/-]{1,250}"
    r"|arn:aws[\w-]*:kms:[a-z0-9-]+:\d{12}:(key/[\w-]+|alias/[\w/-]+))$"
)


#: The fields of the nightly DAG's trigger form (its Params; tests check the two agree). A run's conf
#: may hold these and nothing else.
TRIGGER_PARAMS = frozenset(
    {
        "ami_name_prefix", "canvas_size_gib", "mirror_url", "boot_check", "base_ami",
        "base_ami_owner", "base_ami_name", "instance_type", "subnet_id", "keep_amis", "deprecate_grace",
        "smoke_check", "smoke_instance_type", "force",
    }
)  # fmt: skip
#: Values that are the operator's to set, never a trigger's: where each one is set instead.
OPERATOR_ONLY = {
    "encrypted": "[amibake] encrypted",
    "instance_profile": "[amibake] instance_profile",
    "kms_key_id": "[amibake] kms_key_id",
    "device_name": "nowhere (amibake attaches the canvas at /dev/sdf)",
}


class ParamError(ValueError):
    """A value amibake refuses; the message starts with the field's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class BuildParams:
    """Everything one build needs, validated and with defaults filled in."""

    recipe: str
    image: str
    base_ami: str
    base_ami_owner: str
    base_ami_name: str
    instance_type: str
    subnet_id: str
    canvas_size_gib: int
    device_name: str
    encrypted: bool
    kms_key_id: str
    ami_name_prefix: str
    mirror_url: str
    boot_check: bool
    instance_profile: str
    ssh_address: str
    ssh_cidr: str
    keep_amis: int
    deprecate_grace: int
    smoke_check: bool
    smoke_instance_type: str
    #: build even when the inputs are those of the newest verified AMI (operators.rules.fingerprint)
    force: bool = False
    #: the definition's ``distribution`` (``Distribution.as_dict``): where ``DistributeAmi`` copies and
    #: shares the verified AMI; empty for a build of no definition
    distribution: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what the validate task pushes to XCom)."""
        return asdict(self)


def _str(params: Mapping[str, Any], field: str, default: str = "") -> str:
    value = params.get(field, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ParamError(field, f"must be a string, got {type(value).__name__} {value!r}")
    if value != value.strip():
        raise ParamError(field, f"must not start or end with white space or a newline, got {value!r}")
    return value


def kms_key(kms_key_id: str, encrypted: bool) -> str:
    """``kms_key_id`` ('' for the account's default key), checked: a key id, alias or ARN, and only
    with encryption on."""
    if kms_key_id:
        match_field("kms_key_id", kms_key_id, KMS_KEY_RE, "a KMS key id, alias or ARN")
        if not encrypted:
            raise ParamError("kms_key_id", "given but encrypted is false")
    return kms_key_id


def as_bool(params: Mapping[str, Any], field: str, default: bool) -> bool:
    """A boolean field (true/false strings from a form are accepted)."""
    value = params.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ParamError(field, f"must be true or false, got {value!r}")


def match_field(field: str, value: str, pattern: re.Pattern[str], what: str) -> str:
    """``value`` if it matches ``pattern``, else a ParamError saying what was expected."""
    if not pattern.fullmatch(value):
        raise ParamError(field, f"must be {what}, got {value!r}")
    return value


def validate_whole(field: str, value: Any, low: int, high: int, unit: str = "") -> int:
    """A whole number in [low, high], read the way the box reads one (contract UINT_RE: digits only)."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not CONTRACT.uint_re.fullmatch(text):
        raise ParamError(field, f"must be a whole number, got {value!r}")
    number = int(text)
    if not low <= number <= high:
        raise ParamError(field, f"must be between {low} and {high}{unit}, got {number}")
    return number


def validate_size(value: Any, field: str = "canvas_size_gib") -> int:
    """Canvas size in GiB: the contract's range (what CreateVolume takes for gp3)."""
    return validate_whole(field, value, CONTRACT.canvas_size_min_gib, CONTRACT.canvas_size_max_gib, " GiB")


def validate_number(field: str, value: Any, low: float, high: float, *, integer: bool = False) -> float:
    """A number within [low, high] from a Param or its rendered template; errors name the field."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ParamError(field, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ParamError(field, f"must be a number, got {value!r}") from None
    if number != number or not low <= number <= high:
        raise ParamError(field, f"must be between {low:g} and {high:g}, got {value!r}")
    if integer:
        if number != int(number):
            raise ParamError(field, f"must be a whole number, got {value!r}")
        return int(number)
    return number


def _hide_credentials(url: str) -> str:
    """``url`` with anything before an ``@`` in its authority replaced, for error messages."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if sep and "@" in authority:
        return f"{scheme}://***@{authority.rsplit('@', 1)[1]}{slash}{path}"
    return url


def validate_mirror_url(value: str, field: str = "mirror_url") -> str:
    """The contract's mirror URL rule (the box applies the same one): http(s)://host[:port][/path].

    No ``user:password@`` (credentials never go in a URL; the message does not repeat them), no
    query, ``=`` or fragment, nothing a shell or a repo file would trip over. The verdict is the
    contract's regular expression; the checks before it only name the reason.
    """
    if not value:
        return ""
    if len(value) > CONTRACT.mirror_url_max:
        raise ParamError(field, f"must be at most {CONTRACT.mirror_url_max} characters, got {len(value)}")
    if CONTRACT.mirror_url_re.fullmatch(value):
        return value
    shown = _hide_credentials(value)
    scheme, _, rest = value.partition("://")
    if scheme not in ("http", "https"):
        reason = "must start with http:// or https://"
    elif "@" in rest.partition("/")[0]:
        reason = "must not hold credentials (user:password@); give the box a mirror it can read without"
    elif any(c in rest for c in "?=#"):
        reason = "must not have a query or fragment (?, = or #)"
    else:
        reason = "must be http(s)://host[:port][/path] with letters, digits and ._~%+-/ in the path"
    raise ParamError(field, f"{reason}, got {shown!r}")


def validate_cidr(value: str, field: str = "ssh_cidr") -> str:
    """An IPv4/IPv6 network in CIDR form (host bits zero)."""
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ParamError(field, f"must be a network in CIDR form like 203.0.113.0/24 ({exc})") from None
    return str(network)


def validate_ami_prefix(value: str, image: str, field: str = "ami_name_prefix") -> str:
    """AMI name prefix: AWS's AMI name characters, short enough for the date and build id.

    Empty = ``amibake-<image>`` (an image definition's name; a recipe's for callers without one).
    """
    prefix = value or defaults.default_ami_prefix(image)
    if len(prefix) > naming.AMI_PREFIX_MAX:
        raise ParamError(field, f"must be at most {naming.AMI_PREFIX_MAX} characters, got {len(prefix)}")
    if not naming.AMI_NAME_RE.fullmatch(prefix):
        raise ParamError(
            field, f"may only use letters, digits, spaces and ()[]./'@_- (3+ chars), got {prefix!r}"
        )
    return prefix


def refuse_undeclared(params: Mapping[str, Any]) -> None:
    """Refuse a run whose conf holds keys the trigger form does not declare (the error names them).

    Whoever may trigger the DAG must not choose the box's IAM role, the encryption or the device:
    those come from ``[amibake]`` configuration only (:data:`OPERATOR_ONLY`).
    """
    unknown = sorted(set(params) - TRIGGER_PARAMS)
    if not unknown:
        return
    where = "; ".join(f"{k} is set in {OPERATOR_ONLY[k]}" for k in unknown if k in OPERATOR_ONLY)
    raise ParamError(
        unknown[0],
        f"not a trigger parameter: {', '.join(unknown)} refused before anything is created "
        f"(the form has {', '.join(sorted(TRIGGER_PARAMS))})" + (f"; {where}" if where else ""),
    )


def validate_build(params: Mapping[str, Any], settings: Mapping[str, str], image: str = "") -> BuildParams:
    """Check every user value (``params``) and setting (``[amibake]``); return them with defaults.

    ``image`` names the image definition (its AMI name prefix is the default); "" = the recipe's.
    """
    recipe = _str(params, "recipe", defaults.DEFAULT_RECIPE)
    if recipe not in defaults.RECIPES:
        raise ParamError("recipe", f"must be one of {', '.join(defaults.RECIPES)}, got {recipe!r}")

    base_ami = _str(params, "base_ami")
    owner = _str(params, "base_ami_owner", defaults.DEFAULT_BASE_AMI_OWNER)
    name_filter = _str(params, "base_ami_name", defaults.DEFAULT_BASE_AMI_NAME)
    if base_ami:
        match_field("base_ami", base_ami, AMI_ID_RE, "an AMI id like ami-0123456789abcdef0")
    else:
        match_field(
            "base_ami_owner", owner, OWNER_RE, "self, amazon, aws-marketplace or a 12-digit account id"
        )
        match_field("base_ami_name", name_filter, AMI_NAME_FILTER_RE, "an AMI name pattern (* and ? allowed)")

    instance_type = match_field(
        "instance_type",
        _str(params, "instance_type", defaults.DEFAULT_INSTANCE_TYPE),
        INSTANCE_TYPE_RE,
        "an EC2 instance type like t3.medium",
    )
    smoke_instance_type = match_field(
        "smoke_instance_type",
        _str(params, "smoke_instance_type")
        or settings.get("smoke_instance_type", defaults.DEFAULT_SMOKE_INSTANCE_TYPE),
        INSTANCE_TYPE_RE,
        "an EC2 instance type like t3.micro",
    )
    subnet_id = _str(params, "subnet_id") or settings.get("subnet_id", "")
    if not subnet_id:
        raise ParamError("subnet_id", "is required (a trigger parameter or [amibake] subnet_id)")
    match_field("subnet_id", subnet_id, SUBNET_ID_RE, "a subnet id like subnet-0123456789abcdef0")

    size = validate_size(params.get("canvas_size_gib", defaults.DEFAULT_CANVAS_SIZE_GIB))
    device_name = match_field(
        "device_name",
        _str(params, "device_name", defaults.DEFAULT_CANVAS_DEVICE),
        DEVICE_NAME_RE,
        "a secondary EBS device name /dev/sdf../dev/sdp",
    )
    encrypted = as_bool(params, "encrypted", as_bool(settings, "encrypted", True))
    kms_key_id = kms_key(_str(params, "kms_key_id") or settings.get("kms_key_id", ""), encrypted)

    instance_profile = _str(params, "instance_profile") or settings.get("instance_profile", "")
    if instance_profile:
        match_field(
            "instance_profile", instance_profile, INSTANCE_PROFILE_RE, "an instance profile name or ARN"
        )

    ssh_address = settings.get("ssh_address", defaults.SETTINGS["ssh_address"])
    if ssh_address not in defaults.SSH_ADDRESSES:
        raise ParamError(
            "ssh_address",
            f"[amibake] ssh_address must be one of {', '.join(defaults.SSH_ADDRESSES)}, got {ssh_address!r}",
        )
    ssh_cidr = settings.get("ssh_cidr", "")
    if ssh_cidr:
        ssh_cidr = validate_cidr(ssh_cidr)
    elif ssh_address != "connection":
        raise ParamError(
            "ssh_cidr",
            f"[amibake] ssh_cidr is required with ssh_address={ssh_address}: the CIDR allowed to reach the "
            "box on tcp/22 (there is deliberately no default, never 0.0.0.0/0)",
        )

    return BuildParams(
        recipe=recipe,
        image=image or recipe,
        base_ami=base_ami,
        base_ami_owner=owner,
        base_ami_name=name_filter,
        instance_type=instance_type,
        subnet_id=subnet_id,
        canvas_size_gib=size,
        device_name=device_name,
        encrypted=encrypted,
        kms_key_id=kms_key_id,
        ami_name_prefix=validate_ami_prefix(_str(params, "ami_name_prefix"), image or recipe),
        mirror_url=validate_mirror_url(_str(params, "mirror_url")),
        boot_check=as_bool(params, "boot_check", as_bool(settings, "boot_check", True)),
        instance_profile=instance_profile,
        ssh_address=ssh_address,
        ssh_cidr=ssh_cidr,
        keep_amis=int(
            validate_number(
                "keep_amis",
                params.get("keep_amis", defaults.DEFAULT_KEEP_AMIS),
                *defaults.KEEP_AMIS_RANGE,
                integer=True,
            )
        ),
        deprecate_grace=int(
            validate_number(
                "deprecate_grace",
                params.get("deprecate_grace", defaults.DEFAULT_DEPRECATE_GRACE),
                *defaults.DEPRECATE_GRACE_RANGE,
                integer=True,
            )
        ),
        smoke_check=as_bool(params, "smoke_check", as_bool(settings, "smoke_check", True)),
        smoke_instance_type=smoke_instance_type,
        force=as_bool(params, "force", False),
    )


def require_id(field: str, value: Any, pattern: re.Pattern[str], what: str) -> str:
    """An AWS resource id handed over between tasks (XCom): present and well-formed."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ParamError(field, f"must be {what}, got {value!r}")
    return value


def parse_conf_items(items: list[str]) -> dict[str, Any]:
    """``KEY=JSON`` command-line items as a run's conf (a value that is not JSON is a bare string)."""
    conf: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--conf {item!r} must look like KEY=JSON")
        try:
            conf[key] = json.loads(raw)
        except json.JSONDecodeError:
            conf[key] = raw
    return conf


#: Trigger-form fields that override an image definition's field for one run: form name -> the
#: definition's field (dotted). The form's defaults are the definition's values.
FORM_OVERRIDES = {
    "canvas_size_gib": "size_gib",
    "mirror_url": "mirror",
    "keep_amis": "retention.keep",
    "deprecate_grace": "retention.deprecate",
}


def apply_form_values(image: ImageDefinition, params: Mapping[str, Any]) -> ImageDefinition:
    """The definition with this run's form values (:data:`FORM_OVERRIDES`) applied and checked as the
    file is; a refusal names the form's field. An empty field (None, or "" from a text box) keeps
    the definition's value."""
    from operators.rules import definition  # it uses this module's rules: import it when called

    overrides = {
        FORM_OVERRIDES[k]: v for k, v in params.items() if k in FORM_OVERRIDES and v not in (None, "")
    }
    try:
        return definition.apply_overrides(image, overrides)
    except definition.DefinitionError as exc:  # name the form's field, as every other refusal does
        form_field = {v: k for k, v in FORM_OVERRIDES.items()}.get(exc.field)
        if form_field is None:
            raise
        raise ParamError(form_field, f"{exc.problem} (the definition's {exc.field})") from None


def validate_image_build(
    image: ImageDefinition, params: Mapping[str, Any], settings: Mapping[str, str]
) -> BuildParams:
    """:func:`validate_build` of one image definition's run: the definition's recipe and values, this
    run's overrides of them checked as the file is (:func:`apply_form_values`)."""
    image = apply_form_values(image, params)
    values = {
        "canvas_size_gib": image.size_gib,
        "mirror_url": image.mirror or "",
        "keep_amis": image.keep,
        "deprecate_grace": image.deprecate,
    }
    built = validate_build({**params, **values, "recipe": image.recipe}, settings, image=image.name)
    return replace(built, distribution=image.distribution.as_dict())
