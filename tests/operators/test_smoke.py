"""SmokeInstance: one instance of the new AMI, launched through the local EC2 API, checked over SSH
with the build's expectations; the AMI is verified only when every item passed.

The failure path runs for real: the local EC2 API gives every instance a box of this machine (an
sshd in its own namespaces, ``rehearsal.boxes``), not a boot of the AMI's bytes, so instance-check
runs on this machine as root (through the box's sudo) and the items a first EC2 boot must show and
this machine cannot (cloud-init, IMDSv2, the kernel arguments ...) FAIL, as they would on a broken
image. The success path needs the local EC2 API to boot the AMI's bytes (rehearsal/guests.py, not
here yet).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG
from operator_harness import make_context, run_operator

from operators.ami import RegisterHVMAmi
from operators.rules import naming, records, remote
from operators.rules.naming import Role
from operators.rules.validation import ParamError
from operators.smoke import SmokeInstance, TerminateSmokeInstance

REPO = Path(__file__).resolve().parents[2]
RUN_ID = "scheduled__2026-11-25T02:00:00+00:00"
#: What build-image reports for a Debian 12 image (the login user is the AMI name's: rehearsal.boxes).
EXPECTATIONS = {
    "login_user": "admin",
    "cmdline": "root=UUID=0b5fe0d4-8f3a-4c4e-9d71-3e7d2d6c1a10 console=ttyS0",
    "baked_host_keys": [],
    "require_selinux": False,
    "checks": [],
}
BUILD = {
    "volume_id": "vol-0123456789abcdef0",
    "expectations": EXPECTATIONS,
    "packages": [{"name": "bash", "epoch": 0, "version": "5.2.15", "release": "3", "arch": "amd64"}],
}
#: What instance-check cannot find on this machine (no cloud-init, no metadata service, another
#: kernel command line); each must FAIL, never pass or be skipped silently.
MUST_FAIL = {"cloud-init", "imdsv2-only", "kernel-cmdline"}


# -- the pure parts: argv, lines, the record ----------------------------------------------------------
def test_instance_check_argv_is_the_boot_checks() -> None:
    argv = remote.instance_check_argv(
        {**EXPECTATIONS, "baked_host_keys": ["SHA256:" + "a" * 43], "require_selinux": True}
    )
    assert argv == [
        "sudo", "-n", "bash", "-s", "--", "--expect-cmdline", EXPECTATIONS["cmdline"],
        "--baked-host-key", "SHA256:" + "a" * 43, "--require-selinux",
    ]  # fmt: skip
    assert "--require-selinux" not in remote.instance_check_argv(EXPECTATIONS)
    # the image definition's smoke checks: one --check NAME COMMAND each, in order, as given
    checks = [
        {"name": "web-answers", "command": "curl -fsS 'http://127.0.0.1/'"},
        {"name": "b", "command": "true"},
    ]
    assert remote.instance_check_argv({**EXPECTATIONS, "checks": checks})[-6:] == [
        "--check", "web-answers", "curl -fsS 'http://127.0.0.1/'", "--check", "b", "true",
    ]  # fmt: skip


def test_check_lines_are_parsed_in_order_and_done_is_seen() -> None:
    lines = [
        "noise",
        "amibake-check: cloud-init: PASS: done without errors, datasource 'DataSourceEc2Local'",
        "amibake-check: selinux: not applicable: debian has no SELinux policy\r",
        "amibake-check: imdsv2: FAIL: a GET without a token answered 200: IMDSv1 is on",
        "amibake-check: done: 1 passed, 1 failed, 1 not applicable (family debian)",
    ]
    items, done = remote.parse_check_lines(lines)
    assert list(items) == ["cloud-init", "selinux", "imdsv2"] and done
    assert items["imdsv2"] == ("FAIL", "a GET without a token answered 200: IMDSv1 is on")
    assert items["selinux"][0] == "not applicable"
    assert remote.parse_check_lines(lines[:-1])[1] is False


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"expectations": None}, "build.expectations"),
        ({"expectations": {**EXPECTATIONS, "login_user": "root; reboot"}}, "build.expectations"),
        ({"expectations": {**EXPECTATIONS, "cmdline": "quiet"}}, "build.expectations"),
        ({"expectations": {**EXPECTATIONS, "baked_host_keys": ["MD5:aa"]}}, "build.expectations"),
        ({"expectations": {**EXPECTATIONS, "require_selinux": "yes"}}, "build.expectations"),
        (
            {"expectations": {**EXPECTATIONS, "checks": [{"name": "a b", "command": "true"}]}},
            "build.expectations",
        ),
        ({"expectations": {**EXPECTATIONS, "checks": [{"name": "a", "command": " "}]}}, "build.expectations"),
        ({"expectations": {**EXPECTATIONS, "checks": [{"name": "a", "cmd": "true"}]}}, "build.expectations"),
        ({"volume_id": "vol-x"}, "build.volume_id"),
    ],
)
def test_a_malformed_build_record_is_refused_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(ParamError, match=f"^{field}: .*RemoteChrootBuild's XCom"):
        records.check("build", {**BUILD, **change})
    assert records.check("build", BUILD) == BUILD


def test_build_image_reports_the_expectations_after_verify(tmp_path: Path) -> None:
    """The box side: lib/verify.sh's write_expectations on an image tree, read back through the
    progress line the Airflow side parses (one home for the login user, cmdline and baked keys)."""
    root = tmp_path / "root"
    (root / "etc/cloud/cloud.cfg.d").mkdir(parents=True)
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/cloud/cloud.cfg").write_text(
        "users:\n - default\nsystem_info:\n  distro: debian\n  default_user:\n    name: debian\n"
    )
    # a cloud.cfg.d file read after cloud.cfg wins, as in cloud-init
    (root / "etc/cloud/cloud.cfg.d/01_debian.cfg").write_text(
        "system_info:\n  default_user:\n    name: admin\n    sudo: ALL=(ALL) NOPASSWD:ALL\n"
    )
    (root / "etc/default/grub").write_text(
        'GRUB_CMDLINE_LINUX="console=ttyS0,115200n8 nvme_core.io_timeout=4294967295"\n'
        "GRUB_CMDLINE_LINUX_DEFAULT=''\n"
    )
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "etc/ssh/ssh_host_ed25519_key")],
        check=True,
    )
    fingerprint = subprocess.run(
        ["ssh-keygen", "-lf", str(root / "etc/ssh/ssh_host_ed25519_key.pub")],
        check=True, capture_output=True, text=True,
    ).stdout.split()[1]  # fmt: skip
    scripts = REPO / "include/scripts"
    script = (
        f". {scripts}/contract.env; . {scripts}/lib/common.sh; . {scripts}/lib/verify.sh; "
        f". {scripts}/lib/imagedef.sh; "
        f"ROOT={root}; RUN_DIR={tmp_path}; RECIPE_SELINUX=1; "
        "root_uuid() { echo 0b5fe0d4-8f3a-4c4e-9d71-3e7d2d6c1a10; }; "
        'write_expectations && PROGRESS_FD=1 progress expectations "$(<"$(expectations_file)")"'
    )
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True).stdout
    progress = remote.BuildProgress()
    for line in out.splitlines():
        progress.feed(line)
    assert progress.expectations == {
        "login_user": "admin",
        "cmdline": "root=UUID=0b5fe0d4-8f3a-4c4e-9d71-3e7d2d6c1a10 console=ttyS0,115200n8 "
        "nvme_core.io_timeout=4294967295",
        "baked_host_keys": [fingerprint],
        "require_selinux": True,
        "checks": [],
    }
    assert records.check("build", {**BUILD, "expectations": progress.expectations})


# -- against the local EC2 API ------------------------------------------------------------------------
def _our_ami(ec2: Any, dag: DAG, run_id: str, run_after: datetime) -> dict[str, str]:
    """An AMI registered by RegisterHVMAmi from a tagged snapshot (2 GiB): an amibake AMI in every
    respect EC2 sees, whose instances the local EC2 API runs as boxes of this machine."""
    moto = ec2.boto3_client()
    build = naming.build_id(dag.dag_id, run_id)
    volume = moto.create_volume(Size=2, AvailabilityZone=f"{ec2.region}a")["VolumeId"]
    tags = naming.resource_tags(build=build, dag_id=dag.dag_id, run_id=run_id, recipe="debian12",
                                role=Role.SNAPSHOT)  # fmt: skip
    snapshot = moto.create_snapshot(
        VolumeId=volume, TagSpecifications=[naming.tag_specification("snapshot", tags)]
    )["SnapshotId"]
    moto.delete_volume(VolumeId=volume)
    with dag:
        register = RegisterHVMAmi(
            task_id=f"register_{build}",
            recipe="debian12",
            snapshot={"snapshot_id": snapshot, "volume_id": volume},
            size_gib=2,
            deferrable=False,
        )
    return run_operator(register, make_context(dag, run_id, run_after=run_after)).result


@pytest.fixture
def build_box(ec2: Any, launched_box: tuple) -> tuple[dict, Any]:
    """``launched_box`` with the build's temporary security group in its XCom (as LaunchBuildBox
    makes it: tagged, in the box's VPC)."""
    box, sshd_box = launched_box
    instance = ec2.boto3_client().describe_instances(InstanceIds=[box["instance_id"]])["Reservations"][0]
    vpc = instance["Instances"][0]["VpcId"]
    moto = ec2.boto3_client(recorded=True)
    tags = naming.resource_tags(build=box["build_id"], dag_id="amibake_t_box", run_id="manual__t",
                                recipe="debian12", role=Role.BUILD_SG)  # fmt: skip
    group = moto.create_security_group(
        GroupName=naming.resource_name(box["build_id"], Role.BUILD_SG), Description="amibake test", VpcId=vpc,
        TagSpecifications=[naming.tag_specification("security-group", tags)],
    )["GroupId"]  # fmt: skip
    ec2.clear_requests()
    return {**box, "security_group_id": group}, sshd_box


