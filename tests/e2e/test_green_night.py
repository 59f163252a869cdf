"""ONE green night of the rehearsal's customized Debian definition, read by every test that only
checks its results.

The night (``dag.test`` of ``amibake_rehearsal-debian12``, the DAG the product's DAG file makes of
rehearsal/images.py's definition: the local EC2 API with its boxes and the IAM policy enforced, a
real box reached as on AWS, a real Debian 12 build with its qemu boot check on a loop-backed canvas,
rehearsal.ebs.LoopEbs, a package from a real signed apt repository behind basic auth,
rehearsal/aptrepo.py) runs once per module (``night``); each concern is its own test reading it: the
run and its XComs against the EC2 requests, what is left afterwards, the definition's effects on both
boots, the secrets scan, the fence of the box. A night that did not succeed fails each of them with
the same clear message (``green``). The module runs in one xdist worker (``xdist_group``;
./run-tests uses ``--dist loadgroup``).

Secrets: the AWS secret key of the ``amibake_aws`` connection (a unique value for this module), the
SSH private key of ``amibake_ssh`` (whole, and each line of its base64 body) and the repository
password of ``amibake_repo_rehearsal`` must appear in no XCom, no task log line, no rendered template
field, no box-side log, and no request sent to EC2; the password not in the snapshot's bytes either.
Boundaries: the security group admits tcp/22 only from ``[amibake] ssh_cidr``; IMDSv2 is required
on the box and on the AMI; the canvas is created encrypted, so its snapshot is too.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dag_runs import left_in_moto, xcom_of

from operators import defaults
from operators.rules import definition, naming
from operators.rules.contract import CONTRACT
from operators.rules.naming import Role
from operators.rules.remote import parse_check_lines, remote_dir
from rehearsal import images
from rehearsal.leaks import ec2_request_text

REPO = Path(__file__).resolve().parents[2]
DAG_ID = definition.dag_id(images.NAME)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and mounts"),
    pytest.mark.xdist_group("green-night"),
]
#: ``[amibake] ssh_cidr`` of the night: not the boxes' loopback network, so the fence test sees that
#: the rule admits exactly this range (the local EC2 API does not enforce security groups).
SSH_CIDR = "198.51.100.0/24"
#: canvas_size_gib overrides the definition's size_gib (4) for this run, as the form may.
CONF = {"canvas_size_gib": 3, "ami_name_prefix": "amibake-e2e"}
REPO_USER = "rehearsal"


@dataclass
class Night:
    """What the one green night left to read: the run, its task log (stdout/stderr of ``dag.test``,
    which runs the tasks in this process), the box-side phase logs, and the stack it ran on."""

    stack: Any
    ebs: Any
    aws_secret: str
    repo_password: str
    repo_requests: list[tuple[str, bool]] = field(default_factory=list)
    run: Any = None
    build: str = ""
    log: str = ""
    box_logs: str = ""
    error: str = ""  # the traceback, when dag.test itself raised
    states: dict[str, str] = field(default_factory=dict)
    dag: Any = None
    base_ami: str = ""
    repo: Any = None  # rehearsal.aptrepo.AptRepo, served until the module ends

    def failure(self) -> str:
        """Why this night cannot serve the tests (empty when it is green)."""
        if self.error:
            return f"dag.test raised:\n{self.error}"
        if str(self.run.state) == "success" and set(self.states.values()) == {"success"}:
            return ""
        failed = sorted(t for t, s in self.states.items() if s != "success")
        tail = "\n".join(self.log.splitlines()[-80:])
        return (
            f"run {self.run.state}; tasks not successful: {failed}; states {self.states}\nlog tail:\n{tail}"
        )


class _TaskLogCapture:
    """fd 1 and 2 captured around ``dag.test``, the way the ``capfd`` fixture does it (pytest has no
    module-scoped capfd): the tasks' log is what they print."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        from _pytest.capture import CaptureFixture, FDCapture

        self._capman = request.config.pluginmanager.getplugin("capturemanager")
        self._fixture = CaptureFixture(FDCapture, request, _ispytest=True)

    def __enter__(self) -> _TaskLogCapture:
        self._capman.set_fixture(self._fixture)
        self._fixture._start()
        return self

    def read(self) -> str:
        out, err = self._fixture.readouterr()
        return out + err

    def __exit__(self, *exc: object) -> None:
        self._fixture.close()
        self._capman.unset_fixture()


