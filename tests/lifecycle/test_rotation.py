"""RotateAmis against moto behind the recording proxy: keep N, deprecate the next M, deregister the
rest with their snapshots; never before the new AMI is available, never anything not ours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from lifecycle_helpers import NOW, all_ids, ids, make_ami, make_snapshot, mutating

from operators.rules.lifecycle import RotationRefused
from operators.rules.validation import ParamError


def night(n: int) -> datetime:
    """Creation time of the AMI built n nights ago."""
    return NOW - timedelta(days=n, minutes=5)


@pytest.fixture
def history(ec2: Any) -> dict[str, Any]:
    """Five nightly centos7 AMIs (ami of night 0 is the new one) with their snapshots, and lookalikes."""
    amis, snaps = [], []
    for n in range(5):
        build = f"{n:012d}"
        snaps.append(make_snapshot(ec2, build, night(n)))
        amis.append(make_ami(ec2, build, night(n), snapshot=snaps[-1]))
    others = {
        "debian": make_ami(ec2, "00000000deb1", night(9), recipe="debian12"),
        "untagged": make_ami(ec2, None, night(9), snapshot=make_snapshot(ec2, None, night(9))),
        "failed": make_ami(ec2, "00000000fa11", night(8), state="failed"),
    }
    ec2.clear_requests()
    return {"amis": amis, "snaps": snaps, "others": others}


def next_minute(when: datetime) -> datetime:
    return when.replace(second=0, microsecond=0) + timedelta(minutes=1)


def rotate(**kwargs: Any) -> Any:
    from operators.rotate import RotateAmis

    args = {"recipe": "centos7", "keep": "2", "grace": "1", **kwargs}  # templates render to strings
    return RotateAmis(task_id="rotate", **args).execute({})


def test_keeps_n_deprecates_m_and_deregisters_the_rest_with_their_snapshots(
    ec2: Any, history: dict[str, Any]
) -> None:
    amis, snaps = history["amis"], history["snaps"]
    before = datetime.now(UTC)
    result = rotate(new_ami_id=amis[0])
    after = datetime.now(UTC)
    calls = mutating(ec2)

    assert [c["action"] for c in calls] == ["EnableImageDeprecation"] + ["DeregisterImage"] * 2 + [
        "DeleteSnapshot"
    ] * 2
    deprecation = calls[0]["params"]
    assert deprecation["ImageId"] == amis[2]
    at = datetime.fromisoformat(deprecation["DeprecateAt"].replace("Z", "+00:00"))
    assert next_minute(before) <= at <= next_minute(after)  # the next whole minute when it ran
    assert ids(calls, "DeregisterImage") == [amis[3], amis[4]]
    assert ids(calls, "DeleteSnapshot") == [snaps[3], snaps[4]]
    assert not all_ids(calls) & {*amis[:2], *snaps[:3], *history["others"].values()}
    assert not all_ids(calls[1:]) & {amis[2]}  # the deprecated one is only deprecated
    assert result == {
        "kept": amis[:2],
        "deprecated": [amis[2]],
        "deregistered": amis[3:],
        "deleted_snapshots": snaps[3:],
    }

    client = ec2.boto3_client()
    left = {i["ImageId"]: i for i in client.describe_images(Owners=["self"])["Images"]}
    assert set(amis[:3]) | set(history["others"].values()) == set(left)
    assert {s["SnapshotId"] for s in client.describe_snapshots(OwnerIds=["self"])["Snapshots"]} >= set(
        snaps[:3]
    )

    ec2.clear_requests()
    assert rotate(new_ami_id=amis[0])["deregistered"] == []  # a retry changes nothing
    assert mutating(ec2) == []


def test_keep_one_grace_zero_leaves_only_the_new_ami(ec2: Any, history: dict[str, Any]) -> None:
    amis = history["amis"]
    rotate(new_ami_id=amis[0], keep=1, grace=0)
    assert ids(mutating(ec2), "DeregisterImage") == amis[1:]
    assert ids(mutating(ec2), "EnableImageDeprecation") == []


def test_nothing_changes_while_the_new_ami_is_not_available(ec2: Any, history: dict[str, Any]) -> None:
    pending = make_ami(ec2, "0000000000aa", NOW, state="pending")
    ec2.clear_requests()
    with pytest.raises(RotationRefused, match="is 'pending', not available"):
        rotate(new_ami_id=pending, keep=1, grace=0)
    with pytest.raises(RotationRefused, match="does not exist"):
        rotate(new_ami_id="ami-0123456789abcdef0", keep=1, grace=0)
    assert mutating(ec2) == []


def test_an_unverified_new_ami_is_refused_and_an_unverified_old_one_never_kept(
    ec2: Any, history: dict[str, Any]
) -> None:
    """Rotation runs after the smoke check: an AMI without ``amibake:verified=true`` is no good AMI."""
    amis = history["amis"]
    failed = make_ami(ec2, "0000000000bb", NOW, verified=False)  # tonight's AMI failed its smoke check
    ec2.clear_requests()
    with pytest.raises(RotationRefused, match=f"{failed} is not verified"):
        rotate(new_ami_id=failed, keep=1, grace=0)
    assert mutating(ec2) == []
    # the next night's verified AMI keeps 2 VERIFIED AMIs: the new one and night 0, not the failed one
    good = make_ami(ec2, "0000000000cc", NOW + timedelta(minutes=1))
    ec2.clear_requests()
    result = rotate(new_ami_id=good, keep=2, grace=0)
    assert result["kept"] == [good, amis[0]]
    assert result["deregistered"] == amis[1:]
    # the failed one has only 1 verified AMI newer than it (< keep + grace): deprecated, not yet gone
    assert result["deprecated"] == [failed]


def test_a_run_superseded_by_a_newer_ami_is_skipped_and_changes_nothing(
    ec2: Any, history: dict[str, Any]
) -> None:
    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException, match=f"{history['amis'][0]} is newer"):
        rotate(new_ami_id=history["amis"][1], keep=1, grace=0)
    assert mutating(ec2) == []


def test_a_test_lines_amis_never_push_production_amis_out(ec2: Any, history: dict[str, Any]) -> None:
    """Newer AMIs of another image line (ami_name_prefix) are neither counted nor retired."""
    amis = history["amis"]
    tests = [
        make_ami(ec2, f"00000000bee{n}", NOW - timedelta(minutes=n), line="amibake-test") for n in range(3)
    ]
    ec2.clear_requests()
    result = rotate(new_ami_id=amis[0], keep=2, grace=1)
    assert result["kept"] == amis[:2] and result["deprecated"] == [amis[2]]
    touched = {c["params"].get("ImageId") for c in mutating(ec2)}
    assert not touched & set(tests)
    ec2.clear_requests()
    result = rotate(new_ami_id=tests[0], keep=1, grace=0)
    assert result["kept"] == [tests[0]] and result["deregistered"] == tests[1:]
    assert not {c["params"].get("ImageId") for c in mutating(ec2)} & set(amis)


def test_an_ami_without_our_tags_is_never_the_new_one(ec2: Any, history: dict[str, Any]) -> None:
    with pytest.raises(RotationRefused, match="not an amibake AMI of recipe 'centos7'"):
        rotate(new_ami_id=history["others"]["untagged"], keep=1, grace=0)
    assert mutating(ec2) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("recipe", "centos7; rm -rf /"),
        ("recipe", "../../etc/passwd"),
        ("recipe", "rhel9"),
        ("recipe", ""),
        ("recipe", None),
        ("new_ami_id", "ami-$(reboot)"),
        ("new_ami_id", "ami-XYZ"),
        ("new_ami_id", "snap-0123456789abcdef0"),
        ("new_ami_id", "ami-0123456789abcdef0 ami-0123456789abcdef1"),
        ("new_ami_id", "ami-" + "0" * 300),
        ("new_ami_id", ""),
        ("new_ami_id", None),
        ("new_ami_id", ["ami-0123456789abcdef0"]),
        pytest.param("new_ami_id", "ami-0123456789abcdef0\n"),
        ("keep", "0"),
        ("keep", -1),
        ("keep", "1.5"),
        ("keep", "many"),
        ("keep", True),
        ("keep", 10**6),
        ("grace", "-1"),
        ("grace", "`id`"),
    ],
)
def test_bad_input_is_refused_naming_the_field_before_any_call(ec2: Any, field: str, value: Any) -> None:
    args = {"new_ami_id": "ami-0123456789abcdef0", field: value}
    with pytest.raises(ParamError, match=f"^{field}: ") as err:
        rotate(**args)
    assert err.value.field == field
    assert ec2.requests == []


def test_throttling_is_retried_and_each_ami_is_retired_once(ec2: Any, history: dict[str, Any]) -> None:
    amis, snaps = history["amis"], history["snaps"]
    for action in ("DescribeImages", "EnableImageDeprecation", "DeregisterImage", "DeleteSnapshot"):
        ec2.add_fault(action, "RequestLimitExceeded", 503, times=2)
    result = rotate(new_ami_id=amis[0], keep=3, grace=1)
    assert result["deprecated"] == [amis[3]] and result["deregistered"] == [amis[4]]
    calls = [c for c in mutating(ec2) if "fault" not in c]
    assert [(c["action"], *ids([c], c["action"])) for c in calls] == [
        ("EnableImageDeprecation", amis[3]),
        ("DeregisterImage", amis[4]),
        ("DeleteSnapshot", snaps[4]),
    ]