def _smoke(dag: DAG, box: dict, ami: dict, **kwargs: Any) -> SmokeInstance:
    with dag:
        return SmokeInstance(
            task_id="smoke_instance",
            recipe="debian12",
            ami=ami,
            build=BUILD,
            box=box,
            status_wait=(1, 60),
            check_timeout=120,
            **kwargs,
        )


def _image(ec2: Any, ami_id: str) -> dict:
    return ec2.boto3_client().describe_images(ImageIds=[ami_id], IncludeDeprecated=True)["Images"][0]


def test_a_failed_smoke_check_deprecates_the_ami_keeps_the_older_ones_and_fails_naming_the_items(
    ec2: Any, boxes: Any, build_box: tuple, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    box, _ = build_box
    dag = DAG(f"amibake_t_smoke_{tmp_path.name[-8:]}", schedule=None)
    tonight = datetime(2026, 11, 25, 2, tzinfo=UTC)
    older = [
        _our_ami(ec2, dag, f"scheduled__{tonight - timedelta(days=n)}", tonight - timedelta(days=n))
        for n in (2, 1)
    ]
    ec2.boto3_client().create_tags(
        Resources=[a["ami_id"] for a in older], Tags=[{"Key": naming.TAG_VERIFIED, "Value": naming.VERIFIED}]
    )
    ami = _our_ami(ec2, dag, RUN_ID, tonight)
    older_before = [_image(ec2, a["ami_id"]) for a in older]
    ec2.clear_requests()
    smoke = _smoke(dag, box, ami)
    capsys.readouterr()
    started = datetime.now(UTC)

    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException) as err:
        run_operator(smoke, make_context(dag, RUN_ID))
    message = str(err.value)
    failed_items = set(message.split("failed items: ")[1].split(". ")[0].split(", "))
    assert MUST_FAIL <= failed_items, message
    assert ami["ami_id"] in message and "deprecated" in message and "older AMI is kept" in message

    # the request EC2 got: one instance of the AMI, as the brief says it must be launched
    (run,) = ec2.calls("RunInstances")
    build = naming.build_id(dag.dag_id, RUN_ID)
    assert run["ImageId"] == ami["ami_id"] and run["InstanceType"] == "t3.micro"
    box_instance = ec2.boto3_client().describe_instances(InstanceIds=[box["instance_id"]])
    assert run["SubnetId"] == box_instance["Reservations"][0]["Instances"][0]["SubnetId"]
    assert run["SecurityGroupId.1"] == box["security_group_id"]
    assert run["MetadataOptions.HttpTokens"] == "required"
    assert run["BlockDeviceMapping.1.DeviceName"] == "/dev/sda1"
    assert run["BlockDeviceMapping.1.Ebs.VolumeSize"] == "4"  # the AMI's 2 GiB + 2 for growpart
    assert run["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] == "true"
    assert run["ClientToken"] == f"amibake-{build}-smoke-1"
    for n, kind in enumerate(("instance", "volume", "network-interface"), start=1):
        assert run[f"TagSpecification.{n}.ResourceType"] == kind
        spec = {run[f"TagSpecification.{n}.Tag.{i}.Key"]: run[f"TagSpecification.{n}.Tag.{i}.Value"]
                for i in range(1, 8)}  # fmt: skip
        assert spec[naming.TAG_ROLE] == "smoke-instance" and spec[naming.TAG_BUILD_ID] == build
    user_data = json.loads(base64.b64decode(run["UserData"]).decode().split("\n", 1)[1])
    (login_public,) = user_data["ssh_authorized_keys"]
    assert login_public.startswith("ssh-ed25519 ")
    assert user_data["ssh_keys"]["ed25519_public"] != login_public  # a host key of its own
    actions = [r["action"] for r in ec2.requests]
    assert "DescribeInstanceStatus" in actions and "GetConsoleOutput" in actions
    assert ec2.calls("CreateTags") == []  # never tagged verified

    # each item was logged as a PASS/FAIL line; the private login key went nowhere
    log = capsys.readouterr().out  # the task log (Airflow's structlog writes it to stdout here)
    for item in MUST_FAIL:
        assert any(
            "[error" in line and f"instance check: {item}: FAIL: " in line for line in log.splitlines()
        ), item
    assert "console output of smoke instance" in log
    assert "PRIVATE KEY" not in log and "PRIVATE KEY" not in message

    # the AMI: deprecated now (the next whole minute), not verified; the older ones untouched
    image = _image(ec2, ami["ami_id"])
    deprecated = datetime.fromisoformat(image["DeprecationTime"].replace("Z", "+00:00"))
    assert started < deprecated <= datetime.now(UTC) + timedelta(minutes=1)
    assert naming.TAG_VERIFIED not in naming.tags_to_dict(image["Tags"])
    assert [_image(ec2, a["ami_id"]) for a in older] == older_before
    (deprecation,) = ec2.calls("EnableImageDeprecation")
    assert deprecation["ImageId"] == ami["ami_id"]

    # the teardown terminates it: its box (sshd, sessions) is gone
    (instance_id,) = _smoke_instances(ec2, build)
    with dag:
        teardown = TerminateSmokeInstance(task_id="terminate_smoke_instance", recipe="debian12")
    assert run_operator(teardown, make_context(dag, RUN_ID)).result == {"terminated": [instance_id]}
    assert not boxes.get(instance_id).alive
    assert _smoke_instances(ec2, build) == []


def _smoke_instances(ec2: Any, build: str) -> list[str]:
    """Live smoke instances of one build."""
    found = ec2.boto3_client().describe_instances(
        Filters=[*naming.build_filters(build, Role.SMOKE),
                 {"Name": "instance-state-name", "Values": ["pending", "running"]}]
    )  # fmt: skip
    return [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]]