def _box_logs(boxes: Any, ec2: Any, build: str) -> str:
    """The box-side phase logs (the terminated box's files stay until the next reset, as a disk kept
    for inspection): the build's work dir and each canvas's."""
    dirs = [box.path(remote_dir(build)) for box in boxes.boxes]
    for volume_id in [c["VolumeId"] for c in ec2.calls("AttachVolume")]:
        dirs += [box.path(f"{CONTRACT.box_work_dir}/{volume_id}") for box in boxes.boxes]
    return "".join(p.read_text(errors="replace") for d in dirs for p in d.glob("logs/*.log"))


@pytest.fixture(scope="module")
def night(
    shared_stack: Any, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Night]:
    """The green night, run once for the module. Never raises for a failed run: each test says so."""
    from airflow.dag_processing.dagbag import DagBag

    from rehearsal.aptrepo import AptRepo
    from rehearsal.ebs import LoopEbs
    from rehearsal.ec2_local import FAKE_ACCESS_KEY
    from rehearsal.mirror import FrozenMirror, debian_upstreams

    ec2, mp = shared_stack.ec2, shared_stack.monkeypatch
    aws_secret = f"amibakeTestSecret{secrets.token_hex(16)}"  # moto accepts any secret key
    conn = {
        "conn_type": "aws",
        "login": FAKE_ACCESS_KEY,
        "password": aws_secret,
        "extra": ec2.connection_extra(),
    }
    mp.setenv("AIRFLOW_CONN_AMIBAKE_AWS", json.dumps(conn))
    mp.setenv("AIRFLOW__AMIBAKE__SSH_CIDR", SSH_CIDR)
    repo_password = f"RepoSecret{secrets.token_hex(16)}"
    work = tmp_path_factory.mktemp("definition")
    with (
        AptRepo.serve(work / "repo", user=REPO_USER, password=repo_password) as repo,
        LoopEbs(ec2.moto_url, ec2.region, tmp_path_factory.mktemp("ebs")) as ebs,
        FrozenMirror.serve(debian_upstreams(), tmp_path_factory.mktemp("mirror")) as mirror,
    ):
        folder = images.images_folder(work / "images", REPO / "images", repo, mirror.base("debian"))
        mp.setenv("AIRFLOW__AMIBAKE__IMAGES_DIR", str(folder))
        mp.setenv("AIRFLOW_CONN_AMIBAKE_REPO_REHEARSAL", images.connection(REPO_USER, repo_password))
        bag = DagBag(dag_folder=str(REPO / "dags" / "amibake_images.py"))
        assert bag.import_errors == {}
        dag = bag.dags[DAG_ID]
        dag.deadline = None  # as tests/conftest.py's nightly: dag.test() does not run deadline callbacks
        base_ami = ec2.register_base_image("amibake-e2e-base")
        result = Night(
            stack=shared_stack,
            ebs=ebs,
            aws_secret=aws_secret,
            repo_password=repo_password,
            dag=dag,
            base_ami=base_ami,
            repo=repo,
        )
        with _TaskLogCapture(request) as capture:
            try:
                result.run = dag.test(run_conf={**CONF, "base_ami": base_ami})
            except Exception:
                result.error = traceback.format_exc()
            result.log = capture.read()
        result.repo_requests = list(repo.requests)
        if result.run is not None:
            result.build = naming.build_id(DAG_ID, result.run.run_id)
            result.states = {ti.task_id: str(ti.state) for ti in result.run.get_task_instances()}
            result.box_logs = _box_logs(shared_stack.boxes, ec2, result.build)
        yield result


@pytest.fixture
def green(night: Night) -> Night:
    """The night, when it was green; otherwise the test fails saying why (once per dependent test)."""
    why = night.failure()
    if why:
        pytest.fail(
            f"the one green night of this module failed, so this cannot be checked:\n{why}", pytrace=False
        )
    return night


def _launches(ec2: Any, role: Role) -> list[dict[str, str]]:
    """The RunInstances requests that tagged their instance with ``amibake:role=ROLE`` (the night
    launches a build box and, with the smoke check, a smoke instance)."""
    calls = ec2.calls("RunInstances")
    return [c for c in calls if _tags_of(c, "TagSpecification").get(naming.TAG_ROLE) == role]


def _tags_of(call: dict[str, str], prefix: str) -> dict[str, str]:
    """The tags a recorded request gives in the TagSpecification(s) whose keys start with ``prefix``."""
    return {
        v: call[k.removesuffix("Key") + "Value"]
        for k, v in call.items()
        if k.startswith(prefix) and k.endswith(".Key")
    }


