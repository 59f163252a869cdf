"""Preflight: every bad setting fails naming its setting and fix, and NOTHING is created.

The operator and the CLI run against moto behind the recording proxy (the local EC2 API), the real
sshd's connection, moto's KMS and a real local HTTP server as the mirror. After each run the test
checks the recorded EC2 requests: every one is read-only (Describe*) or carries ``DryRun=true``;
and moto holds no instance, volume, security group or KMS grant afterwards. Faults such as
``UnauthorizedOperation`` are injected by the proxy (from outside the code under test).
"""

from __future__ import annotations

import http.server
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG
from operator_harness import make_context, run_operator

from operators import defaults
from operators.base import settings
from operators.build_box import LaunchBuildBox, TerminateBuildBox
from operators.preflight import Preflight, main
from operators.rules import preflight as rules
from operators.rules.validation import TRIGGER_PARAMS, ParamError, validate_build

RUN_ID = "manual__2026-11-30T02:00:00+00:00"
READ_ONLY = re.compile(r"^(Describe|Get|List)")
#: The night's creates preflight sends with DryRun (operators/rules/preflight.py says why only these).
DRY_RUN_ACTIONS = ("CreateSecurityGroup", "RunInstances", "CreateVolume")
REPO = Path(__file__).resolve().parents[2]


# -- the pure rules ---------------------------------------------------------------------------------
def test_a_dry_run_answer_is_read_as_aws_means_it() -> None:
    ok = rules.dry_run("RunInstances", "DryRunOperation", "Request would have succeeded", settings={})
    assert ok.ok
    denied = rules.dry_run("CreateVolume", "UnauthorizedOperation", "You are not authorized", settings={})
    assert not denied.ok and "ec2:CreateVolume" in denied.fix and "IAM policy" in denied.setting
    stand_in = rules.dry_run("RunInstances", "UnauthorizedOperation", "You are not authorized", settings={})
    assert stand_in.ok and stand_in.warning and "ec2:RunInstances" in stand_in.fix
    executed = rules.dry_run("CreateVolume", "", "", settings={})
    assert not executed.ok and "ignored DryRun" in executed.detail
    refused = rules.dry_run(
        "RunInstances",
        "InvalidParameterValue",
        "Value (evil) for parameter iamInstanceProfile.name is invalid",
        settings={"evil": "[amibake] instance_profile"},
    )
    assert not refused.ok and refused.setting == "[amibake] instance_profile"


def test_public_ip_is_required_only_for_ssh_address_public_ip() -> None:
    private = {
        "SubnetId": "subnet-1",
        "VpcId": "vpc-1",
        "AvailabilityZone": "az-1",
        "MapPublicIpOnLaunch": False,
    }
    assert all(c.ok for c in rules.subnet(private, "subnet-1", "private_ip"))
    (where, public) = rules.subnet(private, "subnet-1", "public_ip")
    assert where.ok and not public.ok
    assert "ssh_address" in public.setting and "private_ip" in public.fix
    (missing,) = rules.subnet(None, "subnet-1", "public_ip")
    assert not missing.ok and missing.setting.startswith("subnet_id")


def test_a_deprecated_base_ami_passes_with_a_warning_and_a_wrong_one_fails() -> None:
    image = {"ImageId": "ami-1", "Name": "CentOS", "State": "available", "Architecture": "x86_64"}
    assert rules.base_ami(image, "", by_id=False).ok
    old = rules.base_ami({**image, "DeprecationTime": "2024-01-01T00:00:00Z"}, "", by_id=False)
    assert old.ok and old.warning and "deprecated since" in old.detail
    arm = rules.base_ami({**image, "Architecture": "arm64"}, "", by_id=True)
    assert not arm.ok and arm.setting == "base_ami"
    assert not rules.base_ami(None, "nothing matches", by_id=False).ok


def test_kms_key_must_be_enabled_and_symmetric() -> None:
    good = {
        "KeyId": "k",
        "KeyState": "Enabled",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeySpec": "SYMMETRIC_DEFAULT",
    }
    assert rules.kms_key(good, "", "k").ok
    for bad in ({"KeyState": "Disabled"}, {"KeyState": "PendingDeletion"}, {"KeySpec": "RSA_2048"}):
        check = rules.kms_key({**good, **bad}, "", "k")
        assert not check.ok and check.setting == "[amibake] kms_key_id"