def test_a_retry_terminates_the_earlier_tries_instance_and_launches_a_new_one(
    ec2: Any, boxes: Any, build_box: tuple, tmp_path: Path
) -> None:
    """The earlier try's login key died with it: its instance is useless, found by tag and ended."""
    box, _ = build_box
    dag = DAG(f"amibake_t_smoke_retry_{tmp_path.name[-8:]}", schedule=None)
    ami = _our_ami(ec2, dag, RUN_ID, datetime(2026, 11, 25, 2, tzinfo=UTC))
    build = naming.build_id(dag.dag_id, RUN_ID)
    # what an earlier try left: a live smoke instance of this build (a lost worker, a timeout)
    tags = naming.resource_tags(build=build, dag_id=dag.dag_id, run_id=RUN_ID, recipe="debian12",
                                role=Role.SMOKE)  # fmt: skip
    (earlier,) = [
        i["InstanceId"]
        for i in ec2.boto3_client(recorded=True).run_instances(
            ImageId=ami["ami_id"], MinCount=1, MaxCount=1,
            TagSpecifications=[naming.tag_specification(kind, tags)
                               for kind in ("instance", "volume", "network-interface")],
        )["Instances"]
    ]  # fmt: skip
    assert boxes.get(earlier).alive
    # it was launched long before this try: wait until EC2's eventual consistency shows it
    # (rehearsal.aws_rules.EventualConsistency hides a new instance from Describe for a moment)
    client = ec2.boto3_client(recorded=True)
    filters = naming.build_filters(build, Role.SMOKE)
    deadline = time.monotonic() + 30
    while not client.describe_instances(Filters=filters)["Reservations"]:
        assert time.monotonic() < deadline, f"{earlier} never became visible"
        time.sleep(0.1)
    ec2.clear_requests()

    smoke = _smoke(dag, box, ami)
    with pytest.raises(Exception, match="failed items: "):
        run_operator(smoke, make_context(dag, RUN_ID, try_number=2, max_tries=1))
    actions = [r["action"] for r in ec2.requests if not r["action"].startswith("Describe")]
    assert actions.index("TerminateInstances") < actions.index("RunInstances")
    assert [c["InstanceId.1"] for c in ec2.calls("TerminateInstances")] == [earlier]
    assert not boxes.get(earlier).alive
    (run,) = ec2.calls("RunInstances")
    assert run["ClientToken"] == f"amibake-{build}-smoke-2"
    (now,) = _smoke_instances(ec2, build)
    assert now != earlier