# --- the DAG run, its XComs and the EC2 requests -------------------------------------------------


def test_the_night_runs_ahead_of_the_rest_of_the_suite() -> None:
    """The suite's longest chain (tests/conftest.py, LONGEST_FIRST): every thread of this worker, so
    every box, build and guest the night starts, runs at a negative nice value while the module runs."""
    threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    (nice,) = {os.getpriority(os.PRIO_PROCESS, tid) for tid in threads}
    assert nice < 0


def test_the_run_and_every_task_succeed(green: Night) -> None:
    assert str(green.run.state) == "success", green.states
    assert set(green.states.values()) == {"success"}, green.states


def test_xcoms_and_ec2_requests_tell_one_story(green: Night) -> None:
    """Box, canvas, snapshot and AMI records agree with each other and with what EC2 was asked; the
    AMI is available under the requested name and announced as the recipe's asset."""
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    ec2, dag_run, build = green.stack.ec2, green.run, green.build
    box = xcom_of(dag_run, "launch_build_box")
    canvas = xcom_of(dag_run, "attach_canvas")
    built = xcom_of(dag_run, "remote_chroot_build")
    snapshot = xcom_of(dag_run, "frozen_snapshot")
    image = xcom_of(dag_run, "register_hvm_ami")
    (run,) = _launches(ec2, Role.BUILD_BOX)
    assert box["build_id"] == build and box["instance_id"].startswith("i-")
    (attach,) = ec2.calls("AttachVolume")
    assert (attach["InstanceId"], attach["VolumeId"]) == (box["instance_id"], canvas["volume_id"])
    (create_snapshot,) = ec2.calls("CreateSnapshot")
    assert create_snapshot["VolumeId"] == canvas["volume_id"] == built["volume_id"] == snapshot["volume_id"]
    (register,) = ec2.calls("RegisterImage")
    assert register["BlockDeviceMapping.1.Ebs.SnapshotId"] == snapshot["snapshot_id"] == image["snapshot_id"]
    assert register["BlockDeviceMapping.1.Ebs.VolumeSize"] == "3"
    assert image["ami_name"].startswith("amibake-e2e-") and image["ami_name"].endswith(build)
    assert ec2.boto3_client().describe_images(ImageIds=[image["ami_id"]])["Images"][0]["State"] == "available"
    with create_session() as session:
        events = session.scalars(select(AssetEvent).where(AssetEvent.source_run_id == dag_run.run_id)).all()
        assert [(e.asset.uri, e.extra["ami_id"]) for e in events] == [
            (f"amibake://ami/{images.NAME}", image["ami_id"])
        ]


def test_the_night_leaves_nothing(green: Night) -> None:
    """No box (build box or smoke instance), canvas or security group of the build in EC2; the canvas
    detached from its loop device and no box runs any more (their mounts died with them)."""
    ec2, boxes = green.stack.ec2, green.stack.boxes
    assert left_in_moto(ec2, green.build) == {"instances": [], "canvas_volumes": [], "security_groups": []}
    for volume_id in [c["VolumeId"] for c in ec2.calls("AttachVolume")]:
        green.ebs.wait_for(volume_id, attached=False)
    running = [(box.instance_id, box.mounts()) for box in boxes.boxes if box.alive]
    assert running == [], "a build box is still running"


def test_the_iam_policy_refused_no_request(green: Night) -> None:
    """docs/iam-policy.json, enforced by the local EC2 API, admitted every request of the night
    (shared_stack checks it again at the end of the module)."""
    from rehearsal.iam import IamEnforcer

    iam = IamEnforcer.of(green.stack.ec2)
    assert not iam.denials(), iam.report()


# --- secrets and the fence of the box -----------------------------------------------------------