def test_the_mirror_default_is_read_from_the_recipe_script() -> None:
    """One home for the default mirror: recipes/centos7.sh."""
    script = (REPO / "include" / "scripts" / "recipes" / "centos7.sh").read_text()
    default = rules.default_mirror_of(script)
    assert default.startswith("https://vault.centos.org/")
    assert rules.mirror_probe("centos7", "", default) == f"{default}/os/x86_64/repodata/repomd.xml"
    assert rules.mirror_probe("debian12", "", "") == ""  # the box's own apt sources
    assert not rules.mirror("http://m/x", 404, "").ok
    unreachable = rules.mirror("http://m/x", 0, "timed out")
    assert unreachable.ok and unreachable.warning


def test_every_failure_is_listed_at_once() -> None:
    checks = [
        rules.Check("a", True, "fine"),
        rules.Check("b", False, "bad", "setting_b", "fix b"),
        rules.Check("c", False, "worse", "setting_c", "fix c"),
    ]
    with pytest.raises(rules.PreflightFailed) as failed:
        rules.raise_on_failure(checks)
    assert [c.name for c in failed.value.failed] == ["b", "c"]
    assert "[setting: setting_b] Fix: fix b" in str(failed.value)
    assert "nothing was created" in str(failed.value)


# -- against the local EC2 API ----------------------------------------------------------------------
def _created_nothing(ec2: Any) -> None:
    """Every recorded EC2 request is read-only or a dry run, and moto holds nothing of ours."""
    requests = ec2.requests
    assert requests, "preflight asked nothing"
    for request in requests:
        assert READ_ONLY.match(request["action"]) or request["params"].get("DryRun") == "true", request
    moto = ec2.boto3_client()
    assert moto.describe_instances()["Reservations"] == []
    assert moto.describe_volumes()["Volumes"] == []
    assert {g["GroupName"] for g in moto.describe_security_groups()["SecurityGroups"]} == {"default"}
    kms = ec2.boto3_client("kms")
    for key in kms.list_keys()["Keys"]:
        assert kms.list_grants(KeyId=key["KeyId"])["Grants"] == []


def _preflight(conf: dict[str, Any], dag_id: str = "amibake_t_preflight") -> tuple[Any, list[dict]]:
    """Run the Preflight task on validated ``conf``; (the exception or None, the checks logged)."""
    build = validate_build({"recipe": "debian12", **conf}, settings()).as_dict()
    with DAG(dag_id, schedule=None) as dag:
        op = Preflight(task_id="preflight", recipe="debian12", build=build)
    try:
        return None, run_operator(op, make_context(dag, RUN_ID)).result
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc, []


def _failed(exc: Any) -> dict[str, rules.Check]:
    assert isinstance(exc, rules.PreflightFailed), repr(exc)
    from airflow.sdk.exceptions import AirflowFailException

    assert isinstance(exc, AirflowFailException), "a failed preflight must not be retried"
    return {c.name: c for c in exc.failed}


def test_green_preflight_asks_only_read_only_and_dry_run_requests(
    ec2: Any, box_login: Any, subnet: dict
) -> None:
    ami = ec2.register_base_image("amibake-test-base")
    ec2.clear_requests()
    exc, checks = _preflight({"base_ami": ami})
    assert exc is None, exc
    names = {c["name"] for c in checks}
    assert {"SSH key", "subnet", "instance type", "base AMI", "mirror"} <= names
    assert {f"{a} (DryRun)" for a in DRY_RUN_ACTIONS} <= names
    assert all(c["ok"] for c in checks)
    dry = [r["action"] for r in ec2.requests if r["params"].get("DryRun") == "true"]
    assert sorted(dry) == sorted(DRY_RUN_ACTIONS)
    _created_nothing(ec2)