def test_smoke_check_off_launches_nothing_says_the_ami_is_unverified_and_skips(
    ec2: Any, build_box: tuple, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Skipped, so rotation downstream is skipped too: the run succeeds and retires nothing."""
    from airflow.sdk.exceptions import AirflowSkipException

    box, _ = build_box
    dag = DAG(f"amibake_t_smoke_off_{tmp_path.name[-8:]}", schedule=None)
    ami = _our_ami(ec2, dag, RUN_ID, datetime(2026, 11, 25, 2, tzinfo=UTC))
    ec2.clear_requests()
    capsys.readouterr()
    with pytest.raises(AirflowSkipException, match=f"AMI {ami['ami_id']} is registered UNVERIFIED"):
        run_operator(_smoke(dag, box, ami, smoke_check="false"), make_context(dag, RUN_ID))
    assert ec2.requests == []
    assert "registered UNVERIFIED" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("ami", {"ami_id": "ami-$(reboot)"}, "^ami.ami_id: "),
        ("build", {"volume_id": "vol-0123456789abcdef0"}, "^build.expectations: "),
        ("box", {"instance_id": "i-x"}, "^box.instance_id: "),
        ("box", "no group", "^box.security_group_id: "),
        ("instance_type", "t3.micro; reboot", "^smoke_instance_type: "),
        ("smoke_check", "perhaps", "^smoke_check: "),
    ],
)
def test_bad_input_is_refused_before_any_request(
    ec2: Any, build_box: tuple, field: str, value: Any, error: str
) -> None:
    box, _ = build_box
    dag = DAG("amibake_t_smoke_bad", schedule=None)
    if value == "no group":
        value = {**box, "security_group_id": ""}
    args = {"ami": {"ami_id": "ami-0123456789abcdef0"}, "build": BUILD, "box": box, field: value}
    with dag:
        smoke = SmokeInstance(task_id="smoke_instance", recipe="debian12", **args)
    with pytest.raises(ParamError, match=error):
        smoke.execute(make_context(dag, RUN_ID))
    assert ec2.requests == []
