"""Hostile and malformed input: refused naming the field, before any EC2 request or SSH session.

Each value is tried at three doors: the pure rules (``validate_build``), the nightly DAG itself
(``dag.test`` with the value as run conf: the Param schema or the ``validate_params`` task must
stop it, and the recording proxy in front of moto must have seen no request at all), and the
operator that would hand the value to AWS or to the box (defence in depth: an operator reached
with a bad value, e.g. through an edited XCom, refuses it before its first call). A last test
proves on a real box (its sshd, sudo) that values which do reach it arrive as single inert arguments.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG
from operator_harness import make_context, run_operator

from operators.ami import RegisterHVMAmi
from operators.base import settings
from operators.build_box import LaunchBuildBox
from operators.canvas import AttachCanvas
from operators.remote_build import RemoteChrootBuild
from operators.rules import naming, remote
from operators.rules.validation import ParamError, validate_build

REPO = Path(__file__).resolve().parents[2]
RUN_ID = "manual__2026-11-25T05:00:00+00:00"
GOOD_AMI = "ami-0123456789abcdef0"
GOOD_VOLUME = "vol-0123456789abcdef0"

#: (field, hostile value). Values that reach AWS or the box, as a user or a tampered form could send them.
HOSTILE: list[Any] = [
    pytest.param("recipe", "debian12; rm -rf /", id="recipe-semicolon"),
    pytest.param("recipe", "../../etc/passwd", id="recipe-traversal"),
    pytest.param("recipe", "centos8", id="recipe-unknown"),
    pytest.param("recipe", ["debian12"], id="recipe-list"),
    pytest.param("base_ami", f"{GOOD_AMI}; reboot", id="ami-semicolon"),
    pytest.param("base_ami", "$(curl http://evil.invalid)", id="ami-subst"),
    pytest.param("base_ami", "`id`", id="ami-backticks"),
    pytest.param("base_ami", "ami-XYZ", id="ami-malformed"),
    pytest.param("base_ami", "AMI-0123456789ABCDEF0", id="ami-uppercase"),
    pytest.param("base_ami", "ami-" + "0" * 4000, id="ami-oversized"),
    pytest.param("base_ami", f"{GOOD_AMI}\n", id="ami-trailing-newline"),
    pytest.param("base_ami", f"{GOOD_AMI}\nrm -rf /", id="ami-newline-command"),
    pytest.param("base_ami", 12345, id="ami-int"),
    pytest.param("base_ami_owner", "self; id", id="owner-semicolon"),
    pytest.param("base_ami_name", "$(id)", id="ami-filter-subst"),
    pytest.param("base_ami_name", "x" * 300, id="ami-filter-oversized"),
    pytest.param("subnet_id", "subnet-12345678 && id", id="subnet-and"),
    pytest.param("subnet_id", "subnet-../../x", id="subnet-traversal"),
    pytest.param("subnet_id", "sg-0123456789abcdef0", id="subnet-wrong-kind"),
    pytest.param("instance_type", "t3.small;id", id="type-semicolon"),
    pytest.param("instance_type", "t3.small\nid", id="type-newline"),
    pytest.param("instance_type", "a" * 500 + ".large", id="type-oversized"),
    pytest.param("canvas_size_gib", 0, id="size-zero"),
    pytest.param("canvas_size_gib", -8, id="size-negative"),
    pytest.param("canvas_size_gib", 10**9, id="size-huge"),
    pytest.param("canvas_size_gib", "5; id", id="size-shell"),
    pytest.param("canvas_size_gib", 2.5, id="size-float"),
    pytest.param("canvas_size_gib", True, id="size-bool"),
    pytest.param("device_name", "/dev/sda1", id="device-root"),
    pytest.param("device_name", "/dev/sdf; id", id="device-semicolon"),
    pytest.param("device_name", "/dev/../sdf", id="device-traversal"),
    pytest.param("encrypted", "perhaps", id="encrypted-word"),
    pytest.param("kms_key_id", "alias/../../x;id", id="kms-traversal"),
    pytest.param("instance_profile", "role$(id)", id="profile-subst"),
    pytest.param("ami_name_prefix", "x" * 200, id="prefix-oversized"),
    pytest.param("ami_name_prefix", "amibake;reboot", id="prefix-semicolon"),
    pytest.param("ami_name_prefix", "$(id)", id="prefix-subst"),
    pytest.param("mirror_url", "ftp://mirror.invalid/debian", id="mirror-ftp"),
    pytest.param("mirror_url", "file:///etc/passwd", id="mirror-file"),
    pytest.param("mirror_url", "http://h/$(touch /tmp/amibake-pwned)", id="mirror-subst"),
    pytest.param("mirror_url", "http://h/`id`", id="mirror-backticks"),
    pytest.param("mirror_url", "http://h/a b", id="mirror-space"),
    pytest.param("mirror_url", "http://h/debian\nid", id="mirror-newline"),
    pytest.param("mirror_url", "http://h/d;id", id="mirror-semicolon"),
    pytest.param("mirror_url", "http://h/d|id", id="mirror-pipe"),
    pytest.param("mirror_url", "javascript:alert(1)", id="mirror-javascript"),
    pytest.param("mirror_url", "http://", id="mirror-no-host"),
    pytest.param("mirror_url", "https://h/" + "a" * 5000, id="mirror-oversized"),
    pytest.param("boot_check", "yes; id", id="bootcheck-shell"),
    pytest.param("boot_check", 1, id="bootcheck-int"),
]
#: one value per field and kind of attack, run through the whole DAG (each run costs ~2.5 s)
THROUGH_THE_DAG = {
    "recipe-semicolon",
    "recipe-unknown",
    "ami-subst",
    "ami-newline-command",
    "ami-int",
    "subnet-and",
    "type-semicolon",
    "size-zero",
    "size-huge",
    "size-shell",
    "device-semicolon",
    "kms-traversal",
    "prefix-subst",
    "mirror-subst",
    "mirror-backticks",
    "mirror-newline",
    "bootcheck-shell",
}


def _settings() -> dict[str, str]:
    return {**settings(), "subnet_id": "subnet-0123456789abcdef0", "ssh_address": "connection"}


@pytest.mark.parametrize(("field", "value"), HOSTILE)
def test_the_rules_refuse_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ParamError) as refused:
        validate_build({field: value}, _settings())
    assert refused.value.field == field
    assert str(refused.value).startswith(f"{field}: ")


def _no_request_left(ec2: Any) -> None:
    assert ec2.requests == [], [r["action"] for r in ec2.requests]


@pytest.mark.parametrize(("field", "value"), [p for p in HOSTILE if p.id in THROUGH_THE_DAG])
def test_the_nightly_run_stops_before_any_ec2_request(
    nightly: Any,
    ec2: Any,
    box_login: Any,
    subnet: dict,
    capfd: pytest.CaptureFixture[str],
    field: str,
    value: Any,
) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    try:
        dag_run = nightly.test(run_conf={field: value})
    except ParamValidationError as refused:  # the trigger form's schema: no run is created at all
        assert f"param {field}" in str(refused)
    else:
        states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
        assert str(dag_run.state) == "failed"
        assert states["validate_params"] == "failed"
        assert states["launch_build_box"] == "upstream_failed"
        assert {states["terminate_build_box"], states["delete_canvas"]} <= {"upstream_failed", "skipped"}
        out = capfd.readouterr().out
        assert f"ParamError: {field}: " in out, [line for line in out.splitlines() if "rror" in line]
    _no_request_left(ec2)


#: Conf keys the trigger form does not declare: what a triggering user must not choose (issue 11).
UNDECLARED = [
    pytest.param({"instance_profile": "evil-admin-profile"}, "instance_profile", id="instance-profile"),
    pytest.param({"encrypted": False}, "encrypted", id="encrypted-false"),
    pytest.param({"kms_key_id": "alias/attacker-key"}, "kms_key_id", id="kms-key"),
    pytest.param({"device_name": "/dev/sdg"}, "device_name", id="device-name"),
    pytest.param({"ssh_cidr": "0.0.0.0/0"}, "ssh_cidr", id="ssh-cidr"),
    pytest.param({"anything": 1}, "anything", id="unknown"),
]


@pytest.mark.parametrize(("conf", "field"), UNDECLARED)
def test_undeclared_conf_keys_are_refused_by_the_rules(conf: dict, field: str) -> None:
    from operators.rules.validation import refuse_undeclared

    with pytest.raises(ParamError) as refused:
        refuse_undeclared(conf)
    assert refused.value.field == field and "not a trigger parameter" in str(refused.value)
    if field in ("instance_profile", "kms_key_id", "encrypted"):
        assert f"[amibake] {field}" in str(refused.value), "the error says where the value is set instead"


@pytest.mark.parametrize(("conf", "field"), UNDECLARED)
def test_a_run_with_undeclared_conf_keys_creates_nothing(
    nightly: Any,
    ec2: Any,
    box_login: Any,
    subnet: dict,
    capfd: pytest.CaptureFixture[str],
    conf: dict,
    field: str,
) -> None:
    """``./rehearse --conf instance_profile='"evil-admin-profile"'`` once launched a box with that role."""
    ami = ec2.register_base_image("amibake-test-base")
    ec2.clear_requests()
    dag_run = nightly.test(run_conf={"base_ami": ami, **conf})
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "failed"
    assert states["validate_params"] == "failed"
    assert states["preflight"] == states["launch_build_box"] == "upstream_failed"
    assert f"ParamError: {field}: not a trigger parameter" in capfd.readouterr().out
    _no_request_left(ec2)


def _operator_for(field: str, value: Any, dag: DAG, scripts: Path, box: dict[str, Any]) -> Any:
    """The operator that hands ``field`` to AWS or the box (a running one), built with the hostile value."""
    canvas = {"volume_id": GOOD_VOLUME, "device_name": "/dev/sdf", "size_gib": 4}
    with dag:
        if field in ("recipe", "base_ami", "base_ami_owner", "base_ami_name", "subnet_id", "instance_type"):
            return LaunchBuildBox(task_id="launch", **({"recipe": "debian12"} | {field: value}))
        if field == "instance_profile":
            return LaunchBuildBox(
                task_id="launch", recipe="debian12", base_ami=GOOD_AMI, instance_profile=value
            )
        translate = {"canvas_size_gib": "size_gib"}
        if field in ("canvas_size_gib", "device_name", "encrypted", "kms_key_id"):
            return AttachCanvas(
                task_id="attach", recipe="debian12", box=box, **{translate.get(field, field): value}
            )
        if field == "ami_name_prefix":
            snapshot = {"snapshot_id": "snap-0123456789abcdef0", "volume_id": GOOD_VOLUME}
            return RegisterHVMAmi(
                task_id="register", recipe="debian12", snapshot=snapshot, size_gib=4, **{field: value}
            )
        return RemoteChrootBuild(
            task_id="build",
            recipe="debian12",
            box=box,
            canvas=canvas,
            scripts_dir=str(scripts),
            **{field: value},
        )


@pytest.fixture
def hostile_dag(tmp_path: Path) -> Iterator[tuple[DAG, Path]]:
    """(a DAG of a unique id, scripts whose build-image fails at once); the box dir is removed after."""
    dag_id = f"amibake_t_hostile_{uuid.uuid4().hex[:10]}"
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "build-image").write_text("#!/usr/bin/env bash\nexit 1\n")  # only reached if validation failed
    yield DAG(dag_id, schedule=None), scripts
    shutil.rmtree(remote.remote_dir(naming.build_id(dag_id, RUN_ID)), ignore_errors=True)


@pytest.mark.parametrize(("field", "value"), HOSTILE)
def test_each_operator_refuses_before_its_first_call(
    ec2: Any,
    launched_box: tuple[dict[str, Any], Any],
    subnet: dict,
    hostile_dag: tuple[DAG, Path],
    field: str,
    value: Any,
) -> None:
    dag, scripts = hostile_dag
    box, on_box = launched_box
    op = _operator_for(field, value, dag, scripts, box)
    with pytest.raises(ParamError) as refused:
        run_operator(op, make_context(dag, RUN_ID))
    assert refused.value.field in (field, "size_gib", "canvas.size_gib")
    _no_request_left(ec2)
    build = naming.build_id(dag.dag_id, RUN_ID)
    assert not on_box.path(remote.remote_dir(build)).exists(), "an SSH session shipped files"


#: What a real build reports after verify (lib/verify.sh write_expectations).
EXPECTATIONS_LINE = "AMIBAKE " + json.dumps(
    {
        "event": "expectations",
        "login_user": "admin",
        "cmdline": "root=UUID=0b5fe0d4-8f3a-4c4e-9d71-3e7d2d6c1a10",
        "baked_host_keys": [],
        "require_selinux": False,
        "checks": [],
    }
)


@pytest.fixture
def recording_scripts(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """(dag id, local scripts dir, file on the box where build-image writes its argv NUL-separated)."""
    dag_id = f"amibake_t_quote_{uuid.uuid4().hex[:10]}"
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    argv_file = tmp_path / "argv"
    entry = scripts / "build-image"
    # stands in for build-image: records the argv it was given, then reports success (with the
    # expectations and the package list a real build reports after verify)
    entry.write_text(
        textwrap.dedent(
            f"""\
            #!/usr/bin/env bash
            set -euo pipefail
            printf '%s\\0' "$@" >{argv_file}
            echo '{EXPECTATIONS_LINE}'
            list=$(cd "$(dirname "$0")/.." && pwd)/run/packages.tsv
            mkdir -p "${{list%/*}}" && printf 'bash\\t0\\t5.2.15\\t3\\tamd64\\n' >"$list"
            printf 'AMIBAKE {{"event":"packages","path":"%s","count":1,"sha256":"%s"}}\\n' \\
                "$list" "$(sha256sum "$list" | cut -d' ' -f1)"
            echo 'AMIBAKE {{"event":"result","status":"ok"}}'
            """
        )
    )
    entry.chmod(0o755)
    yield dag_id, scripts, argv_file
    shutil.rmtree(remote.remote_dir(naming.build_id(dag_id, RUN_ID)), ignore_errors=True)


def test_values_that_reach_the_box_arrive_as_single_inert_arguments(
    launched_box: tuple[dict[str, Any], Any], recording_scripts: tuple[str, Path, Path], tmp_path: Path
) -> None:
    """Tilde, percent and plus pass validation in a mirror URL's path: the box gets them verbatim."""
    dag_id, scripts, argv_file = recording_scripts
    canary = tmp_path / "canary"
    mirror = f"http://127.0.0.1/x/~root/%24HOME/+{canary}"
    box, _ = launched_box  # the box shares /tmp with this machine: argv_file and the canary are seen here
    canvas = {"volume_id": GOOD_VOLUME, "device_name": "/dev/sdf", "size_gib": 4}
    with DAG(dag_id, schedule=None) as dag:
        op = RemoteChrootBuild(
            task_id="build",
            recipe="debian12",
            box=box,
            canvas=canvas,
            mirror_url=mirror,
            boot_check=False,
            scripts_dir=str(scripts),
        )
    run_operator(op, make_context(dag, RUN_ID))
    received = argv_file.read_bytes().split(b"\0")[:-1]
    digest = received[received.index(b"--manifest-sha256") + 1].decode()  # of the shipped SHA256SUMS
    expected = remote.build_image_argv(
        manifest_sha256=digest,
        build=naming.build_id(dag_id, RUN_ID),
        action="all",
        volume_id=GOOD_VOLUME,
        recipe="debian12",
        device_name="/dev/sdf",
        size_gib=4,
        mirror_url=mirror,
        sudo=True,  # the base AMI's user, not root
    )
    assert [a.decode() for a in received] == expected[expected.index("--recipe") :]
    assert not canary.exists()