def _run_rows(dag_run: Any) -> dict[str, list[str]]:
    """Every XCom value and rendered template field of the run, as JSON text."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        xcoms = session.scalars(
            select(XComModel).where(XComModel.dag_id == DAG_ID, XComModel.run_id == dag_run.run_id)
        ).all()
        rendered = session.scalars(
            select(RenderedTaskInstanceFields).where(
                RenderedTaskInstanceFields.dag_id == DAG_ID,
                RenderedTaskInstanceFields.run_id == dag_run.run_id,
            )
        ).all()
        return {
            "xcom": [
                f"{x.task_id}/{x.key}: {json.dumps(XComModel.deserialize_value(x), default=str)}"
                for x in xcoms
            ],
            "rendered": [f"{r.task_id}: {json.dumps(r.rendered_fields, default=str)}" for r in rendered],
        }


def _secret_needles(aws_secret: str, private_key_pem: str) -> list[str]:
    body = [
        line.strip() for line in private_key_pem.splitlines() if line.strip() and "PRIVATE KEY" not in line
    ]
    assert body and all(len(line) >= 20 for line in body[:-1])
    return [aws_secret, private_key_pem.strip(), *[line for line in body if len(line) >= 20]]


def test_no_secret_in_xcom_logs_templates_or_requests(green: Night) -> None:
    ec2, login = green.stack.ec2, green.stack.login
    rows = _run_rows(green.run)
    assert len(rows["xcom"]) >= 7 and len(rows["rendered"]) >= 7, rows  # what was scanned is really there
    assert "launch_build_box" in green.log and "phase mkfs" in green.log
    assert green.box_logs, "the box-side phase logs were found and scanned"
    places = {
        "xcom": "\n".join(rows["xcom"]),
        "rendered templates": "\n".join(rows["rendered"]),
        "task logs": green.log,
        "box-side logs": green.box_logs,
        "EC2 requests": json.dumps(ec2.requests),
    }
    for needle in [*_secret_needles(green.aws_secret, login.private_key_pem), green.repo_password]:
        for place, text in places.items():
            assert needle not in text, f"a secret ({needle[:6]}…) is in the {place}"
    # decoded, the user data holds the per-build HOST key by design (whose first base64 line, the
    # OpenSSH key format's header, every ed25519 key shares): searched for the repository password
    assert green.repo_password not in ec2_request_text(ec2.requests)
    assert "PRIVATE KEY" not in places["xcom"] + places["rendered templates"] + json.dumps(ec2.requests)


def test_the_box_is_fenced_and_the_disks_encrypted(green: Night) -> None:
    """tcp/22 from ``ssh_cidr`` only; IMDSv2 required on the box and on the AMI; the canvas created
    encrypted, so its snapshot is too."""
    ec2 = green.stack.ec2
    (ingress,) = ec2.calls("AuthorizeSecurityGroupIngress")
    assert {k: v for k, v in ingress.items() if k.startswith("IpPermissions")} == {
        "IpPermissions.1.IpProtocol": "tcp",
        "IpPermissions.1.FromPort": "22",
        "IpPermissions.1.ToPort": "22",
        "IpPermissions.1.IpRanges.1.CidrIp": SSH_CIDR,
        **{k: v for k, v in ingress.items() if k.startswith("IpPermissions.1.IpRanges.1.Description")},
    }
    (run,) = _launches(ec2, Role.BUILD_BOX)
    assert run["MetadataOptions.HttpTokens"] == "required"
    # and every other instance of the night (the smoke instance) too
    assert {r.get("MetadataOptions.HttpTokens") for r in ec2.calls("RunInstances")} == {"required"}
    (volume,) = ec2.calls("CreateVolume")
    assert volume["Encrypted"] == "true"
    (register,) = ec2.calls("RegisterImage")
    assert register["ImdsSupport"] == "v2.0"
    (snapshot,) = ec2.boto3_client().describe_snapshots(
        SnapshotIds=[register["BlockDeviceMapping.1.Ebs.SnapshotId"]]
    )["Snapshots"]
    assert snapshot["Encrypted"] is True  # a snapshot of an encrypted volume is encrypted


# --- the boot check on the box (the image's first boot, before its snapshot) ---------------------

#: What instance-check reports on a good Debian image, then the definition's smoke checks.
BOOT_CHECK_ITEMS = [
    "cloud-init", "root-grew", "systemd-units", "hostname", "host-keys", "imdsv2-only", "time-daemon",
    "kernel-cmdline", "selinux-enforcing", "selinux-labels", *[f"check {name}" for name in images.CHECKS],
]  # fmt: skip
NOT_APPLICABLE = {"selinux-enforcing", "selinux-labels"}
BOOT_STAGES = ["firmware", "kernel", "cloud-init", "ssh", "checks"]


def test_the_boot_check_on_the_box_passed_every_item(green: Night) -> None:
    """Before the snapshot the box booted the canvas as EC2 boots it (the root on NVMe with the volume
    id as serial, an EC2 platform, IMDSv2 only, a bigger disk): every instance-check item and each of
    the definition's smoke checks passed, the task log has a line per item and per boot stage, and
    the phase log has the console and the metadata requests; nothing of the check is left.

    The suite's one boot check of a good image: tests/scripts/test_debian12.py boots broken copies of
    an image of the same recipe and definition and relies on this pass."""
    (attach,) = green.stack.ec2.calls("AttachVolume")
    volume_id = attach["VolumeId"]
    work = f"{CONTRACT.box_work_dir}/{volume_id}"
    (path,) = {p for box in green.stack.boxes.boxes if (p := box.path(f"{work}/logs/bootcheck.log")).exists()}
    log = path.read_text(errors="replace")
    got, _ = parse_check_lines(log.splitlines())  # instance-check's lines, as the smoke task reads them
    assert list(got) == BOOT_CHECK_ITEMS
    for item, (status, detail) in got.items():
        assert status == ("not applicable" if item in NOT_APPLICABLE else "PASS"), (item, status, detail)
        assert f"boot check: {item}: {status}: " in green.log, item  # the task log, one line each
    assert "EL7 only" in got["selinux-labels"][1]
    assert "DataSourceEc2" in got["cloud-init"][1]
    assert got["time-daemon"][1] == "chronyd runs"
    assert got["hostname"][1].startswith("hostname 'ip-169-254-0-15' from the metadata")
    stages = re.findall(r"boot check: stage ([\w-]+) took ", green.log)
    assert sorted(stages) == sorted(BOOT_STAGES) and stages[-1] == "checks", stages
    assert re.search(r"root=UUID=[0-9a-f-]{36}", log) and "bootcheck: passed" in log
    # the guest saw an NVMe root disk with the volume id as serial, and an EC2 platform
    assert f"serial={volume_id.replace('-', '')}" in log and "nvme0n1" in log
    assert "Datasource DataSourceEc2Local" in log
    # IMDSv2: every metadata request but the token PUTs (and instance-check's own probe) had a token
    requests = log.split("----- metadata requests -----")[1].split("-----")[0].splitlines()
    untokened = [r for r in requests if r.strip() and "token=no" in r and "PUT /latest/api/token" not in r]
    assert len(untokened) == 1 and " 401 " in untokened[0], untokened
    assert "FAILED" not in log and "invalid locale" not in log, [
        line for line in log.splitlines() if "FAILED" in line or "invalid locale" in line
    ]
    # nothing of the check is left on the box: qemu, overlay, throwaway key
    for box in green.stack.boxes.boxes:
        assert not box.path(f"{work}/run/bootcheck").exists()
        assert not box.path(f"{work}/run/qemu.pid").exists()


# --- the smoke instance (a second boot of the registered AMI) ------------------------------------


def test_the_smoke_instance_is_launched_from_the_new_ami_as_the_build_asked(green: Night) -> None:
    """One launch of the registered AMI: the box's subnet and security group, t3.micro, IMDSv2, root
    2 GiB larger than the AMI and deleted with it, tagged as the smoke instance on instance, volume
    and interface, with its OWN login key and host key (not the box's)."""
    from operators.rules.launch import host_key_from_user_data

    ec2 = green.stack.ec2
    image = xcom_of(green.run, "register_hvm_ami")
    box = xcom_of(green.run, "launch_build_box")
    (box_run,) = _launches(ec2, Role.BUILD_BOX)
    (smoke,) = _launches(ec2, Role.SMOKE)
    assert smoke["ImageId"] == image["ami_id"]
    assert smoke["SubnetId"] == box_run["SubnetId"]
    assert smoke["SecurityGroupId.1"] == box["security_group_id"]
    assert smoke["InstanceType"] == "t3.micro"
    assert smoke["MetadataOptions.HttpTokens"] == "required"
    assert smoke["BlockDeviceMapping.1.Ebs.VolumeSize"] == "5"  # the 3 GiB AMI + 2 GiB for growpart
    assert smoke["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] == "true"
    specs = {smoke[k]: k.removesuffix(".ResourceType") for k in smoke if k.endswith(".ResourceType")}
    assert set(specs) == {"instance", "volume", "network-interface"}
    for prefix in specs.values():
        tags = _tags_of(smoke, prefix)
        assert (tags[naming.TAG_ROLE], tags[naming.TAG_BUILD_ID]) == (Role.SMOKE, green.build), tags
    smoke_user_data, box_user_data = (base64.b64decode(c["UserData"]).decode() for c in (smoke, box_run))
    assert host_key_from_user_data(smoke["UserData"]) not in ("", box["host_key"])
    login_key = re.search(r"ssh-ed25519 \S+", smoke_user_data.split('"ssh_keys"')[0])
    assert login_key and login_key.group(0) not in box_user_data, "the smoke instance has a key of its own"


def test_the_smoke_instance_booted_the_amis_bytes_and_passed_every_check(green: Night) -> None:
    """The instance was qemu booting the snapshot the build took (its console shows the image's
    kernel and cloud-init on the EC2 datasource); 2/2 was awaited, every instance-check item passed,
    and only then was the AMI tagged verified. Rotation then ran on the verified AMI."""
    ec2 = green.stack.ec2
    image = xcom_of(green.run, "register_hvm_ami")
    smoke = xcom_of(green.run, "smoke_instance")
    assert smoke["verified"] is True and smoke["ami_id"] == image["ami_id"]
    assert smoke["checks"] and set(smoke["checks"].values()) <= {"PASS", "not applicable"}, smoke
    assert {i for i, st in smoke["checks"].items() if st == "PASS"} >= {
        "cloud-init",
        "root-grew",
        "hostname",
        "host-keys",
        "imdsv2-only",
        "kernel-cmdline",
    }
    assert {c["InstanceId.1"] for c in ec2.calls("DescribeInstanceStatus")} == {smoke["instance_id"]}
    guest = green.stack.boxes.guests.get(smoke["instance_id"])
    console = guest.console().decode(errors="replace")
    assert "Linux version" in console and "DataSourceEc2" in console, console[-2000:]
    (tagged,) = [
        c
        for c in ec2.calls("CreateTags")
        if c.get("ResourceId.1") == image["ami_id"] and c["Tag.1.Key"] == naming.TAG_VERIFIED
    ]
    assert (tagged["Tag.1.Key"], tagged["Tag.1.Value"]) == (naming.TAG_VERIFIED, naming.VERIFIED)
    tags = ec2.boto3_client().describe_images(ImageIds=[image["ami_id"]])["Images"][0]["Tags"]
    assert {t["Key"]: t["Value"] for t in tags}[naming.TAG_VERIFIED] == naming.VERIFIED
    assert "passed every smoke check" in green.log
    assert image["ami_id"] in xcom_of(green.run, "rotate_amis")["kept"]


def test_the_smoke_instance_is_gone_before_its_security_group(green: Night) -> None:
    """terminate_smoke_instance ended the instance (qemu stopped, its disk removed) before
    terminate_build_box deleted the security group it sat in."""
    ec2 = green.stack.ec2
    smoke = xcom_of(green.run, "smoke_instance")
    actions = [(r["action"], r["params"]) for r in ec2.requests]
    terminated = [
        n
        for n, (a, p) in enumerate(actions)
        if a == "TerminateInstances" and smoke["instance_id"] in p.values()
    ]
    deleted = [n for n, (a, _) in enumerate(actions) if a == "DeleteSecurityGroup"]
    assert terminated and deleted and terminated[0] < deleted[0], actions
    guest = green.stack.boxes.guests.get(smoke["instance_id"])
    assert not guest.alive and not guest.disk.exists()


# --- the image definition: its effects on both boots, its password nowhere ------------------------


def test_the_definition_is_built_in_and_checked_on_both_boots(green: Night) -> None:
    """The box fetched the private repository with its login (every request authorized); both the
    boot check on the box and the smoke instance of the AMI passed each of the definition's smoke
    checks (package, enabled service, file with mode and group, provisioning script, kernel
    argument); the build's XCom carries them as expectations."""
    assert green.repo_requests and all(ok for _, ok in green.repo_requests), green.repo_requests
    assert any(path.endswith("/InRelease") for path, _ in green.repo_requests)
    wanted = {f"check {name}" for name in images.CHECKS}
    built = xcom_of(green.run, "remote_chroot_build")
    assert [c["name"] for c in built["expectations"]["checks"]] == list(images.CHECKS)
    smoke = xcom_of(green.run, "smoke_instance")
    assert {item: smoke["checks"].get(item) for item in wanted} == dict.fromkeys(wanted, "PASS"), smoke
    for item in wanted:
        assert f"amibake-check: {item}: PASS" in green.box_logs, item  # the boot check's phase log
    assert images.KERNEL_ARG in built["expectations"]["cmdline"]


def test_the_repository_password_is_not_in_the_image(green: Night) -> None:
    """The snapshot's bytes (what every instance of the AMI starts from, free blocks included) hold no
    trace of the repository password; the box's verify phase said so too."""
    snapshot = xcom_of(green.run, "frozen_snapshot")
    content = green.stack.boxes.guests.snapshots.content(snapshot["snapshot_id"])
    assert content is not None, "the snapshot's bytes were kept (rehearsal.ebs.EbsSnapshots)"
    secret, tail = green.repo_password.encode(), b""
    with open(content, "rb") as disk:
        while chunk := disk.read(64 << 20):
            assert secret not in tail + chunk, "the repository password is in the snapshot"
            tail = chunk[-len(secret) :]
    assert "no repository password in the image's files or raw bytes" in green.box_logs


# --- what is in the AMI ------------------------------------------------------------------------


def test_the_ami_says_what_is_in_it_and_where_it_came_from(green: Night) -> None:
    """The build listed the image's packages (the private repository's amibake-hello among them);
    publish_manifest tagged the AMI with that list's digest and the provenance, in one CreateTags the
    IAM policy admits; a first night has no previous AMI to compare with."""
    from importlib import metadata

    from operators.manifest import scripts_commit
    from operators.rules import manifest, records

    built = xcom_of(green.run, "remote_chroot_build")
    packages = manifest.from_records(built["packages"])
    hello = [p for p in packages if p.name == green.repo.package]
    assert [(p.version, p.release, p.arch) for p in hello] == [("1.0", "", "all")], hello
    summary = records.check("manifest", xcom_of(green.run, "publish_manifest"))
    ami = xcom_of(green.run, "register_hvm_ami")["ami_id"]
    assert (summary["ami_id"], summary["packages"]) == (ami, len(packages))
    assert summary["sha256"] == manifest.list_sha256(packages)
    assert (summary["previous_ami"], summary["s3_key"]) == ("", "")
    image = green.stack.ec2.boto3_client().describe_images(ImageIds=[ami])["Images"][0]
    tags = naming.tags_to_dict(image["Tags"])
    defn = definition.load(Path(os.environ["AIRFLOW__AMIBAKE__IMAGES_DIR"]) / f"{images.NAME}.yaml")
    assert tags[naming.TAG_PACKAGES_SHA256] == summary["sha256"]
    assert tags[naming.TAG_DEFINITION_SHA256] == definition.canonical_hash(defn)  # the file that built it
    assert tags[naming.TAG_VERSION] == metadata.version("amibake")
    assert tags[naming.TAG_SCRIPTS_COMMIT] == scripts_commit(defaults.scripts_dir())
    manifest_tags = [
        c
        for c in green.stack.ec2.calls("CreateTags")
        if c.get("ResourceId.1") == ami and c["Tag.1.Key"] in naming.MANIFEST_TAGS
    ]
    assert len(manifest_tags) == 1
    assert {v for k, v in manifest_tags[0].items() if k.endswith(".Key")} <= set(naming.MANIFEST_TAGS)
    assert re.search(r"package list fetched from the box: \d+ packages", green.log)
    assert green.log.count(f"{green.repo.package}\t") == 0  # the list is not in the task log


# --- the next night, when nothing changed (runs last: it reads the green night's AMI) -------------


@dataclass
class Rerun:
    """The same night triggered again with nothing changed: its run, task log and EC2 requests."""

    run: Any
    log: str
    requests: list[dict[str, Any]]
    seconds: float


@pytest.fixture(scope="module")
def unchanged(night: Night, request: pytest.FixtureRequest) -> Rerun:
    """The green night's DAG triggered again with the same conf, right after it (once for the module)."""
    why = night.failure()
    if why:
        pytest.fail(f"the green night failed, so its rerun cannot be checked:\n{why}", pytrace=False)
    ec2 = night.stack.ec2
    before = len(ec2.requests)
    started = time.monotonic()
    with _TaskLogCapture(request) as capture:
        run = night.dag.test(run_conf={**CONF, "base_ami": night.base_ami})
        log = capture.read()
    return Rerun(run, log, ec2.requests[before:], time.monotonic() - started)


def _mutating(requests: list[dict[str, Any]]) -> list[str]:
    """The requests that change something in EC2 (not Describe*/Get*, and not a DryRun)."""
    return [
        r["action"]
        for r in requests
        if not r["action"].startswith(("Describe", "Get")) and r["params"].get("DryRun") != "true"
    ]


def test_the_ami_carries_the_fingerprint_of_its_inputs(green: Night) -> None:
    inputs = xcom_of(green.run, "fingerprint_inputs")
    assert inputs["build"] is True and "no verified AMI of image line amibake-e2e yet" in inputs["reason"]
    ami = xcom_of(green.run, "register_hvm_ami")["ami_id"]
    image = green.stack.ec2.boto3_client().describe_images(ImageIds=[ami])["Images"][0]
    tags = naming.tags_to_dict(image["Tags"])
    assert tags[naming.TAG_FINGERPRINT] == inputs["fingerprint"]
    assert tags[naming.TAG_INPUTS] == inputs["inputs"]
    parts = dict(item.split("=") for item in inputs["inputs"].split())
    assert set(parts) == {
        "definition",
        "scripts",
        "recipe",
        "repo:bookworm",
        "repo:bookworm-updates",
        "repo:bookworm-security",
        f"repo:{images.REPO_NAME}",
    }


def test_an_unchanged_night_builds_nothing_and_stays_green(green: Night, unchanged: Rerun) -> None:
    """No instance, volume, snapshot or AMI: not one mutating EC2 request; every step after the
    fingerprint skipped but distribution; the run green; the log names the AMI it matched and its
    inputs."""
    states = {ti.task_id: str(ti.state) for ti in unchanged.run.get_task_instances()}
    assert str(unchanged.run.state) == "success", states
    # distribute_ami runs on such a night too (on the newest verified AMI): with no distribution, no call
    ran = {"validate_params", "preflight", "fingerprint_inputs", "distribute_ami"}
    assert {t: states[t] for t in ran} == dict.fromkeys(ran, "success")
    assert {s for t, s in states.items() if t not in ran} == {"skipped"}, states
    assert _mutating(unchanged.requests) == []
    ami = xcom_of(green.run, "register_hvm_ami")["ami_id"]
    inputs = xcom_of(unchanged.run, "fingerprint_inputs")
    assert (inputs["build"], inputs["newest_verified_ami"]) == (False, ami)
    assert inputs["fingerprint"] == xcom_of(green.run, "fingerprint_inputs")["fingerprint"]
    assert f"unchanged since {ami} built " in unchanged.log
    print(f"unchanged night: {unchanged.seconds:.1f} s, {len(unchanged.requests)} EC2 requests")


@pytest.fixture(scope="module")
def rebuilt(night: Night, unchanged: Rerun, request: pytest.FixtureRequest) -> Rerun:
    """The night after the private repository published amibake-hello 1.1 (once for the module,
    after the unchanged night). Without either boot: the green night ran both in the same DAG, and a
    rebuild differs from it only before the box (the fingerprint) and after the AMI (the manifest)."""
    night.repo.add_version("1.1")
    ec2 = night.stack.ec2
    before = len(ec2.requests)
    started = time.monotonic()
    with _TaskLogCapture(request) as capture:
        run = night.dag.test(
            run_conf={**CONF, "base_ami": night.base_ami, "boot_check": False, "smoke_check": False}
        )
        log = capture.read()
    return Rerun(run, log, ec2.requests[before:], time.monotonic() - started)


def test_a_new_package_version_rebuilds_and_says_what_changed(green: Night, rebuilt: Rerun) -> None:
    """The next night's fingerprint differs in the private repository only, so it builds; the new
    AMI's manifest names amibake-hello as updated from 1.0 to 1.1, against the previous verified
    AMI's list (read from the XCom of the run that built it: no manifest bucket here)."""
    states = {ti.task_id: str(ti.state) for ti in rebuilt.run.get_task_instances()}
    unverified = {"smoke_instance", "rotate_amis"}  # smoke_check off: the AMI stays unverified, unrotated
    assert str(rebuilt.run.state) == "success", states
    assert states == {t: "skipped" if t in unverified else "success" for t in states}, states
    first = xcom_of(green.run, "register_hvm_ami")["ami_id"]
    inputs = xcom_of(rebuilt.run, "fingerprint_inputs")
    assert (inputs["build"], inputs["changed"]) == (True, [f"repo:{images.REPO_NAME}"]), inputs
    assert f"changed since {first} built " in rebuilt.log
    second = xcom_of(rebuilt.run, "register_hvm_ami")["ami_id"]
    summary = xcom_of(rebuilt.run, "publish_manifest")
    assert (summary["ami_id"], summary["previous_ami"]) == (second, first)
    changes = xcom_of(rebuilt.run, "publish_manifest", key="changes")
    assert summary["changed"] == {"added": 0, "removed": 0, "updated": 1}, changes
    assert f"what changed in {second} since {first}: 1 updated, 0 added, 0 removed" in changes
    assert re.search(rf"updated\s+{green.repo.package}\.all\s+1\.0 -> 1\.1", changes), changes
    assert changes.splitlines()[0] in rebuilt.log  # the block is in the task log too
    print(f"rebuild night after a new package version: {rebuilt.seconds:.1f} s")