@pytest.mark.parametrize(
    ("conf", "env", "check", "setting"),
    [
        pytest.param(
            {"subnet_id": "subnet-0123456789abcdef0"}, {}, "subnet", "subnet_id", id="subnet-missing"
        ),
        pytest.param({"base_ami": "ami-0123456789abcdef0"}, {}, "base AMI", "base_ami", id="ami-missing"),
        pytest.param(
            {"base_ami_owner": "self", "base_ami_name": "no-such-image-*"},
            {},
            "base AMI",
            "base_ami_owner",
            id="ami-filter-matches-nothing",
        ),
        pytest.param(
            {"instance_type": "t9.nano"}, {}, "instance type", "instance_type", id="type-not-offered"
        ),
        pytest.param(
            {"smoke_instance_type": "t9.nano"},
            {},
            "smoke instance type",
            "smoke_instance_type",
            id="smoke-type-not-offered",
        ),
    ],
)
def test_each_bad_setting_fails_naming_it_and_creates_nothing(
    ec2: Any,
    box_login: Any,
    subnet: dict,
    monkeypatch: pytest.MonkeyPatch,
    conf: dict,
    env: dict,
    check: str,
    setting: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "base_ami" not in conf and "base_ami_owner" not in conf:
        conf = {**conf, "base_ami": ec2.register_base_image("amibake-test-base")}
    ec2.clear_requests()
    exc, _ = _preflight(conf)
    failed = _failed(exc)
    assert check in failed, str(exc)
    assert setting in failed[check].setting and failed[check].fix
    _created_nothing(ec2)


def test_public_ip_mode_needs_a_subnet_that_maps_public_ips(
    ec2: Any, box_login: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    moto = ec2.boto3_client()
    vpc = moto.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    private = moto.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]
    assert not private["MapPublicIpOnLaunch"]
    monkeypatch.setenv("AIRFLOW__AMIBAKE__SSH_ADDRESS", "public_ip")
    monkeypatch.setenv("AIRFLOW__AMIBAKE__SUBNET_ID", private["SubnetId"])
    ami = ec2.register_base_image("amibake-test-base")
    ec2.clear_requests()
    failed = _failed(_preflight({"base_ami": ami})[0])
    assert set(failed) == {"public IP"}, failed
    assert "private_ip" in failed["public IP"].fix
    _created_nothing(ec2)
    moto.modify_subnet_attribute(SubnetId=private["SubnetId"], MapPublicIpOnLaunch={"Value": True})
    assert _preflight({"base_ami": ami})[0] is None


def test_a_deprecated_base_ami_is_found_and_passes_with_a_warning(
    ec2: Any, box_login: Any, subnet: dict
) -> None:
    """AWS hides deprecated AMIs unless IncludeDeprecated: the CentOS 7 images are all deprecated."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    ami = ec2.register_base_image("CentOS Linux 7 x86_64 - 2211")
    ec2_backends[DEFAULT_ACCOUNT_ID][ec2.region].amis[ami].deprecation_time = "2024-11-30T00:00:00.000Z"
    ec2.clear_requests()
    exc, checks = _preflight({"base_ami_owner": "self", "base_ami_name": "CentOS Linux 7 x86_64*"})
    assert exc is None, exc
    (base,) = [c for c in checks if c["name"] == "base AMI"]
    assert base["warning"] and ami in base["detail"] and "deprecated since" in base["detail"]
    (search,) = [r["params"] for r in ec2.requests if r["action"] == "DescribeImages"]
    assert search["IncludeDeprecated"] == "true"
    _created_nothing(ec2)


def test_unauthorized_dry_runs_name_the_iam_policy(ec2: Any, box_login: Any, subnet: dict) -> None:
    ami = ec2.register_base_image("amibake-test-base")
    for action in DRY_RUN_ACTIONS:
        ec2.add_fault(action, "UnauthorizedOperation", 403, message="You are not authorized to perform this")
    ec2.clear_requests()
    exc = _preflight({"base_ami": ami})[0]
    failed = _failed(exc)
    denied = {a for a in DRY_RUN_ACTIONS if a not in rules.STAND_INS}
    assert set(failed) == {f"{a} (DryRun)" for a in denied}
    for action in denied:
        assert f"ec2:{action}" in failed[f"{action} (DryRun)"].fix
    # RunInstances' dry run uses the VPC's default group in place of the build's: a warning only
    (run,) = [c for c in exc.checks if c.name == "RunInstances (DryRun)"]
    assert run.ok and run.warning and "default security group" in run.detail and "ec2:RunInstances" in run.fix
    _created_nothing(ec2)


def test_a_denied_instance_type_offering_lookup_is_a_warning(ec2: Any, box_login: Any, subnet: dict) -> None:
    ami = ec2.register_base_image("amibake-test-base")
    ec2.add_fault("DescribeInstanceTypeOfferings", "UnauthorizedOperation", 403, times=None)
    exc, checks = _preflight({"base_ami": ami})
    assert exc is None, exc
    (offer,) = [c for c in checks if c["name"] == "instance type"]
    assert offer["warning"] and "DescribeInstanceTypeOfferings" in offer["fix"]


def test_a_throttled_dry_run_is_retried_not_failed(ec2: Any, box_login: Any, subnet: dict) -> None:
    """Throttling is transient: the task raises something a retry may fix (not a preflight failure)."""
    ami = ec2.register_base_image("amibake-test-base")
    ec2.add_fault("RunInstances", "RequestLimitExceeded", 503, times=None)
    exc, _ = _preflight({"base_ami": ami})
    from airflow.sdk.exceptions import AirflowFailException

    assert exc is not None and not isinstance(exc, AirflowFailException), repr(exc)
    _created_nothing(ec2)


@pytest.mark.parametrize("state", ["missing", "disabled"])
def test_the_kms_key_must_be_usable(
    ec2: Any, box_login: Any, subnet: dict, monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    kms = ec2.boto3_client("kms")
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    if state == "disabled":
        kms.disable_key(KeyId=key)
    else:
        kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
        key = "0123abcd-0123-4567-89ab-0123456789ab"
    monkeypatch.setenv("AIRFLOW__AMIBAKE__KMS_KEY_ID", key)
    ami = ec2.register_base_image("amibake-test-base")
    ec2.clear_requests()
    failed = _failed(_preflight({"base_ami": ami})[0])
    assert "KMS key" in failed and failed["KMS key"].setting == "[amibake] kms_key_id"
    _created_nothing(ec2)
    if state == "disabled":
        kms.enable_key(KeyId=key)
        exc, checks = _preflight({"base_ami": ami})
        assert exc is None, exc
        (volume,) = [r for r in ec2.calls("CreateVolume", dry_run=True) if r.get("KmsKeyId")][-1:]
        assert volume["KmsKeyId"] == key and volume["DryRun"] == "true"


def test_an_ssh_connection_without_a_key_fails(
    ec2: Any, box_login: Any, subnet: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_AMIBAKE_SSH", json.dumps({"conn_type": "ssh", "host": "127.0.0.1", "login": "admin"})
    )
    ami = ec2.register_base_image("amibake-test-base")
    ec2.clear_requests()
    failed = _failed(_preflight({"base_ami": ami})[0])
    assert set(failed) == {"SSH key"}
    assert "private_key" in failed["SSH key"].fix and "amibake_ssh" in failed["SSH key"].setting
    _created_nothing(ec2)


@pytest.fixture
def mirror_server(tmp_path: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving a Debian-shaped mirror with only ``dists/bookworm``."""
    (tmp_path / "debian" / "dists" / "bookworm").mkdir(parents=True)
    (tmp_path / "debian" / "dists" / "bookworm" / "InRelease").write_text("Suite: bookworm\n")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_the_mirror_is_fetched_from_the_worker(
    ec2: Any, box_login: Any, subnet: dict, mirror_server: str
) -> None:
    ami = ec2.register_base_image("amibake-test-base")
    exc, checks = _preflight({"base_ami": ami, "mirror_url": f"{mirror_server}/debian"})
    assert exc is None, exc
    (mirror,) = [c for c in checks if c["name"] == "mirror"]
    assert "dists/bookworm/InRelease answered HTTP 2" in mirror["detail"]
    failed = _failed(_preflight({"base_ami": ami, "mirror_url": f"{mirror_server}/centos"})[0])
    assert set(failed) == {"mirror"} and "404" in failed["mirror"].detail
    assert failed["mirror"].setting.startswith("mirror_url")


def test_a_mirror_the_worker_cannot_reach_is_a_warning(ec2: Any, box_login: Any, subnet: dict) -> None:
    """The box may reach a mirror the workers cannot (VPC endpoint, proxy): the build has the last word."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ami = ec2.register_base_image("amibake-test-base")
    exc, checks = _preflight({"base_ami": ami, "mirror_url": f"http://127.0.0.1:{port}/debian"})
    assert exc is None, exc
    (mirror,) = [c for c in checks if c["name"] == "mirror"]
    assert mirror["warning"] and "did not answer" in mirror["detail"]


def test_dry_run_requests_match_what_the_night_sends(ec2: Any, box_login: Any, subnet: dict) -> None:
    """The preflight repeats LaunchBuildBox's RunInstances / CreateSecurityGroup arguments: same keys."""
    ami = ec2.register_base_image("amibake-test-base")
    assert _preflight({"base_ami": ami, "instance_type": "t3.small"}, "amibake_t_preflight_drift")[0] is None
    dry = {r["action"]: r["params"] for r in ec2.requests if r["params"].get("DryRun") == "true"}
    ec2.clear_requests()
    with DAG("amibake_t_preflight_drift", schedule=None) as dag:
        launch = LaunchBuildBox(task_id="launch", recipe="debian12", base_ami=ami, instance_type="t3.small")
        terminate = TerminateBuildBox(task_id="terminate", recipe="debian12")
    context = make_context(dag, RUN_ID)
    try:
        run_operator(launch, context)
    finally:
        run_operator(terminate, context)
    real = {r["action"]: r["params"] for r in ec2.requests if r["action"] in DRY_RUN_ACTIONS}
    only_at_night = {"ClientToken", "SecurityGroupId.1"}  # the group exists only during the night
    for action in ("RunInstances", "CreateSecurityGroup"):
        sent = {k for k in dry[action] if k not in ("DryRun", "ClientToken")}  # botocore fills ClientToken
        assert sent == set(real[action]) - only_at_night, action
        # the same values, except the per-launch host key in UserData and the tags' created-at times
        tag_values = {k for k in sent if k.startswith("TagSpecification") and k.endswith("Value")}
        for key in sent - {"UserData"} - tag_values:
            assert dry[action][key] == real[action][key], (action, key)


# -- the standalone door ----------------------------------------------------------------------------
def test_the_cli_prints_each_check_and_exits_by_the_verdict(
    ec2: Any, box_login: Any, subnet: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    ami = ec2.register_base_image("amibake-test-base")
    ec2.clear_requests()
    assert main(["--image", "debian12", "--conf", f"base_ami={ami}"]) == 0
    out = capsys.readouterr().out
    assert "OK   RunInstances (DryRun): would succeed" in out and out.rstrip().endswith("preflight: ready")
    _created_nothing(ec2)
    assert main(["--image", "debian12", "--conf", "base_ami=ami-0123456789abcdef0"]) == 1
    out = capsys.readouterr().out
    assert "FAIL base AMI" in out and "[setting: base_ami] Fix:" in out
    assert main(["--conf", "instance_profile=evil-admin-profile"]) == 2
    assert "instance_profile" in capsys.readouterr().err
    _created_nothing(ec2)


# -- in the nightly DAG -----------------------------------------------------------------------------
def test_the_form_declares_exactly_the_trigger_params(nightly: Any) -> None:
    """validation.TRIGGER_PARAMS (what a run's conf may hold) and the DAG's Params agree."""
    assert set(nightly.params) == TRIGGER_PARAMS
    preflight = nightly.get_task("preflight")
    assert "validate_params" in preflight.upstream_task_ids
    assert "preflight" in nightly.get_task("fingerprint_inputs").upstream_task_ids
    assert "fingerprint_inputs" in nightly.get_task("launch_build_box").upstream_task_ids


@pytest.mark.long
def test_a_night_with_a_bad_subnet_stops_at_preflight_on_its_first_try(
    nightly: Any, ec2: Any, box_login: Any, subnet: dict
) -> None:
    ami = ec2.register_base_image("amibake-test-base")
    ec2.clear_requests()
    dag_run = nightly.test(run_conf={"base_ami": ami, "subnet_id": "subnet-0123456789abcdef0"})
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "failed"
    assert str(tis["validate_params"].state) == "success"
    assert str(tis["preflight"].state) == "failed" and tis["preflight"].try_number == 1
    assert str(tis["launch_build_box"].state) == "upstream_failed"
    _created_nothing(ec2)


def test_a_good_night_passes_preflight_in_the_real_task_runtime(
    nightly: Any, ec2: Any, box_login: Any, subnet: dict
) -> None:
    """validate_params + preflight of the nightly DAG through dag.test (the rest of the night is
    tests/dag/test_nightly_run.py's): green, the checks in XCom, only read-only and DryRun requests."""
    ami = ec2.register_base_image("amibake-test-base")
    ec2.clear_requests()
    head = nightly.partial_subset(task_ids=["preflight"], include_upstream=True, include_downstream=False)
    dag_run = head.test(run_conf={"base_ami": ami})
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert set(tis) == {"validate_params", "preflight"}
    assert str(dag_run.state) == "success", {t: str(ti.state) for t, ti in tis.items()}
    checks = tis["preflight"].xcom_pull(task_ids="preflight")
    assert {c["name"] for c in checks} >= {"SSH key", "subnet", "base AMI", "RunInstances (DryRun)"}
    _created_nothing(ec2)


def test_settings_default_keys_are_known() -> None:
    """The new [amibake] encrypted setting parses as validation expects."""
    assert defaults.SETTINGS["encrypted"] == "true"
    with pytest.raises(ParamError, match="^encrypted: "):
        validate_build(
            {"subnet_id": "subnet-0123456789abcdef0"}, {"encrypted": "maybe", "ssh_cidr": "10.0.0.0/8"}
        )
