"""Which failures a retry can fix, and which it cannot (pure: no Airflow, boto or paramiko import).

A task retried on a permanent error only wastes the backoff (a run once spent 5 min 22 s retrying
``NoSuchEntity``) and hides the fix. :func:`classify` sorts an exception into

- **permanent**: AWS refused the request as such (``UnauthorizedOperation``, ``InvalidParameter*``,
  ``*.Malformed``, ``NoSuchEntity``, a quota), an id the user gave does not exist (``*.NotFound``
  naming one of ``user_ids``), or amibake's own validation refused a value (``ValueError``, which
  includes ``ParamError``). The verdict carries the fix to show.
- **retryable**: everything else, in particular throttling, 5xx answers, and ``*.NotFound`` of
  resources the run made itself a moment ago (EC2 is eventually consistent: a just-created
  instance, volume or snapshot can be unknown to Describe for a few seconds).

botocore already retries throttling and 5xx inside one call; this decides what the Airflow task
retry does after that. ``operators.base`` applies it to every amibake operator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_IAM_FIX = "the IAM principal of the AWS connection lacks a permission (README, 'IAM permissions')"
#: Codes no retry can fix, with the fix to name.
PERMANENT_CODES: dict[str, str] = {
    "UnauthorizedOperation": (
        "the IAM principal of the AWS connection may not make this call: add the action to its policy "
        "(README, 'IAM permissions'); `aws sts decode-authorization-message` shows which condition failed"
    ),
    "AccessDenied": _IAM_FIX,
    "AccessDeniedException": _IAM_FIX,
    "AuthFailure": "the AWS connection's credentials are not valid: fix the connection",
    "InvalidClientTokenId": "the AWS connection's access key is unknown: fix the connection",
    "SignatureDoesNotMatch": "the AWS connection's secret key is wrong: fix the connection",
    "OptInRequired": "the account is not subscribed to this service or region: opt in, or use another region",
    "NoSuchEntity": "an IAM name amibake was given does not exist: check [amibake] instance_profile",
    "InvalidKeyUsageException": "[amibake] kms_key_id must be a symmetric ENCRYPT_DECRYPT key",
    "DisabledException": "the KMS key of [amibake] kms_key_id is disabled: enable it or set another",
    "KMSInvalidStateException": "the KMS key of [amibake] kms_key_id is pending deletion or unavailable",
    "MissingParameter": "amibake sent an incomplete request: report this as a bug",
    "UnknownParameter": "amibake sent a parameter this endpoint does not know: report this as a bug",
    "UnsupportedOperation": "the request is not supported here (instance type, region or AMI)",
    "Unsupported": "the request is not supported here (instance type, region or AMI)",
    "VcpuLimitExceeded": "the account's vCPU quota is used up: raise it (Service Quotas) or free instances",
    "InstanceLimitExceeded": "the account's instance quota is used up: raise it (Service Quotas)",
    "VolumeLimitExceeded": "the account's EBS volume quota is used up: raise it (Service Quotas)",
    "SnapshotLimitExceeded": "the account's snapshot quota is used up: raise it, or lower keep_amis",
    "AMIQuotaExceeded": "the account's AMI quota is used up: raise it, or lower keep_amis",
    "ResourceLimitExceeded": "an account quota is used up: raise it (Service Quotas)",
}
#: Code prefixes no retry can fix (``InvalidParameter``, ``InvalidParameterValue``, ``...Combination``).
PERMANENT_PREFIXES: dict[str, str] = {
    "InvalidParameter": "a value sent to AWS is refused: the message names it; fix that Param or setting",
    "ValidationError": "a value sent to AWS is refused: the message names it; fix that Param or setting",
    "ValidationException": "a value sent to AWS is refused: the message names it; fix that Param or setting",
}
#: Codes always worth a retry, even where a rule above would match.
RETRYABLE_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "InsufficientInstanceCapacity",
        "InsufficientVolumeCapacity",
        "IncorrectState",
        "IncorrectInstanceState",
        "DependencyViolation",
        "ConcurrentTagAccess",
    }
)


@dataclass(frozen=True)
class Verdict:
    """Whether a failure is permanent, what it was, and (when permanent) the fix."""

    permanent: bool
    reason: str
    fix: str = ""

    def message(self) -> str:
        """One line for the task log: what failed, and what to do."""
        return f"{self.reason} (no retry can fix this). Fix: {self.fix}" if self.permanent else self.reason


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` ('' for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


def http_status(exc: BaseException) -> int:
    """The HTTP status of a botocore ``ClientError`` (0 for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return 0
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def classify(exc: BaseException, user_ids: Mapping[str, str] | None = None) -> Verdict:
    """Sort one exception; ``user_ids`` maps ids the user gave (AMI, subnet, key ...) to their setting.

    An error naming none of ``user_ids`` in a ``*.NotFound`` is taken for eventual consistency.
    """
    code = error_code(exc)
    if not code:
        if isinstance(exc, ValueError):
            field = getattr(exc, "field", "")
            fix = getattr(exc, "fix", "") or (f"correct {field}" if field else "correct the value it names")
            return Verdict(True, f"refused: {exc}", fix)
        return Verdict(False, f"{type(exc).__name__}: {exc}")
    return classify_answer(code, str(exc), http_status(exc), user_ids)


def classify_answer(
    code: str, text: str, status: int = 0, user_ids: Mapping[str, str] | None = None
) -> Verdict:
    """Sort one AWS error answer (its code, message and HTTP status); see :func:`classify`."""
    user_ids = {k: v for k, v in (user_ids or {}).items() if k}
    if code in RETRYABLE_CODES or status >= 500:
        return Verdict(False, f"{code} (transient): {text}")
    if code.endswith(".NotFound") or code == "NotFoundException":
        named = sorted(setting for value, setting in user_ids.items() if value in text)
        if named:
            return Verdict(
                True,
                f"{code}: {text}",
                f"{', '.join(named)} names something that does not exist in this account and region: "
                "correct it",
            )
        return Verdict(False, f"{code} (may be eventual consistency): {text}")
    if code.endswith(".Malformed"):
        return Verdict(True, f"{code}: {text}", "a malformed id was sent: correct the Param or setting")
    if code in PERMANENT_CODES:
        return Verdict(True, f"{code}: {text}", PERMANENT_CODES[code])
    for prefix, fix in PERMANENT_PREFIXES.items():
        if code.startswith(prefix):
            return Verdict(True, f"{code}: {text}", fix)
    return Verdict(False, f"{code}: {text}")


def user_ids_of(values: Mapping[str, Any]) -> dict[str, str]:
    """``{value: field}`` for the non-empty string values of an operator's user-given fields."""
    return {v: k for k, v in values.items() if isinstance(v, str) and v.strip()}
